//! Named images for `--image NAME`: a root filesystem image, the read-only layers above it
//! (bottom first) and the defaults the image gives commands run in it (its config's
//! entrypoint, env, working directory and user). `vmrun images import` makes one from a
//! container image (its layers flattened into one erofs root), `vmrun commit` from a VM's
//! stack plus what it wrote. Each image's directory holds its own files (hard links where
//! they came from the cache, so a rebuilt cache cannot change an image) and `image.json`;
//! an image is made under a temporary name and renamed into place, so a failed import leaves
//! nothing.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::layers::{self, LayerError, MAX_LAYERS};
use super::oci::{self, OciError};
use super::ExecDefaults;

/// Overrides where named images are kept.
pub const IMAGE_DIR_ENV: &str = "VMRUN_IMAGE_DIR";
const RECORD: &str = "image.json";
const ROOT_FILE: &str = "root.erofs";

/// Directories the init mounts on (the kernel's filesystems, the overlay's parts) that an
/// image must hold: its root is read-only when no upper is asked for.
const MOUNTPOINTS: &[(&str, u32)] = &[
    ("proc", 0o555),
    ("sys", 0o555),
    ("dev", 0o755),
    ("run", 0o755),
    ("tmp", 0o1777),
    (".overlayfs", 0o755),
    (".overlayfs/lower", 0o755),
    (".overlayfs/upperfs", 0o755),
];

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("image name {0:?}: use 1 to 128 letters, digits, '-', '_', '.' or ':', starting with a letter or digit")]
    BadName(String),
    #[error("no image {name} (looked in {dir}); `vmrun images ls` lists them, `vmrun images import ARCHIVE` makes one")]
    NotFound { name: String, dir: PathBuf },
    #[error("an image {0} exists; remove it with `vmrun images rm {0}` or pick another --name")]
    Exists(String),
    #[error("image {name}: {what} {path}: {source}")]
    Io {
        name: String,
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "image {name}: its record is unreadable ({why}); remove it with `vmrun images rm {name}`"
    )]
    Record { name: String, why: String },
    #[error("image {name}: {path} is missing; remove the image with `vmrun images rm {name}`")]
    MissingFile { name: String, path: PathBuf },
    #[error(transparent)]
    Oci(#[from] OciError),
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error("image {name}: mkfs.erofs failed: {why}")]
    Mkfs { name: String, why: String },
    #[error("the stack would have {0} layers; an image holds at most {MAX_LAYERS}")]
    TooManyLayers(usize),
}

/// Where named images live: `VMRUN_IMAGE_DIR`, else `$XDG_DATA_HOME/vmrun/images`, else
/// `~/.local/share/vmrun/images`.
pub fn images_dir() -> PathBuf {
    if let Some(d) = std::env::var_os(IMAGE_DIR_ENV) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("vmrun/images");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".local/share/vmrun/images")
}

pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// The record kept beside an image's files (paths relative to its directory).
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    /// Where it came from: `import ARCHIVE[@REF]` or `commit VM`.
    source: String,
    /// The container image config's digest, for an imported image.
    #[serde(default)]
    id: Option<String>,
    created: u64,
    root: PathBuf,
    layers: Vec<PathBuf>,
    defaults: ExecDefaults,
}

/// A named image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    pub name: String,
    pub dir: PathBuf,
    pub source: String,
    pub created: u64,
    /// The root filesystem image (the bottom of the stack).
    pub root: PathBuf,
    /// Read-only layers above it, bottom first.
    pub layers: Vec<PathBuf>,
    pub defaults: ExecDefaults,
}

