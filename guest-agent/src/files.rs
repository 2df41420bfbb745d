//! File operations: upload (streamed into a temporary name, then renamed), download (streamed),
//! stat, list, mkdir, remove. Each returns its error (naming the path and the OS error) for the
//! server to send.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use vmrun_protocol::agent::{
    kind, write_frame, DataReader, DataWriter, ErrorInfo, ErrorKind, FileKind, ProtoError, Reply,
    StatInfo, Upload, CHUNK,
};

use crate::config::Config;
use crate::error::{connection, err};

fn stat_info(m: &fs::Metadata) -> StatInfo {
    let ft = m.file_type();
    let kind = if ft.is_symlink() {
        FileKind::Symlink
    } else if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_file() {
        FileKind::File
    } else {
        FileKind::Other
    };
    StatInfo {
        kind,
        size: m.size(),
        mode: m.mode(),
        uid: m.uid(),
        gid: m.gid(),
        mtime: m.mtime(),
    }
}

/// Removes the temporary file unless the upload was committed.
struct TempGuard(Option<PathBuf>);

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

fn temp_name(target: &Path) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = N.fetch_add(1, Ordering::Relaxed);
    target.with_file_name(format!(".{name}.vmrun-upload.{}.{n}", std::process::id()))
}

/// `OK`, the client's `DATA`… `EOF` into a temporary file, then the rename and `OK` with the
/// byte count.
pub fn upload(
    s: &mut UnixStream,
    cfg: &Config,
    u: &Upload,
    buf: &mut Vec<u8>,
) -> Result<(), ErrorInfo> {
    let target = cfg.resolve(&u.path)?;
    let parent = target.parent().ok_or_else(|| {
        err(
            ErrorKind::InvalidInput,
            0,
            format!("upload {}: no parent directory", u.path),
        )
    })?;
    if target.is_dir() {
        return Err(err(
            ErrorKind::IsADirectory,
            libc::EISDIR,
            format!("upload {}: is a directory", u.path),
        ));
    }
    if !parent.is_dir() {
        if !u.create_parents {
            return Err(err(
                ErrorKind::NotFound,
                libc::ENOENT,
                format!(
                    "upload {}: the parent directory does not exist (ask to create parents)",
                    u.path
                ),
            ));
        }
        fs::create_dir_all(parent).map_err(|e| {
            ErrorInfo::io(&format!("upload {}: create parent directories", u.path), &e)
        })?;
    }
    let tmp = temp_name(&target);
    let mut guard = TempGuard(Some(tmp.clone()));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(u.mode & 0o7777)
        .open(&tmp)
        .map_err(|e| ErrorInfo::io(&format!("upload {}: create", u.path), &e))?;
    write_frame(s, kind::OK, &[]).map_err(|e| connection("upload", &e))?;
    let mut total: u64 = 0;
    let mut data = DataReader::new(&mut *s, buf);
    loop {
        match data.next_chunk() {
            Ok(Some(chunk)) => {
                file.write_all(chunk)
                    .map_err(|e| ErrorInfo::io(&format!("upload {}: write", u.path), &e))?;
                total += chunk.len() as u64;
            }
            Ok(None) => break,
            Err(ProtoError::Unexpected { got, .. }) => {
                return Err(err(
                    ErrorKind::Protocol,
                    0,
                    format!("upload: unexpected frame kind {got}"),
                ))
            }
            // The client went away: the guard removes the partial file.
            Err(_) => {
                return Err(err(
                    ErrorKind::Protocol,
                    0,
                    "upload: the client went away before the end".into(),
                ))
            }
        }
    }
    if u.fsync {
        file.sync_all()
            .map_err(|e| ErrorInfo::io(&format!("upload {}: fsync", u.path), &e))?;
    }
    // The umask may have narrowed the mode at creation.
    file.set_permissions(fs::Permissions::from_mode(u.mode & 0o7777))
        .map_err(|e| ErrorInfo::io(&format!("upload {}: chmod", u.path), &e))?;
    drop(file);
    fs::rename(&tmp, &target)
        .map_err(|e| ErrorInfo::io(&format!("upload {}: rename into place", u.path), &e))?;
    guard.0 = None;
    if u.fsync {
        if let Ok(d) = File::open(parent) {
            let _ = d.sync_all();
        }
    }
    write_frame(s, kind::OK, &total.to_le_bytes()).map_err(|e| connection("upload", &e))
}

