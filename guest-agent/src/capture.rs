//! `capture`: `sync`, then a tar of the overlay upper directory streamed as DATA frames. It
//! keeps what overlayfs encodes in the upper layer: whiteouts (char 0/0), opaque directories
//! and other overlay metadata (xattrs, as PAX `SCHILY.xattr.*` records), symlinks, hardlinks,
//! modes, owners and mtimes. The VM keeps running; a file that changes size while it is read is
//! cut or zero-padded to the size recorded, so the tar stays valid.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use tar::{Builder, EntryType, Header};
use vmrun_protocol::agent::{DataWriter, ErrorInfo, CHUNK};

use crate::config::Config;

/// Exactly `left` bytes: the file's, then zeros if it shrank meanwhile.
struct Sized<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Sized<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = match self.inner.read(&mut buf[..want]) {
            Ok(0) => {
                buf[..want].fill(0);
                want
            }
            Ok(n) => n,
            Err(e) => return Err(e),
        };
        self.left -= n as u64;
        Ok(n)
    }
}

/// Extended attributes of `p` (not following symlinks), at most 64 KiB each.
pub fn xattrs(p: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(c) = CString::new(p.as_os_str().as_bytes()) else {
        return vec![];
    };
    let mut names = vec![0u8; 4096];
    // SAFETY: c is NUL-terminated; the buffer and its length match.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n <= 0 {
        return vec![];
    }
    names.truncate(n as usize);
    let mut out = vec![];
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let Ok(cn) = CString::new(name) else { continue };
        let mut val = vec![0u8; 64 << 10];
        // SAFETY: c and cn are NUL-terminated; the buffer and its length match.
        let m =
            unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), val.as_mut_ptr().cast(), val.len()) };
        if m >= 0 {
            val.truncate(m as usize);
            out.push((String::from_utf8_lossy(name).into_owned(), val));
        }
    }
    out
}

fn header_for(m: &fs::Metadata, ty: EntryType, size: u64) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(ty);
    h.set_mode(m.mode() & 0o7777);
    h.set_uid(u64::from(m.uid()));
    h.set_gid(u64::from(m.gid()));
    h.set_mtime(m.mtime().max(0) as u64);
    h.set_size(size);
    h
}

/// A PAX extended header (`x`) for the entry that follows, written as GNU tar writes one:
/// named `PaxHeaders/<name>`, with the entry's mode bits, owner and mtime filled in (the tar
/// crate leaves them empty, which BusyBox tar refuses as "invalid tar magic").
fn append_pax<W: Write>(
    tar: &mut Builder<W>,
    name: &Path,
    m: &fs::Metadata,
    records: &[(String, Vec<u8>)],
) -> io::Result<()> {
    let mut data = Vec::new();
    for (key, value) in records {
        // "<len> <key>=<value>\n", where <len> counts itself.
        let rest = 3 + key.len() + value.len();
        let mut len = rest + 1;
        while len.to_string().len() + rest > len {
            len += 1;
        }
        write!(data, "{len} {key}=")?;
        data.extend_from_slice(value);
        data.push(b'\n');
    }
    let mut h = Header::new_ustar();
    let base = name
        .file_name()
        .map_or_else(|| ".".into(), |n| n.to_string_lossy().into_owned());
    // The name is informative only; keep it within the 100-byte field.
    let mut pax_name = format!("PaxHeaders/{base}");
    while pax_name.len() > 99 {
        pax_name.pop();
    }
    h.set_path(&pax_name)?;
    h.set_mode(0o644);
    h.set_uid(u64::from(m.uid()));
    h.set_gid(u64::from(m.gid()));
    h.set_mtime(m.mtime().max(0) as u64);
    h.set_size(data.len() as u64);
    h.set_entry_type(EntryType::XHeader);
    h.set_cksum();
    tar.append(&h, data.as_slice())
}

/// A GNU long-name or long-link entry: `value` and a NUL, for the entry that follows.
fn append_long<W: Write>(tar: &mut Builder<W>, ty: EntryType, value: &[u8]) -> io::Result<()> {
    let mut h = Header::new_gnu();
    h.set_path("././@LongLink")?;
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(value.len() as u64 + 1);
    h.set_entry_type(ty);
    h.set_cksum();
    tar.append(&h, value.chain(&[0u8][..]))
}

struct Walk<W: Write> {
    tar: Builder<W>,
    links: HashMap<(u64, u64), PathBuf>,
}

