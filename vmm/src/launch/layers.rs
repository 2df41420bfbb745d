//! Read-only layers from captures: `--layer CAPTURE.tar` stacks a captured upper layer above
//! the base image. Each tar becomes an erofs image once, cached by the tar's SHA-256 under
//! `<cache>/layers/`, and is attached as a read-only disk; vmrun-init stacks the disks
//! (`root.layers=`). A tar is unpacked into a private staging directory by vmrun's own
//! bounded reader ([`super::tarball`]), keeping what overlayfs reads in a lower layer
//! (whiteouts as char 0/0, the opaque mark as `trusted.overlay.opaque`), then packed by
//! `mkfs.erofs` (erofs-utils 1.5, which predates its `--tar` mode). The tar and the base
//! image are only read.

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};
use thiserror::Error;

use super::tarball::{self, Item, Kind, Limits, TarError};

/// Layers one VM may stack (each is a disk, and disks share the VM's 19 device IRQs).
pub const MAX_LAYERS: usize = 8;
const EROFS_MAGIC: u32 = 0xe0f5_e1e2;
/// The xattrs a layer keeps: the user's (a namespace), file capabilities and overlayfs' opaque
/// mark (exact names). Others (overlay bookkeeping such as `trusted.overlay.origin`, SELinux
/// labels) describe the VM that wrote them, not the layer, and are dropped.
fn kept_xattr(name: &[u8]) -> bool {
    name.starts_with(b"user.")
        || name == b"security.capability"
        || name == b"trusted.overlay.opaque"
}

#[derive(Debug, Error)]
pub enum LayerError {
    #[error("--layer {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("--layer {path}: {source}")]
    Tar {
        path: PathBuf,
        #[source]
        source: TarError,
    },
    #[error("--layer {path}: entry {entry:?}: {why}")]
    Unpack {
        path: PathBuf,
        entry: PathBuf,
        why: String,
    },
    #[error("{0} layers given; a VM stacks at most {MAX_LAYERS} (combine some with `vmrun commit`, or drop some)")]
    TooMany(usize),
    #[error("cannot use the layer cache {dir}: {source}")]
    Cache {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("mkfs.erofs is missing: apt-get install erofs-utils (it packs captured layers)")]
    NoMkfs,
    #[error("--layer {path}: mkfs.erofs failed: {why}")]
    Mkfs { path: PathBuf, why: String },
}

/// The failure of one tar while unpacking (the caller names the tar).
#[derive(Debug, Error)]
pub enum Step {
    #[error(transparent)]
    Tar(#[from] TarError),
    #[error("entry {0:?}: {1}")]
    Entry(PathBuf, String),
}

/// How a tar's whiteouts are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Whiteouts {
    /// Kept as overlayfs reads them in a lower layer (a capture becoming a layer of its own,
    /// unpacked into an empty tree).
    Keep,
    /// Applied to the tree already there (layers flattened into one tree, bottom first):
    /// overlayfs' whiteouts (char 0/0) and OCI's (`.wh.NAME`) delete what earlier layers
    /// put there, and opaque directories (`trusted.overlay.opaque`, `.wh..wh..opq`) drop
    /// what earlier layers put in them.
    Apply,
}

/// OCI's whiteout prefix, and its opaque-directory marker.
const WH_PREFIX: &[u8] = b".wh.";
const WH_OPAQUE: &[u8] = b".wh..wh..opq";
/// Bytes of path one applied layer may write (what it wrote is kept until its end, so that
/// its opaque directories keep it).
const WRITTEN_BUDGET: usize = 64 << 20;

/// The paths one applied layer wrote, with their ancestors.
struct Written {
    paths: std::collections::HashSet<PathBuf>,
    bytes: usize,
}

impl Written {
    fn add(&mut self, rel: &Path) -> Result<(), String> {
        for a in rel.ancestors() {
            if a.as_os_str().is_empty() || self.paths.contains(a) {
                break;
            }
            self.bytes += a.as_os_str().len() + 1;
            if self.bytes > WRITTEN_BUDGET {
                return Err(format!(
                    "the layer writes more than {} MiB of paths",
                    WRITTEN_BUDGET >> 20
                ));
            }
            self.paths.insert(a.to_path_buf());
        }
        Ok(())
    }
}