/// `REPLY` (size, mode), then the file as `DATA`… `EOF`.
pub fn download(s: &mut UnixStream, cfg: &Config, path: &str) -> Result<(), ErrorInfo> {
    let p = cfg.resolve(path)?;
    let mut f = File::open(&p).map_err(|e| ErrorInfo::io(&format!("download {path}"), &e))?;
    let m = f
        .metadata()
        .map_err(|e| ErrorInfo::io(&format!("download {path}"), &e))?;
    if m.is_dir() {
        return Err(err(
            ErrorKind::IsADirectory,
            libc::EISDIR,
            format!("download {path}: is a directory"),
        ));
    }
    let head = Reply::File {
        size: m.len(),
        mode: m.mode(),
    };
    write_frame(s, kind::REPLY, &head.encode()).map_err(|e| connection("download", &e))?;
    let mut out = DataWriter::new(&mut *s);
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ErrorInfo::io(&format!("download {path}: read"), &e)),
        };
        out.write_all(&buf[..n])
            .map_err(|e| connection("download", &e))?;
    }
    out.finish().map_err(|e| connection("download", &e))?;
    Ok(())
}

pub fn stat(cfg: &Config, path: &str) -> Result<Reply, ErrorInfo> {
    let p = cfg.resolve(path)?;
    fs::symlink_metadata(&p)
        .map(|m| Reply::Stat(stat_info(&m)))
        .map_err(|e| ErrorInfo::io(&format!("stat {path}"), &e))
}

/// Most entries one listing returns (the reply must fit in a frame).
const LIST_MAX: usize = 10_000;

pub fn list(cfg: &Config, path: &str) -> Result<Reply, ErrorInfo> {
    let p = cfg.resolve(path)?;
    let ctx = format!("list {path}");
    let mut v = Vec::new();
    for e in fs::read_dir(&p).map_err(|e| ErrorInfo::io(&ctx, &e))? {
        let e = e.map_err(|e| ErrorInfo::io(&ctx, &e))?;
        let m = match e.path().symlink_metadata() {
            Ok(m) => m,
            Err(_) => continue, // removed meanwhile
        };
        v.push((e.file_name().to_string_lossy().into_owned(), stat_info(&m)));
        if v.len() > LIST_MAX {
            return Err(err(
                ErrorKind::InvalidInput,
                0,
                format!("{ctx}: more than {LIST_MAX} entries; capture or download instead"),
            ));
        }
    }
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Reply::List(v))
}

pub fn mkdir(cfg: &Config, path: &str, mode: u32, parents: bool) -> Result<(), ErrorInfo> {
    let p = cfg.resolve(path)?;
    let mut b = fs::DirBuilder::new();
    b.recursive(parents);
    std::os::unix::fs::DirBuilderExt::mode(&mut b, mode & 0o7777);
    b.create(&p)
        .map_err(|e| ErrorInfo::io(&format!("mkdir {path}"), &e))
}

pub fn remove(cfg: &Config, path: &str, recursive: bool) -> Result<(), ErrorInfo> {
    let p = cfg.resolve(path)?;
    let m = fs::symlink_metadata(&p).map_err(|e| ErrorInfo::io(&format!("remove {path}"), &e))?;
    let res = if m.is_dir() {
        if recursive {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_dir(&p)
        }
    } else {
        fs::remove_file(&p)
    };
    res.map_err(|e| ErrorInfo::io(&format!("remove {path}"), &e))
}