impl<W: Write> Walk<W> {
    /// One entry, its name and link target written byte for byte. The tar crate's own
    /// writers normalise a link target (`/` became `//`, `a//b` `a/b`) and fail on a long
    /// name that starts with bytes that are not UTF-8; here a name or target longer than its
    /// 100-byte header field goes first in a GNU long-name (`L`) or long-link (`K`) entry, and
    /// the field keeps its first 100 bytes. Not in a PAX `path` record: the tar crate's reader
    /// splits PAX records at newlines, which names may hold (both are found by fuzzing).
    fn emit(
        &mut self,
        mut h: Header,
        name: &[u8],
        link: Option<&[u8]>,
        m: &fs::Metadata,
        recs: Vec<(String, Vec<u8>)>,
        data: impl Read,
    ) -> io::Result<()> {
        let old = h.as_old_mut();
        if name.len() > old.name.len() {
            append_long(&mut self.tar, EntryType::GNULongName, name)?;
        }
        let n = name.len().min(old.name.len());
        old.name[..n].copy_from_slice(&name[..n]);
        if let Some(link) = link {
            if link.len() > old.linkname.len() {
                append_long(&mut self.tar, EntryType::GNULongLink, link)?;
            }
            let n = link.len().min(old.linkname.len());
            old.linkname[..n].copy_from_slice(&link[..n]);
        }
        if !recs.is_empty() {
            append_pax(&mut self.tar, Path::new(OsStr::from_bytes(name)), m, &recs)?;
        }
        h.set_cksum();
        self.tar.append(&h, data)
    }

    fn entry(&mut self, path: &Path, rel: &Path) -> io::Result<()> {
        let m = match fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(_) => return Ok(()), // removed meanwhile
        };
        let ft = m.file_type();
        let name = if rel.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            rel.to_path_buf()
        };
        let recs: Vec<(String, Vec<u8>)> = xattrs(path)
            .into_iter()
            .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v))
            .collect();
        let target = if ft.is_symlink() {
            let t = fs::read_link(path).unwrap_or_default();
            Some(t.as_os_str().as_bytes().to_vec())
        } else {
            None
        };
        let name_bytes = name.as_os_str().as_bytes();
        if ft.is_dir() {
            let h = header_for(&m, EntryType::Directory, 0);
            self.emit(h, name_bytes, None, &m, recs, io::empty())?;
            let mut kids: Vec<_> = match fs::read_dir(path) {
                Ok(rd) => rd.filter_map(|e| e.ok()).map(|e| e.file_name()).collect(),
                Err(_) => return Ok(()),
            };
            kids.sort();
            for k in kids {
                self.entry(&path.join(&k), &rel.join(&k))?;
            }
        } else if let Some(target) = target {
            let h = header_for(&m, EntryType::Symlink, 0);
            self.emit(h, name_bytes, Some(&target), &m, recs, io::empty())?;
        } else if ft.is_file() {
            if m.nlink() > 1 {
                if let Some(first) = self.links.get(&(m.dev(), m.ino())) {
                    let h = header_for(&m, EntryType::Link, 0);
                    let first = first.clone();
                    let first = first.as_os_str().as_bytes();
                    return self.emit(h, name_bytes, Some(first), &m, recs, io::empty());
                }
                self.links.insert((m.dev(), m.ino()), name.clone());
            }
            let f = match File::open(path) {
                Ok(f) => f,
                Err(_) => return Ok(()),
            };
            let h = header_for(&m, EntryType::Regular, m.len());
            let data = Sized {
                inner: f,
                left: m.len(),
            };
            self.emit(h, name_bytes, None, &m, recs, data)?;
        } else if ft.is_char_device() || ft.is_block_device() {
            // Whiteouts are char 0/0.
            let ty = if ft.is_char_device() {
                EntryType::Char
            } else {
                EntryType::Block
            };
            let mut h = header_for(&m, ty, 0);
            let rdev = m.rdev();
            h.set_device_major(libc::major(rdev))?;
            h.set_device_minor(libc::minor(rdev))?;
            self.emit(h, name_bytes, None, &m, recs, io::empty())?;
        } else if ft.is_fifo() {
            let h = header_for(&m, EntryType::Fifo, 0);
            self.emit(h, name_bytes, None, &m, recs, io::empty())?;
        }
        // Sockets are not archivable; they are skipped.
        Ok(())
    }
}

/// `sync`, then the upper layer as a tar in `DATA`… `EOF`.
pub fn run(s: &mut UnixStream, cfg: &Config) -> Result<(), ErrorInfo> {
    let upper = cfg.resolve(&cfg.upper.to_string_lossy())?;
    if let Err(e) = fs::symlink_metadata(&upper) {
        let mut info = ErrorInfo::io(&format!("capture {}", cfg.upper.display()), &e);
        if e.kind() == io::ErrorKind::NotFound {
            info.message = format!("no overlay upper layer at {}: boot the VM with an overlay root to capture its writes", cfg.upper.display());
        }
        return Err(info);
    }
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    // The frame writer sits under a `BufWriter` of one frame's size, so it sees frame-sized
    // slices, and `io::copy` (which the tar builder uses for file data) reads files straight
    // into that buffer: one copy from the file, one into the socket.
    let w = io::BufWriter::with_capacity(CHUNK, DataWriter::new(s));
    let mut walk = Walk {
        tar: Builder::new(w),
        links: HashMap::new(),
    };
    walk.tar.mode(tar::HeaderMode::Complete);
    walk.tar.follow_symlinks(false);
    let stream = |e: io::Error| ErrorInfo::io("capture", &e);
    walk.entry(&upper, Path::new("")).map_err(stream)?;
    let w = walk.tar.into_inner().map_err(stream)?;
    let w = w.into_inner().map_err(|e| stream(e.into_error()))?;
    w.finish().map_err(stream)?;
    Ok(())
}