/// `rel` in `root` when it and the directories above it exist and those are directories;
/// `None` when something on the way is missing. Never passes through a symlink.
fn existing(root: &Path, rel: &Path) -> Result<Option<PathBuf>, String> {
    match parents(root, rel, false) {
        Ok(()) => {}
        Err(e) if e == MISSING => return Ok(None),
        Err(e) => return Err(e),
    }
    let p = root.join(rel);
    Ok(fs::symlink_metadata(&p).is_ok().then_some(p))
}

/// Removes whatever is at `p` (a directory with all it holds; a symlink itself).
fn remove_any(p: &Path) -> Result<(), String> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p).map_err(|e| e.to_string()),
        Ok(_) => fs::remove_file(p).map_err(|e| e.to_string()),
        Err(_) => Ok(()),
    }
}

/// Drops from the directory `rel` everything the layer being applied did not write.
fn make_opaque(root: &Path, rel: &Path, written: &Written) -> Result<(), String> {
    let Some(dir) = existing(root, rel)? else {
        return Ok(());
    };
    if !fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
        return Ok(());
    }
    for e in fs::read_dir(&dir).map_err(|e| e.to_string())? {
        let e = e.map_err(|e| e.to_string())?;
        let child = rel.join(e.file_name());
        if !written.paths.contains(&child) {
            remove_any(&e.path())?;
        } else if e.file_type().is_ok_and(|t| t.is_dir()) {
            make_opaque(root, &child, written)?;
        }
    }
    Ok(())
}

/// Whether `path` holds an erofs filesystem (an already built layer).
pub fn is_erofs(path: &Path) -> bool {
    let mut sb = [0u8; 1028];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut sb))
        .is_ok()
        && u32::from_le_bytes([sb[1024], sb[1025], sb[1026], sb[1027]]) == EROFS_MAGIC
}

/// The cached layer images for `sources` (tars or built images), bottom layer first.
pub fn images_for(sources: &[PathBuf]) -> Result<Vec<PathBuf>, LayerError> {
    if sources.len() > MAX_LAYERS {
        return Err(LayerError::TooMany(sources.len()));
    }
    let dir = super::images::cache_dir().join("layers");
    sources.iter().map(|s| image_for(s, &dir)).collect()
}

/// SHA-256 of a file, hex.
fn sha256_of(path: &Path) -> io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// Lower-case hex of `bytes` (how digests are written in file names and manifests).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The layer image of `src` in `cache`, built if it is not there yet.
pub fn image_for(src: &Path, cache: &Path) -> Result<PathBuf, LayerError> {
    let open = |source| LayerError::Open {
        path: src.to_path_buf(),
        source,
    };
    let meta = fs::metadata(src).map_err(open)?;
    if !meta.is_file() {
        return Err(open(io::Error::other(
            "not a file; give a capture tar (vmrun capture) or a built layer image",
        )));
    }
    if is_erofs(src) {
        return Ok(src.to_path_buf());
    }
    let sha = sha256_of(src).map_err(open)?;
    let out = cache.join(format!("{sha}.erofs"));
    if out.is_file() {
        return Ok(out);
    }
    let cache_err = |source| LayerError::Cache {
        dir: cache.to_path_buf(),
        source,
    };
    fs::create_dir_all(cache).map_err(cache_err)?;
    // Staging and the unfinished image live in the cache and go when dropped, on any error.
    let stage = tempfile::Builder::new()
        .prefix(".stage-")
        .tempdir_in(cache)
        .map_err(cache_err)?;
    let tree = stage.path().join("tree");
    fs::create_dir(&tree).map_err(cache_err)?;
    let f = File::open(src).map_err(open)?;
    unpack_into(src, io::BufReader::new(f), &tree)?;
    let tmp = stage.path().join("layer.erofs");
    mkfs(&tree, &tmp).map_err(|e| match e {
        None => LayerError::NoMkfs,
        Some(why) => LayerError::Mkfs {
            path: src.to_path_buf(),
            why,
        },
    })?;
    fs::rename(&tmp, &out).map_err(cache_err)?;
    Ok(out)
}

