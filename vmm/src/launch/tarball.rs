//! A bounded, hostile-input reader of the tar streams vmrun consumes (captures, OCI layers):
//! GNU long names/links and PAX records are resolved here, by length as POSIX says (the tar
//! crate's own resolution cuts a PAX record at its first newline), and every entry comes out
//! as an [`Item`] whose path is relative, normalised and free of `..`, or as an error that
//! names the entry. The tar crate reads the headers; nothing here trusts a field of them.

use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use tar::EntryType;
use thiserror::Error;

/// Limits on what one stream may hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Entries (extension headers not counted).
    pub entries: u64,
    /// Bytes of a GNU long name/link or of one PAX header.
    pub extension: u64,
    /// Bytes of one path (PATH_MAX).
    pub path: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            entries: 2_000_000,
            extension: 1 << 20,
            path: 4096,
        }
    }
}

#[derive(Debug, Error)]
pub enum TarError {
    #[error("not a readable tar stream: {0}")]
    Io(#[source] io::Error),
    #[error("entry {path:?}: {why}")]
    Entry { path: String, why: String },
    #[error("more than {0} entries")]
    TooManyEntries(u64),
}

/// What an entry is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File {
        size: u64,
    },
    Symlink(Vec<u8>),
    /// A further name of a file earlier in the stream (its relative path).
    HardLink(PathBuf),
    Fifo,
    /// An overlayfs whiteout (char device 0/0): the path is deleted in lower layers.
    Whiteout,
    /// Another character or block device.
    Device {
        block: bool,
        major: u32,
        minor: u32,
    },
}

/// One entry, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    /// Relative, normalised (`.` components and leading `/`-less), never `..`; empty for the
    /// stream's root (`.`).
    pub path: PathBuf,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    /// From PAX `SCHILY.xattr.NAME` records, in stream order.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Where the entry's data starts in the stream (for reading a file of a tar on disk in
    /// place).
    pub offset: u64,
}

fn entry_err(path: &[u8], why: impl Into<String>) -> TarError {
    TarError::Entry {
        path: String::from_utf8_lossy(path).into_owned(),
        why: why.into(),
    }
}

/// A tar path made safe: relative, no `..`, `.` components dropped. Absolute and `..` paths
/// are refused, not rewritten: a stream holding them was not made by vmrun or a sane tool.
pub fn safe_path(raw: &[u8], limits: &Limits) -> Result<PathBuf, TarError> {
    use std::os::unix::ffi::OsStrExt;
    if raw.len() > limits.path {
        return Err(entry_err(
            &raw[..raw.len().min(64)],
            format!("a path of {} bytes (at most {})", raw.len(), limits.path),
        ));
    }
    if raw.contains(&0) {
        return Err(entry_err(raw, "a path with a NUL byte"));
    }
    let p = Path::new(std::ffi::OsStr::from_bytes(raw));
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => {
                if n.len() > 255 {
                    return Err(entry_err(raw, "a name longer than 255 bytes"));
                }
                out.push(n)
            }
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(entry_err(
                    raw,
                    "an absolute path; layers and images hold paths relative to their root",
                ))
            }
            Component::ParentDir => {
                return Err(entry_err(
                    raw,
                    "a `..` component, which would leave the tree",
                ))
            }
        }
    }
    Ok(out)
}

/// PAX records (`<len> <key>=<value>\n`, `len` counting the whole record), by length.
pub fn pax_records(data: &[u8]) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        // Some writers pad the header's data with NULs.
        if rest.iter().all(|&b| b == 0) {
            break;
        }
        let sp = rest
            .iter()
            .take(20)
            .position(|&b| b == b' ')
            .ok_or("a PAX record without its length")?;
        let len: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("a PAX record length that is not a number")?;
        if len <= sp + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(format!("a PAX record of a wrong length ({len})"));
        }
        let rec = &rest[sp + 1..len - 1];
        let eq = rec
            .iter()
            .position(|&b| b == b'=')
            .ok_or("a PAX record without `=`")?;
        let key = String::from_utf8(rec[..eq].to_vec()).map_err(|_| "a PAX key not in UTF-8")?;
        out.push((key, rec[eq + 1..].to_vec()));
        rest = &rest[len..];
    }
    Ok(out)
}

