//! Trees in and out as tar streams (what `vmrun cp` moves): `out` archives a file or directory
//! (symlinks kept as links, never followed), `in` unpacks a client's tar into a directory,
//! refusing any entry that would land outside it.

use std::fs;
use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::path::Path;

use tar::{Archive, Builder, EntryType};
use vmrun_protocol::agent::{
    kind, write_frame, DataReader, DataWriter, ErrorInfo, ErrorKind, CHUNK,
};

use crate::config::Config;
use crate::error::{connection, err};

/// `DATA`… `EOF`: a tar of `path`, its entries named from the path's last component.
pub fn out(s: &mut UnixStream, cfg: &Config, path: &str) -> Result<(), ErrorInfo> {
    let p = cfg.resolve(path)?;
    let m = fs::symlink_metadata(&p).map_err(|e| ErrorInfo::io(&format!("archive {path}"), &e))?;
    let name = match p.file_name() {
        Some(n) => n.to_os_string(),
        None => ".".into(),
    };
    let w = io::BufWriter::with_capacity(CHUNK, DataWriter::new(s));
    let mut tar = Builder::new(w);
    tar.mode(tar::HeaderMode::Complete);
    tar.follow_symlinks(false);
    let stream = |e: io::Error| ErrorInfo::io(&format!("archive {path}"), &e);
    if m.is_dir() {
        tar.append_dir_all(&name, &p).map_err(stream)?;
    } else {
        tar.append_path_with_name(&p, &name).map_err(stream)?;
    }
    let w = tar.into_inner().map_err(stream)?;
    let w = w.into_inner().map_err(|e| stream(e.into_error()))?;
    w.finish().map_err(|e| connection("archive", &e))?;
    Ok(())
}

/// `OK`, the client's tar unpacked into the directory `path`, then `OK` with the count of
/// entries and of file bytes.
pub fn r#in(
    s: &mut UnixStream,
    cfg: &Config,
    path: &str,
    buf: &mut Vec<u8>,
) -> Result<(), ErrorInfo> {
    let dst = cfg.resolve(path)?;
    fs::create_dir_all(&dst).map_err(|e| ErrorInfo::io(&format!("unpack into {path}"), &e))?;
    if !dst.is_dir() {
        return Err(err(
            ErrorKind::NotADirectory,
            libc::ENOTDIR,
            format!("unpack into {path}: not a directory"),
        ));
    }
    write_frame(s, kind::OK, &[]).map_err(|e| connection("unpack", &e))?;
    let mut data = DataReader::new(&mut *s, buf);
    let (entries, bytes) = unpack(&mut data, &dst, path)?;
    // Whatever follows the tar's end marker, up to EOF, is read and dropped.
    io::copy(&mut data, &mut io::sink()).map_err(|e| connection("unpack", &e))?;
    let mut reply = entries.to_le_bytes().to_vec();
    reply.extend_from_slice(&bytes.to_le_bytes());
    write_frame(s, kind::OK, &reply).map_err(|e| connection("unpack", &e))
}

fn unpack(src: impl Read, dst: &Path, path: &str) -> Result<(u64, u64), ErrorInfo> {
    let ctx = |e: io::Error| ErrorInfo::io(&format!("unpack into {path}"), &e);
    let mut a = Archive::new(src);
    a.set_preserve_permissions(true);
    a.set_overwrite(true);
    a.set_unpack_xattrs(false);
    let (mut entries, mut bytes) = (0u64, 0u64);
    for e in a.entries().map_err(ctx)? {
        let mut e = e.map_err(ctx)?;
        let size = e.header().size().unwrap_or(0);
        let regular = e.header().entry_type() == EntryType::Regular;
        // `unpack_in` refuses `..`, absolute paths and parents reached through symlinks.
        if !e.unpack_in(dst).map_err(ctx)? {
            let name = e
                .path()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            return Err(err(
                ErrorKind::InvalidInput,
                0,
                format!("unpack into {path}: entry {name:?} would land outside it"),
            ));
        }
        entries += 1;
        if regular {
            bytes += size;
        }
    }
    Ok((entries, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = Builder::new(Vec::new());
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(EntryType::Regular);
            // Written raw so hostile names reach the reader as they are.
            let raw = h.as_old_mut();
            raw.name[..name.len()].copy_from_slice(name.as_bytes());
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn unpacks_inside_and_refuses_escapes() {
        let d = tempfile::tempdir().unwrap();
        let t = tar_of(&[("a/b.txt", b"hello"), ("c.txt", b"x")]);
        assert_eq!(unpack(t.as_slice(), d.path(), "/d").unwrap(), (2, 6));
        assert_eq!(fs::read(d.path().join("a/b.txt")).unwrap(), b"hello");
        let t = tar_of(&[("../escape.txt", b"no")]);
        let e = unpack(t.as_slice(), d.path(), "/d").unwrap_err();
        assert!(e.message.contains("would land outside"), "{e}");
        assert!(!d.path().parent().unwrap().join("escape.txt").exists());
        // An absolute name lands inside, made relative.
        let t = tar_of(&[("/abs.txt", b"in")]);
        assert_eq!(unpack(t.as_slice(), d.path(), "/d").unwrap(), (1, 2));
        assert_eq!(fs::read(d.path().join("abs.txt")).unwrap(), b"in");
        // A symlink in the tree cannot carry a later entry outside.
        let mut b = Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        b.append_link(&mut h, "out", "/tmp").unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_mode(0o644);
        b.append_data(&mut h, "out/planted.txt", &b"no"[..])
            .unwrap();
        let t = b.into_inner().unwrap();
        assert!(unpack(t.as_slice(), d.path(), "/d").is_err());
        assert!(!Path::new("/tmp/planted.txt").exists());
    }
}