impl Image {
    /// Bytes its files take (hard links shared with the cache counted in full).
    pub fn size(&self) -> u64 {
        std::iter::once(&self.root)
            .chain(&self.layers)
            .filter_map(|p| fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    }
}

fn io_err<'a>(
    name: &'a str,
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        name: name.to_string(),
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The image `name` in `dir`.
pub fn load_in(dir: &Path, name: &str) -> Result<Image, StoreError> {
    if !valid_name(name) {
        return Err(StoreError::BadName(name.into()));
    }
    let at = dir.join(name);
    let text = match fs::read(at.join(RECORD)) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(StoreError::NotFound {
                name: name.into(),
                dir: dir.to_path_buf(),
            })
        }
        Err(e) => return Err(io_err(name, "read", &at.join(RECORD))(e)),
    };
    let r: Record = serde_json::from_slice(&text).map_err(|e| StoreError::Record {
        name: name.into(),
        why: e.to_string(),
    })?;
    let file = |rel: &Path| -> Result<PathBuf, StoreError> {
        // Only plain names: a record cannot point outside its directory.
        let plain = rel.components().count() == 1
            && matches!(
                rel.components().next(),
                Some(std::path::Component::Normal(_))
            );
        if !plain {
            return Err(StoreError::Record {
                name: name.into(),
                why: format!("{} is not a file of the image", rel.display()),
            });
        }
        let p = at.join(rel);
        if !p.is_file() {
            return Err(StoreError::MissingFile {
                name: name.into(),
                path: p,
            });
        }
        Ok(p)
    };
    Ok(Image {
        name: name.into(),
        root: file(&r.root)?,
        layers: r.layers.iter().map(|l| file(l)).collect::<Result<_, _>>()?,
        dir: at,
        source: r.source,
        created: r.created,
        defaults: r.defaults,
    })
}

/// The image `name`.
pub fn load(name: &str) -> Result<Image, StoreError> {
    load_in(&images_dir(), name)
}

/// Every image (and the names whose record is broken, with why).
pub fn list_in(dir: &Path) -> Vec<Result<Image, (String, String)>> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| valid_name(n))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|n| load_in(dir, &n).map_err(|e| (n, e.to_string())))
        .collect()
}

/// Removes the image `name` (VMs running from it keep their open files).
pub fn remove_in(dir: &Path, name: &str) -> Result<(), StoreError> {
    if !valid_name(name) {
        return Err(StoreError::BadName(name.into()));
    }
    let at = dir.join(name);
    if !at.join(RECORD).exists() && !at.is_dir() {
        return Err(StoreError::NotFound {
            name: name.into(),
            dir: dir.to_path_buf(),
        });
    }
    fs::remove_dir_all(&at).map_err(io_err(name, "remove", &at))
}

/// A half-made image: a temporary directory in the store, renamed into place by `finish`.
struct Making {
    name: String,
    store: PathBuf,
    tmp: tempfile::TempDir,
    files: Vec<PathBuf>,
}

impl Making {
    fn new(store: &Path, name: &str) -> Result<Making, StoreError> {
        if !valid_name(name) {
            return Err(StoreError::BadName(name.into()));
        }
        if store.join(name).exists() {
            return Err(StoreError::Exists(name.into()));
        }
        fs::create_dir_all(store).map_err(io_err(name, "create", store))?;
        let tmp = tempfile::Builder::new()
            .prefix(".making-")
            .tempdir_in(store)
            .map_err(io_err(name, "create a directory in", store))?;
        Ok(Making {
            name: name.into(),
            store: store.to_path_buf(),
            tmp,
            files: vec![],
        })
    }

    /// Brings `src` in as the next file of the stack: a hard link where it can, else a copy.
    fn take(&mut self, src: &Path) -> Result<PathBuf, StoreError> {
        let rel = PathBuf::from(format!("{}.img", self.files.len()));
        let to = self.tmp.path().join(&rel);
        if fs::hard_link(src, &to).is_err() {
            fs::copy(src, &to).map_err(io_err(&self.name, "copy", src))?;
        }
        self.files.push(rel.clone());
        Ok(rel)
    }

    fn finish(
        self,
        source: String,
        id: Option<String>,
        root: PathBuf,
        layers: Vec<PathBuf>,
        defaults: ExecDefaults,
    ) -> Result<Image, StoreError> {
        let r = Record {
            source,
            id,
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            root,
            layers,
            defaults,
        };
        let text = serde_json::to_vec_pretty(&r).map_err(|e| StoreError::Record {
            name: self.name.clone(),
            why: e.to_string(),
        })?;
        let rec = self.tmp.path().join(RECORD);
        fs::write(&rec, text).map_err(io_err(&self.name, "write", &rec))?;
        let dst = self.store.join(&self.name);
        let tmp = self.tmp.keep();
        if let Err(e) = rename_new(&tmp, &dst) {
            let _ = fs::remove_dir_all(&tmp);
            return Err(
                if e.raw_os_error() == Some(libc::EEXIST)
                    || e.raw_os_error() == Some(libc::ENOTEMPTY)
                {
                    StoreError::Exists(self.name.clone())
                } else {
                    io_err(&self.name, "rename into place", &dst)(e)
                },
            );
        }
        load_in(&self.store, &self.name)
    }
}