fn read_bounded(r: &mut impl Read, size: u64, max: u64, path: &[u8]) -> Result<Vec<u8>, TarError> {
    if size > max {
        return Err(entry_err(
            path,
            format!("an extension header of {size} bytes (at most {max})"),
        ));
    }
    let mut v = Vec::with_capacity(size as usize);
    r.take(size).read_to_end(&mut v).map_err(TarError::Io)?;
    Ok(v)
}

fn strip_nul(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

/// Calls `f` with each entry of `r` and a reader of its data (a regular file's contents,
/// else empty). Stops at the first error, `f`'s included.
pub fn for_each<R: Read, E: From<TarError>>(
    r: R,
    limits: &Limits,
    mut f: impl FnMut(Item, &mut dyn Read) -> Result<(), E>,
) -> Result<(), E> {
    let mut ar = tar::Archive::new(r);
    let entries = ar.entries().map_err(TarError::Io)?.raw(true);
    let mut long_name: Option<Vec<u8>> = None;
    let mut long_link: Option<Vec<u8>> = None;
    let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
    let mut global: Vec<(String, Vec<u8>)> = Vec::new();
    let mut count = 0u64;
    for e in entries {
        let mut e = e.map_err(TarError::Io)?;
        let h = e.header().clone();
        let ty = h.entry_type();
        let raw_path = h.path_bytes().into_owned();
        let size = h.entry_size().map_err(TarError::Io)?;
        match ty {
            EntryType::GNULongName | EntryType::GNULongLink => {
                let v = strip_nul(read_bounded(&mut e, size, limits.extension, &raw_path)?);
                if ty == EntryType::GNULongName {
                    long_name = Some(v);
                } else {
                    long_link = Some(v);
                }
                continue;
            }
            EntryType::XHeader | EntryType::XGlobalHeader => {
                let data = read_bounded(&mut e, size, limits.extension, &raw_path)?;
                let recs = pax_records(&data).map_err(|why| entry_err(&raw_path, why))?;
                if ty == EntryType::XHeader {
                    pax.extend(recs);
                } else {
                    global.extend(recs);
                }
                continue;
            }
            _ => {}
        }
        count += 1;
        if count > limits.entries {
            return Err(TarError::TooManyEntries(limits.entries).into());
        }
        let recs: Vec<(String, Vec<u8>)> = global
            .iter()
            .cloned()
            .chain(std::mem::take(&mut pax))
            .collect();
        let pax_value = |key: &str| {
            recs.iter()
                .rev()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        };
        let name = pax_value("path").or(long_name.take()).unwrap_or(raw_path);
        let link = pax_value("linkpath")
            .or(long_link.take())
            .or_else(|| h.link_name_bytes().map(|l| l.into_owned()));
        let path = safe_path(&name, limits)?;
        let num = |key: &str, field: io::Result<u64>| -> Result<u64, TarError> {
            match pax_value(key) {
                Some(v) => std::str::from_utf8(&v)
                    .ok()
                    .and_then(|s| s.split('.').next()?.parse().ok())
                    .ok_or_else(|| entry_err(&name, format!("a PAX {key} that is not a number"))),
                None => field.map_err(|e| entry_err(&name, format!("its {key}: {e}"))),
            }
        };
        let uid = num("uid", h.uid())?;
        let gid = num("gid", h.gid())?;
        let mtime = num("mtime", h.mtime())?;
        // The tar crate finds the next header from the header's size field.
        if num("size", Ok(size))? != size {
            return Err(entry_err(&name, "a PAX size that differs from its header's").into());
        }
        let mode = h
            .mode()
            .map_err(|e| entry_err(&name, format!("its mode: {e}")))?
            & 0o7777;
        let xattrs = recs
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("SCHILY.xattr.")
                    .map(|n| (n.as_bytes().to_vec(), v.clone()))
            })
            .collect();
        let kind = match ty {
            EntryType::Directory => Kind::Dir,
            EntryType::Regular | EntryType::Continuous => Kind::File { size },
            EntryType::Symlink => {
                let l = link.ok_or_else(|| entry_err(&name, "a symlink without a target"))?;
                if l.is_empty() || l.contains(&0) || l.len() > limits.path {
                    return Err(entry_err(
                        &name,
                        "a symlink target that is empty, too long or holds NUL",
                    )
                    .into());
                }
                Kind::Symlink(l)
            }
            EntryType::Link => {
                let l = link.ok_or_else(|| entry_err(&name, "a hard link without a target"))?;
                let target = safe_path(&l, limits).map_err(|_| {
                    entry_err(
                        &name,
                        format!(
                            "a hard link to {:?}, outside the tree",
                            String::from_utf8_lossy(&l)
                        ),
                    )
                })?;
                if target.as_os_str().is_empty() {
                    return Err(entry_err(&name, "a hard link to the root").into());
                }
                Kind::HardLink(target)
            }
            EntryType::Fifo => Kind::Fifo,
            EntryType::Char | EntryType::Block => {
                let major = h.device_major().ok().flatten().unwrap_or(0);
                let minor = h.device_minor().ok().flatten().unwrap_or(0);
                if ty == EntryType::Char && major == 0 && minor == 0 {
                    Kind::Whiteout
                } else {
                    Kind::Device {
                        block: ty == EntryType::Block,
                        major,
                        minor,
                    }
                }
            }
            other => {
                return Err(entry_err(
                    &name,
                    format!(
                        "an entry of type {:?} ({}), which vmrun does not read",
                        other,
                        other.as_byte() as char
                    ),
                )
                .into())
            }
        };
        let item = Item {
            path,
            kind,
            mode,
            uid,
            gid,
            mtime,
            xattrs,
            offset: e.raw_file_position(),
        };
        if matches!(item.kind, Kind::File { .. }) {
            f(item, &mut e)?;
        } else {
            f(item, &mut io::empty())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::default()
    }

    #[test]
    fn paths_are_made_relative_or_refused() {
        let l = limits();
        assert_eq!(safe_path(b"./a/./b/", &l).unwrap(), PathBuf::from("a/b"));
        assert_eq!(safe_path(b".", &l).unwrap(), PathBuf::new());
        for bad in [&b"/etc/passwd"[..], b"a/../../x", b"..", b"a\0b"] {
            assert!(safe_path(bad, &l).is_err(), "{bad:?}");
        }
        assert!(safe_path(&[b'a'; 5000], &l).is_err());
        assert!(safe_path(&[b'a'; 256], &l).is_err());
    }

    #[test]
    fn pax_records_are_read_by_length_newlines_and_all() {
        let value = b"a\nb=c";
        let rec = format!("{} path=", 3 + 5 + value.len() + 1);
        let mut data = rec.into_bytes();
        data.extend_from_slice(value);
        data.push(b'\n');
        data.extend_from_slice(b"10 uid=42\n\0\0");
        let r = pax_records(&data).unwrap();
        assert_eq!(r[0], ("path".to_string(), value.to_vec()));
        assert_eq!(r[1], ("uid".to_string(), b"42".to_vec()));
        for bad in [&b"99 path=x\n"[..], b"x path=y\n", b"5 ab\n", b"1 \n"] {
            assert!(pax_records(bad).is_err(), "{bad:?}");
        }
    }

    fn tar_of(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn header(ty: EntryType, name: &[u8], size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(ty);
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(size);
        h.set_cksum();
        h
    }

    fn items(tar: &[u8]) -> Result<Vec<Item>, TarError> {
        let mut v = Vec::new();
        for_each(tar, &limits(), |i, r| {
            let mut d = Vec::new();
            r.read_to_end(&mut d).map_err(TarError::Io)?;
            if let Kind::File { size } = i.kind {
                if d.len() as u64 != size {
                    return Err(TarError::Io(io::ErrorKind::UnexpectedEof.into()));
                }
            }
            v.push(i);
            Ok::<(), TarError>(())
        })?;
        Ok(v)
    }

    #[test]
    fn entries_long_names_and_pax_are_resolved() {
        let long = [vec![b'x'; 150], b"/".to_vec(), vec![b'y'; 150]].concat();
        let t = tar_of(|b| {
            b.append(&header(EntryType::Directory, b"./d/", 0), io::empty())
                .unwrap();
            b.append(
                &header(
                    EntryType::GNULongName,
                    b"././@LongLink",
                    long.len() as u64 + 1,
                ),
                &[&long[..], b"\0"].concat()[..],
            )
            .unwrap();
            b.append(&header(EntryType::Regular, b"xxx", 3), &b"abc"[..])
                .unwrap();
            let pax = b"27 SCHILY.xattr.user.k=v\nx\n";
            b.append(
                &header(EntryType::XHeader, b"PaxHeaders/w", pax.len() as u64),
                &pax[..],
            )
            .unwrap();
            b.append(&header(EntryType::Char, b"d/w", 0), io::empty())
                .unwrap();
        });
        let v = items(&t).unwrap();
        assert_eq!(v[0].path, PathBuf::from("d"));
        assert_eq!(v[0].kind, Kind::Dir);
        assert_eq!(v[1].path, PathBuf::from(String::from_utf8(long).unwrap()));
        assert_eq!(v[1].kind, Kind::File { size: 3 });
        assert_eq!(v[2].kind, Kind::Whiteout);
        assert_eq!(v[2].xattrs, vec![(b"user.k".to_vec(), b"v\nx".to_vec())]);
    }

    #[test]
    fn hostile_entries_are_refused_by_name() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                tar_of(|b| {
                    b.append(&header(EntryType::Regular, b"/etc/x", 0), io::empty())
                        .unwrap()
                }),
                "absolute",
            ),
            (
                tar_of(|b| {
                    b.append(&header(EntryType::Regular, b"a/../../x", 0), io::empty())
                        .unwrap()
                }),
                "..",
            ),
            (
                tar_of(|b| {
                    let mut h = header(EntryType::Link, b"l", 0);
                    h.as_old_mut().linkname[..11].copy_from_slice(b"../../etc/x");
                    h.set_cksum();
                    b.append(&h, io::empty()).unwrap()
                }),
                "outside the tree",
            ),
            (
                tar_of(|b| {
                    b.append(
                        &header(EntryType::GNULongName, b"L", 1 << 21),
                        io::repeat(b'a').take(1 << 21),
                    )
                    .unwrap()
                }),
                "extension header",
            ),
            (
                tar_of(|b| {
                    b.append(&header(EntryType::GNUSparse, b"s", 0), io::empty())
                        .unwrap()
                }),
                "does not read",
            ),
        ];
        for (t, want) in cases {
            let e = items(&t).unwrap_err().to_string();
            assert!(e.contains(want), "{e} should say {want}");
        }
        // A stream cut in the middle of a file is an error, not a short file.
        let t = tar_of(|b| {
            b.append(
                &header(EntryType::Regular, b"f", 5000),
                io::repeat(1).take(5000),
            )
            .unwrap()
        });
        assert!(items(&t[..2048]).is_err());
    }

    #[test]
    fn the_entry_count_is_bounded() {
        let t = tar_of(|b| {
            for i in 0..5 {
                b.append(
                    &header(EntryType::Directory, format!("d{i}").as_bytes(), 0),
                    io::empty(),
                )
                .unwrap();
            }
        });
        let l = Limits {
            entries: 4,
            ..limits()
        };
        let r = for_each(&t[..], &l, |_, _| Ok::<(), TarError>(()));
        assert!(matches!(r, Err(TarError::TooManyEntries(4))));
    }
}