/// `mkfs.erofs` over `tree`: uncompressed (decompression would be guest ring-0 work, which is
/// emulated on PVM hosts), mtimes kept. `None`: the tool is missing.
pub fn mkfs(tree: &Path, image: &Path) -> Result<(), Option<String>> {
    let out = Command::new("mkfs.erofs")
        .arg("--quiet")
        .arg("--preserve-mtime")
        .arg(image)
        .arg(tree)
        .output()
        .map_err(|e| (e.kind() != io::ErrorKind::NotFound).then(|| e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Some(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn cstr(p: &Path) -> Result<CString, String> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| "a path with a NUL byte".to_string())
}

/// What [`parents`] says when asked not to create and a directory is missing.
const MISSING: &str = "a directory above it is missing";

/// Makes the directories above `rel` in `root`, refusing to pass through anything that is
/// not a directory (a symlink an earlier entry made, above all).
fn parents(root: &Path, rel: &Path, create: bool) -> Result<(), String> {
    let mut at = root.to_path_buf();
    let Some(parent) = rel.parent() else {
        return Ok(());
    };
    for c in parent.components() {
        at.push(c);
        match fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_dir() => {}
            Ok(_) => {
                return Err(format!(
                    "goes through {}, which is not a directory here",
                    at.strip_prefix(root).unwrap_or(&at).display()
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                fs::create_dir(&at).map_err(|e| e.to_string())?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(MISSING.into()),
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}

/// Removes what is at `p` unless both it and the new entry are directories (a later entry
/// for a path replaces the earlier, as tar extracts).
fn clear(p: &Path, new_is_dir: bool) -> Result<bool, String> {
    match fs::symlink_metadata(p) {
        Err(_) => Ok(false),
        Ok(m) if m.is_dir() && new_is_dir => Ok(true),
        Ok(m) if m.is_dir() => fs::remove_dir_all(p)
            .map(|_| false)
            .map_err(|e| e.to_string()),
        Ok(_) => fs::remove_file(p).map(|_| false).map_err(|e| e.to_string()),
    }
}

fn mknod(p: &Path, kind: libc::mode_t, mode: u32) -> Result<(), String> {
    let c = cstr(p)?;
    // SAFETY: a NUL-terminated path; mknod reads nothing else from memory.
    let rc = unsafe { libc::mknod(c.as_ptr(), kind | (mode & 0o777), 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error().to_string())
    }
}

fn set_xattr(p: &Path, name: &[u8], value: &[u8]) -> Result<(), String> {
    let c = cstr(p)?;
    let n = CString::new(name).map_err(|_| "an xattr name with a NUL byte".to_string())?;
    // SAFETY: NUL-terminated path and name; `value` is valid for `value.len()` bytes.
    let rc = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    let hint = if name.starts_with(b"trusted.") && e.raw_os_error() == Some(libc::EPERM) {
        " (trusted.* xattrs, overlayfs' opaque mark among them, need root)"
    } else {
        ""
    };
    Err(format!(
        "set xattr {}: {e}{hint}",
        String::from_utf8_lossy(name)
    ))
}

/// Owner, mode and times, not following a symlink.
fn set_meta(p: &Path, item: &Item, is_link: bool) -> Result<(), String> {
    let id = |v: u64, what| {
        u32::try_from(v)
            .ok()
            .filter(|&v| v != u32::MAX)
            .ok_or_else(|| format!("a {what} of {v}, out of range"))
    };
    std::os::unix::fs::lchown(p, Some(id(item.uid, "uid")?), Some(id(item.gid, "gid")?))
        .map_err(|e| format!("chown: {e}"))?;
    if !is_link {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(p, fs::Permissions::from_mode(item.mode))
            .map_err(|e| format!("chmod: {e}"))?;
    }
    let c = cstr(p)?;
    let t = libc::timespec {
        tv_sec: item.mtime.min(i64::MAX as u64) as libc::time_t,
        tv_nsec: 0,
    };
    let times = [t, t];
    // SAFETY: a NUL-terminated path and an array of two timespecs, as utimensat requires.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(format!("set times: {}", io::Error::last_os_error()));
    }
    Ok(())
}

/// Unpacks the tar `r` (the layer `src`, for messages) into `root`, an empty directory only
/// this process writes; nothing is written outside it.
pub fn unpack_into(src: &Path, r: impl Read, root: &Path) -> Result<(), LayerError> {
    unpack(r, root, &Limits::default(), Whiteouts::Keep)
        .map(|_| ())
        .map_err(|e| match e {
            Step::Tar(source) => LayerError::Tar {
                path: src.to_path_buf(),
                source,
            },
            Step::Entry(entry, why) => LayerError::Unpack {
                path: src.to_path_buf(),
                entry,
                why,
            },
        })
}

/// Unpacks the tar `r` into `root`, a directory only this process writes: empty for
/// [`Whiteouts::Keep`], the tree of the layers below for [`Whiteouts::Apply`]. Returns how
/// many device nodes were left out: a container image's (its `/dev` is covered by the guest's
/// devtmpfs) are skipped, a capture's refused.
pub fn unpack(
    r: impl Read,
    root: &Path,
    limits: &Limits,
    whiteouts: Whiteouts,
) -> Result<u64, Step> {
    let mut devices = 0u64;
    // Directories get their mode and times last: entries inside would change the times, and
    // a read-only mode would stop them.
    let mut dirs: Vec<(PathBuf, Item)> = Vec::new();
    let mut written = Written {
        paths: Default::default(),
        bytes: 0,
    };
    let apply = whiteouts == Whiteouts::Apply;
    tarball::for_each(r, limits, |item, data| {
        let rel = item.path.clone();
        let fail = |why: String| Step::Entry(rel.clone(), why);
        let p = root.join(&rel);
        if apply {
            if matches!(item.kind, Kind::Device { .. }) {
                devices += 1;
                return Ok(());
            }
            let name = rel.file_name().map_or(&b""[..], |n| n.as_bytes());
            let parent = rel.parent().unwrap_or(Path::new(""));
            if name == WH_OPAQUE {
                return make_opaque(root, parent, &written).map_err(fail);
            }
            let hidden = if let Some(n) = name.strip_prefix(WH_PREFIX) {
                Some(parent.join(std::ffi::OsStr::from_bytes(n)))
            } else if item.kind == Kind::Whiteout {
                Some(rel.clone())
            } else {
                None
            };
            if let Some(h) = hidden {
                // What this layer wrote itself stays: a whiteout hides the layers below.
                if !written.paths.contains(&h) {
                    if let Some(at) = existing(root, &h).map_err(fail)? {
                        remove_any(&at).map_err(fail)?;
                    }
                }
                return Ok(());
            }
            written.add(&rel).map_err(fail)?;
        }
        if rel.as_os_str().is_empty() {
            if item.kind != Kind::Dir {
                return Err(fail("the root of the tree is not a directory".into()));
            }
        } else {
            parents(root, &rel, true).map_err(fail)?;
            let exists = clear(&p, item.kind == Kind::Dir).map_err(fail)?;
            match &item.kind {
                Kind::Dir if exists => {}
                Kind::Dir => fs::create_dir(&p).map_err(|e| fail(e.to_string()))?,
                Kind::File { size } => {
                    let mut f = fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .custom_flags(libc::O_NOFOLLOW)
                        .open(&p)
                        .map_err(|e| fail(e.to_string()))?;
                    let n = io::copy(data, &mut f).map_err(|e| fail(e.to_string()))?;
                    if n != *size {
                        return Err(fail(format!(
                            "the stream ends inside it ({n} of {size} bytes)"
                        )));
                    }
                    f.flush().map_err(|e| fail(e.to_string()))?;
                }
                Kind::Symlink(target) => {
                    std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), &p)
                        .map_err(|e| fail(e.to_string()))?
                }
                Kind::HardLink(first) => {
                    let to = root.join(first);
                    match (parents(root, first, false), fs::symlink_metadata(&to)) {
                        (Ok(()), Ok(m)) if m.file_type().is_file() => {}
                        _ => {
                            return Err(fail(format!(
                                "a hard link to {}, which is not a file earlier in the tar",
                                first.display()
                            )))
                        }
                    }
                    fs::hard_link(&to, &p).map_err(|e| fail(e.to_string()))?;
                    // The first name's owner, mode and times are the file's.
                    return Ok(());
                }
                Kind::Fifo => mknod(&p, libc::S_IFIFO, item.mode).map_err(fail)?,
                Kind::Whiteout => mknod(&p, libc::S_IFCHR, 0).map_err(fail)?,
                Kind::Device {
                    block,
                    major,
                    minor,
                } => {
                    return Err(fail(format!(
                        "a {} device node ({major}:{minor}); layers hold no device nodes but \
                         whiteouts (the guest's /dev is its own devtmpfs)",
                        if *block { "block" } else { "character" }
                    )))
                }
            }
        }
        for (name, value) in &item.xattrs {
            if apply && name == b"trusted.overlay.opaque" {
                if item.kind == Kind::Dir && value == b"y" {
                    make_opaque(root, &rel, &written).map_err(fail)?;
                }
            } else if kept_xattr(name) {
                set_xattr(&p, name, value).map_err(fail)?;
            }
        }
        match item.kind {
            Kind::Dir => dirs.push((p, item)),
            Kind::Whiteout => {}
            Kind::Symlink(_) => set_meta(&p, &item, true).map_err(fail)?,
            _ => set_meta(&p, &item, false).map_err(fail)?,
        }
        Ok(())
    })?;
    for (p, item) in dirs.iter().rev() {
        // A later entry of the stream may have replaced the directory.
        if !fs::symlink_metadata(p).is_ok_and(|m| m.is_dir()) {
            continue;
        }
        set_meta(p, item, false).map_err(|why| Step::Entry(item.path.clone(), why))?;
    }
    Ok(devices)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    /// What kind of thing is at `p`.
    fn describe(p: &Path) -> Option<&'static str> {
        let m = fs::symlink_metadata(p).ok()?;
        let t = m.file_type();
        Some(if t.is_dir() {
            "dir"
        } else if t.is_symlink() {
            "symlink"
        } else if t.is_char_device() {
            "char"
        } else if t.is_fifo() {
            "fifo"
        } else {
            "file"
        })
    }

    fn header(ty: tar::EntryType, name: &str, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(ty);
        h.set_path(name).unwrap();
        h.set_mode(0o755);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(size);
        h.set_mtime(1_000_000);
        h.set_cksum();
        h
    }

    fn tar_of(entries: &[(tar::EntryType, &str, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (ty, name, data, link) in entries {
            let mut h = header(*ty, name, data.len() as u64);
            if let Some(l) = link {
                h.set_link_name(l).unwrap();
                h.set_cksum();
            }
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn unpack_into(t: &[u8]) -> (tempfile::TempDir, Result<(), Step>) {
        let d = tempfile::tempdir().unwrap();
        let r = unpack(t, d.path(), &Limits::default(), Whiteouts::Keep).map(|_| ());
        (d, r)
    }

    use tar::EntryType as T;

    #[test]
    fn a_tar_unpacks_with_links_fifos_and_whiteouts() {
        let t = tar_of(&[
            (T::Directory, "etc", b"", None),
            (T::Regular, "etc/hostname", b"box\n", None),
            (T::Link, "etc/again", b"", Some("etc/hostname")),
            (T::Symlink, "etc/link", b"", Some("/etc/hostname")),
            (T::Fifo, "p", b"", None),
            (T::Char, "gone", b"", None),
            (T::Regular, "deep/er/file", b"x", None),
        ]);
        let (d, r) = unpack_into(&t);
        r.map_err(|e| format!("{e:?}")).unwrap();
        let p = d.path();
        assert_eq!(fs::read(p.join("etc/again")).unwrap(), b"box\n");
        assert_eq!(
            fs::read_link(p.join("etc/link")).unwrap(),
            PathBuf::from("/etc/hostname")
        );
        assert_eq!(describe(&p.join("p")), Some("fifo"));
        assert_eq!(describe(&p.join("gone")), Some("char"));
        assert_eq!(fs::read(p.join("deep/er/file")).unwrap(), b"x");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(fs::metadata(p.join("etc")).unwrap().mtime(), 1_000_000);
    }

    #[test]
    fn applied_layers_delete_and_hide_what_is_below() {
        let d = tempfile::tempdir().unwrap();
        let base = tar_of(&[
            (T::Directory, "d", b"", None),
            (T::Regular, "d/old", b"1", None),
            (T::Directory, "d/sub", b"", None),
            (T::Regular, "d/sub/deep", b"2", None),
            (T::Regular, "f", b"3", None),
            (T::Regular, "g", b"4", None),
        ]);
        unpack(&base[..], d.path(), &Limits::default(), Whiteouts::Apply).unwrap();
        // Overlayfs' form: a char 0/0 whiteout and an opaque mark; the layer's own entries in
        // the opaque directory stay whichever comes first.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = header(T::Regular, "d/sub/mine", 1);
        b.append(&h, &b"m"[..]).unwrap();
        h = header(T::Directory, "d", 0);
        b.append_pax_extensions([("SCHILY.xattr.trusted.overlay.opaque", &b"y"[..])])
            .unwrap();
        b.append(&h, io::empty()).unwrap();
        b.append(&header(T::Char, "f", 0), io::empty()).unwrap();
        b.append(&header(T::Regular, ".wh.g", 0), io::empty())
            .unwrap();
        b.append(&header(T::Regular, ".wh.never-there", 0), io::empty())
            .unwrap();
        let top = b.into_inner().unwrap();
        unpack(&top[..], d.path(), &Limits::default(), Whiteouts::Apply)
            .map_err(|e| e.to_string())
            .unwrap();
        let p = d.path();
        assert!(!p.join("d/old").exists() && !p.join("d/sub/deep").exists());
        assert_eq!(fs::read(p.join("d/sub/mine")).unwrap(), b"m");
        assert_eq!(describe(&p.join("f")), None);
        assert_eq!(describe(&p.join("g")), None);
        assert_eq!(describe(&p.join(".wh.g")), None);
        assert_eq!(xattr_of(&p.join("d")), None);
    }

    fn xattr_of(p: &Path) -> Option<Vec<u8>> {
        let c = cstr(p).unwrap();
        let mut buf = [0u8; 16];
        // SAFETY: NUL-terminated path and name; the buffer is valid for its length.
        let n = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                c"trusted.overlay.opaque".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        (n >= 0).then(|| buf[..n as usize].to_vec())
    }

    #[test]
    fn entries_that_would_write_outside_are_refused() {
        // A symlink made by one entry, then an entry written through it.
        let outside = tempfile::tempdir().unwrap();
        let through = tar_of(&[
            (
                T::Symlink,
                "lnk",
                b"",
                Some(outside.path().to_str().unwrap()),
            ),
            (T::Regular, "lnk/planted", b"x", None),
        ]);
        let (_d, r) = unpack_into(&through);
        match r {
            Err(Step::Entry(e, why)) => {
                assert_eq!(e, PathBuf::from("lnk/planted"));
                assert!(why.contains("not a directory"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        assert!(!outside.path().join("planted").exists());
        // A symlink replaced by a file, written with O_NOFOLLOW: the target is not touched.
        let victim = outside.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        let over = tar_of(&[
            (T::Symlink, "f", b"", Some(victim.to_str().unwrap())),
            (T::Regular, "f", b"new", None),
        ]);
        let (d, r) = unpack_into(&over);
        r.map_err(|e| format!("{e:?}")).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
        assert_eq!(fs::read(d.path().join("f")).unwrap(), b"new");
        // Hard links to what is not an earlier file of the tree.
        // Hard links to what is not an earlier file of the tree: missing, a directory, a
        // symlink (which could point anywhere).
        for link in ["etc/passwd", "d", "s"] {
            let t = tar_of(&[
                (T::Directory, "d", b"", None),
                (T::Symlink, "s", b"", Some("/etc/passwd")),
                (T::Link, "l", b"", Some(link)),
            ]);
            match unpack_into(&t).1 {
                Err(Step::Entry(_, why)) => assert!(why.contains("not a file earlier"), "{why}"),
                other => panic!("{other:?}"),
            }
        }
        // Device nodes other than whiteouts.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = header(T::Block, "sda", 0);
        h.set_device_major(8).unwrap();
        h.set_device_minor(0).unwrap();
        h.set_cksum();
        b.append(&h, io::empty()).unwrap();
        match unpack_into(&b.into_inner().unwrap()).1 {
            Err(Step::Entry(_, why)) => assert!(why.contains("block device node (8:0)"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_layer_count_is_bounded_and_bad_sources_are_named() {
        let many = vec![PathBuf::from("/nonexistent"); MAX_LAYERS + 1];
        let e = images_for(&many).unwrap_err().to_string();
        assert!(e.contains("at most 8"), "{e}");
        let d = tempfile::tempdir().unwrap();
        let e = image_for(Path::new("/nonexistent.tar"), d.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("--layer /nonexistent.tar"), "{e}");
        let e = image_for(d.path(), d.path()).unwrap_err().to_string();
        assert!(e.contains("not a file"), "{e}");
        // A truncated tar: an error naming the layer, and nothing left in the cache.
        let bad = d.path().join("bad.tar");
        let t = tar_of(&[(T::Regular, "f", &[7u8; 5000], None)]);
        fs::write(&bad, &t[..3000]).unwrap();
        let cache = d.path().join("cache");
        let e = image_for(&bad, &cache).unwrap_err().to_string();
        assert!(e.contains("bad.tar"), "{e}");
        assert_eq!(fs::read_dir(&cache).unwrap().count(), 0);
    }
}