/// Renames `from` to `to`, failing when `to` exists (two imports of one name race here).
fn rename_new(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
    };
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: two NUL-terminated paths; renameat2 reads nothing else from memory.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The name an import takes without `--name`: the image's own (`name:tag`, its registry and
/// path dropped), else the archive's file name without its extension.
pub fn default_name(reference: Option<&str>, archive: &Path) -> String {
    let raw = match reference {
        Some(r) => oci::short_name(r).to_string(),
        None => archive
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
            .trim_end_matches(".tar")
            .to_string(),
    };
    let s: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.:".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    let s = s.trim_start_matches(|c: char| !c.is_ascii_alphanumeric());
    if s.is_empty() {
        "image".into()
    } else {
        s.chars().take(128).collect()
    }
}

/// What an import made, and what it left out.
#[derive(Debug)]
pub struct ImportReport {
    pub image: Image,
    /// The container image's layers (flattened into the one root).
    pub layers: usize,
    /// Device nodes the layers held, left out (the guest's /dev is its own devtmpfs).
    pub skipped_devices: u64,
}

/// Imports the container image in `archive` (`want`: which, where it holds several) as
/// `name` (default: [`default_name`]) into `store`.
pub fn import_in(
    store: &Path,
    archive: &Path,
    name: Option<&str>,
    want: Option<&str>,
) -> Result<ImportReport, StoreError> {
    // The name is checked before the archive is read, where it is given.
    let early = match name {
        Some(n) => Some(Making::new(store, n)?),
        None => None,
    };
    fs::create_dir_all(store).map_err(io_err("?", "create", store))?;
    let stage = tempfile::Builder::new()
        .prefix(".stage-")
        .tempdir_in(store)
        .map_err(io_err("?", "create a directory in", store))?;
    let tree = stage.path().join("tree");
    fs::create_dir(&tree).map_err(io_err("?", "create", &tree))?;
    let imported = oci::unpack_image(archive, want, &tree)?;
    let mut making = match early {
        Some(m) => m,
        None => Making::new(store, &default_name(imported.reference.as_deref(), archive))?,
    };
    add_mountpoints(&tree).map_err(io_err(&making.name, "create mountpoints in", &tree))?;
    let root = PathBuf::from(ROOT_FILE);
    let out = making.tmp.path().join(&root);
    layers::mkfs(&tree, &out).map_err(|e| match e {
        None => StoreError::Layer(LayerError::NoMkfs),
        Some(why) => StoreError::Mkfs {
            name: making.name.clone(),
            why,
        },
    })?;
    drop(stage);
    making.files.push(root.clone());
    let source = match want {
        Some(w) => format!("import {}@{w}", archive.display()),
        None => format!("import {}", archive.display()),
    };
    let image = making.finish(source, Some(imported.id), root, vec![], imported.defaults)?;
    Ok(ImportReport {
        image,
        layers: imported.layers,
        skipped_devices: imported.skipped_devices,
    })
}

/// Imports into the default store.
pub fn import(
    archive: &Path,
    name: Option<&str>,
    want: Option<&str>,
) -> Result<ImportReport, StoreError> {
    import_in(&images_dir(), archive, name, want)
}

/// Makes the directories in [`MOUNTPOINTS`] that the tree lacks (a symlink or file of that
/// name is left alone: the init then reports it).
fn add_mountpoints(tree: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for (rel, mode) in MOUNTPOINTS {
        let p = tree.join(rel);
        if fs::symlink_metadata(&p).is_err() {
            fs::create_dir(&p)?;
            fs::set_permissions(&p, fs::Permissions::from_mode(*mode))?;
        }
    }
    Ok(())
}

/// Makes the image `name` in `store` from a stack (a root image and layers, bottom first)
/// and, on top, the capture tar `top` (turned into a layer through the layer cache).
pub fn commit_in(
    store: &Path,
    name: &str,
    source: String,
    root: &Path,
    below: &[PathBuf],
    top: Option<&Path>,
    defaults: ExecDefaults,
) -> Result<Image, StoreError> {
    let count = below.len() + usize::from(top.is_some());
    if count > MAX_LAYERS {
        return Err(StoreError::TooManyLayers(count));
    }
    let mut making = Making::new(store, name)?;
    let top = match top {
        Some(t) => Some(layers::images_for(&[t.to_path_buf()])?.remove(0)),
        None => None,
    };
    let root = making.take(root)?;
    let mut stack = Vec::new();
    for l in below.iter().chain(top.as_ref()) {
        stack.push(making.take(l)?);
    }
    making.finish(source, None, root, stack, defaults)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_derived() {
        for ok in ["debian:12", "a", "my-image_1.0"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", ".hidden", "a/b", "x y", &"a".repeat(129)] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert_eq!(
            default_name(Some("docker.io/library/debian:12"), Path::new("x.tar")),
            "debian:12"
        );
        assert_eq!(default_name(None, Path::new("/tmp/my app.tar")), "my-app");
        assert_eq!(default_name(None, Path::new("/tmp/.tar")), "image");
    }

    #[test]
    fn a_missing_or_broken_image_is_named_with_the_fix() {
        let d = tempfile::tempdir().unwrap();
        let e = load_in(d.path(), "nope").unwrap_err().to_string();
        assert!(
            e.contains("no image nope") && e.contains("vmrun images import"),
            "{e}"
        );
        fs::create_dir(d.path().join("bad")).unwrap();
        fs::write(d.path().join("bad").join(RECORD), b"{").unwrap();
        let e = load_in(d.path(), "bad").unwrap_err().to_string();
        assert!(e.contains("vmrun images rm bad"), "{e}");
        // A record pointing outside its directory is refused.
        fs::write(
            d.path().join("bad").join(RECORD),
            br#"{"source":"x","created":0,"root":"../../etc/passwd","layers":[],"defaults":{"argv":[],"env":[],"cwd":null,"uid":null,"gid":null}}"#,
        )
        .unwrap();
        let e = load_in(d.path(), "bad").unwrap_err().to_string();
        assert!(e.contains("not a file of the image"), "{e}");
        let listed = list_in(d.path());
        assert_eq!(listed.len(), 1);
        assert!(listed[0].is_err());
        remove_in(d.path(), "bad").unwrap();
        assert!(!d.path().join("bad").exists());
        assert!(remove_in(d.path(), "bad").is_err());
    }

    #[test]
    fn a_commit_links_its_stack_and_refuses_a_taken_name() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root.img");
        let l1 = d.path().join("l1.img");
        fs::write(&root, b"root").unwrap();
        fs::write(&l1, b"layer").unwrap();
        let store = d.path().join("store");
        let img = commit_in(
            &store,
            "c1",
            "commit test".into(),
            &root,
            std::slice::from_ref(&l1),
            None,
            ExecDefaults::default(),
        )
        .unwrap();
        assert_eq!(fs::read(&img.root).unwrap(), b"root");
        assert_eq!(img.layers.len(), 1);
        assert_eq!(fs::read(&img.layers[0]).unwrap(), b"layer");
        let e = commit_in(
            &store,
            "c1",
            "again".into(),
            &root,
            &[],
            None,
            ExecDefaults::default(),
        )
        .unwrap_err();
        assert!(matches!(e, StoreError::Exists(_)), "{e}");
        let many = vec![l1.clone(); MAX_LAYERS];
        let e = commit_in(
            &store,
            "c2",
            "x".into(),
            &root,
            &many,
            Some(&l1),
            ExecDefaults::default(),
        )
        .unwrap_err();
        assert!(matches!(e, StoreError::TooManyLayers(9)), "{e}");
        // Nothing half-made is left in the store.
        let names: Vec<_> = fs::read_dir(&store)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("c1")]);
    }
}
