//! Snapshots as users name them: where they are kept, what a snapshot records of the VM it was
//! taken from (its pinned options and the identity of every image it read), and how a
//! restore gets options of its own (its socket, console, its copy of the upper disk) while
//! refusing images that are not the ones the snapshot was taken with.

use std::path::{Path, PathBuf};

use thiserror::Error;

use super::{Rootfs, VmOptions};
use crate::launch::overlay::Overlay;
use crate::snapshot::{ImageId, Snapshot, SnapshotError, SnapshotInfo, STATE_FILE};

/// Overrides where named snapshots are kept.
pub const SNAPSHOT_DIR_ENV: &str = "VMRUN_SNAPSHOT_DIR";
/// A disk upper layer as the snapshot keeps it (copied while the VM was paused).
pub const UPPER_FILE: &str = "upper.img";

#[derive(Debug, Error)]
pub enum SnapshotUseError {
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("snapshot name {0:?}: use 1 to 63 letters, digits, '-', '_' or '.', starting with a letter or digit (or give a path with a '/')")]
    BadName(String),
    #[error("no snapshot {name} (looked in {dir}); `vmrun snapshot ls` lists them")]
    NotFound { name: String, dir: PathBuf },
    #[error("a snapshot {0} exists; remove it with `vmrun snapshot rm {0}` or pick another name")]
    Exists(String),
    #[error("a VM with a writable --disk cannot be snapshotted (only its upper layer is kept); attach the disk read-only (PATH,ro)")]
    WritableDisk,
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--{flag} {given}: the snapshot was taken with {taken}; restore with the snapshot's own images (drop --{flag})")]
    OtherImage {
        flag: &'static str,
        given: PathBuf,
        taken: PathBuf,
    },
}

fn io<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> SnapshotUseError + 'a {
    move |source| SnapshotUseError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Where named snapshots live: `VMRUN_SNAPSHOT_DIR`, else `$XDG_DATA_HOME/vmrun/snapshots`,
/// else `~/.local/share/vmrun/snapshots`.
pub fn snapshots_dir() -> PathBuf {
    if let Some(d) = std::env::var_os(SNAPSHOT_DIR_ENV) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(d).join("vmrun/snapshots");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".local/share/vmrun/snapshots")
}

/// The directory of snapshot `name`: a path when it has a '/', else a name in
/// [`snapshots_dir`].
pub fn snapshot_path(name: &str) -> Result<PathBuf, SnapshotUseError> {
    if name.contains('/') {
        return Ok(PathBuf::from(name));
    }
    if !crate::runtime::valid_name(name) {
        return Err(SnapshotUseError::BadName(name.into()));
    }
    Ok(snapshots_dir().join(name))
}

/// An existing snapshot by name or path.
pub fn find(name: &str) -> Result<PathBuf, SnapshotUseError> {
    let p = snapshot_path(name)?;
    if !p.join(STATE_FILE).is_file() {
        return Err(SnapshotUseError::NotFound {
            name: name.into(),
            dir: p.parent().map(Path::to_path_buf).unwrap_or_default(),
        });
    }
    Ok(p)
}

/// Makes the (new, empty) directory for snapshot `name`.
pub fn create_dir(name: &str) -> Result<PathBuf, SnapshotUseError> {
    let p = snapshot_path(name)?;
    if p.exists() {
        return Err(SnapshotUseError::Exists(name.into()));
    }
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).map_err(io("snapshot directory", parent))?;
    }
    std::fs::create_dir(&p).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => SnapshotUseError::Exists(name.into()),
        _ => SnapshotUseError::Io {
            what: "snapshot directory",
            path: p.clone(),
            source: e,
        },
    })?;
    Ok(std::fs::canonicalize(&p).unwrap_or(p))
}

/// Named snapshots and what each holds (or why it cannot be read).
pub fn list() -> Vec<(String, Result<SnapshotInfo, SnapshotError>, u64)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(snapshots_dir()) else {
        return out;
    };
    for e in rd.flatten() {
        let dir = e.path();
        if !dir.join(STATE_FILE).exists() {
            continue;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        let disk = disk_bytes(&dir);
        out.push((name, Snapshot::load(&dir).map(|s| s.info), disk));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Bytes a snapshot directory takes on disk (its memory file is sparse).
pub fn disk_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|f| f.metadata().ok())
                .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                .sum()
        })
        .unwrap_or(0)
}

/// Removes snapshot `name`.
pub fn remove(name: &str) -> Result<PathBuf, SnapshotUseError> {
    let p = find(name)?;
    std::fs::remove_dir_all(&p).map_err(io("snapshot", &p))?;
    Ok(p)
}

/// What a snapshot of a VM started with these (pinned) options records: the options, and the
/// identity of the kernel, the initramfs, the root disk and every read-only disk.
pub fn info_for(opts: &VmOptions) -> Result<SnapshotInfo, SnapshotUseError> {
    refuse_writable_disks(opts)?;
    info_from(opts, &Sources::open(opts)?)
}

/// Only a VM's upper layer is kept: a writable extra disk would not match its snapshot.
fn refuse_writable_disks(opts: &VmOptions) -> Result<(), SnapshotUseError> {
    if opts.disks.iter().any(|d| !d.read_only) {
        return Err(SnapshotUseError::WritableDisk);
    }
    Ok(())
}

/// What a snapshot reads on the host besides guest memory: the images it identifies and the
/// disk upper layer it copies, opened when the VM starts (a jailed VMM cannot open them
/// later; this also pins the very files the VM booted from).
pub struct Sources {
    images: Vec<(String, PathBuf, std::fs::File)>,
    upper: Option<(PathBuf, std::fs::File)>,
}

impl Sources {
    pub fn open(opts: &VmOptions) -> Result<Sources, SnapshotUseError> {
        let open = |role: String, path: &Path| {
            std::fs::File::open(path)
                .map(|f| (role, path.to_path_buf(), f))
                .map_err(io("image", path))
        };
        let mut images = Vec::new();
        if let Some(k) = &opts.kernel {
            images.push(open("kernel".into(), k)?);
        }
        if let Some(i) = &opts.initrd {
            images.push(open("initramfs".into(), i)?);
        }
        if let Rootfs::Path(p) = &opts.rootfs {
            images.push(open("rootfs".into(), p)?);
        }
        for (n, d) in opts.disks.iter().enumerate() {
            images.push(open(format!("disk {}", n + 1), &d.path)?);
        }
        let upper = match &opts.overlay {
            Some(Overlay::Disk { path, .. }) => Some((
                path.clone(),
                std::fs::File::open(path).map_err(io("upper disk", path))?,
            )),
            _ => None,
        };
        Ok(Sources { images, upper })
    }

    /// Whether the snapshot keeps a disk upper layer (and so needs an [`UPPER_FILE`]).
    pub fn has_upper(&self) -> bool {
        self.upper.is_some()
    }
}

/// What a snapshot of a VM started with `opts` records, its images read from `src`.
pub fn info_from(opts: &VmOptions, src: &Sources) -> Result<SnapshotInfo, SnapshotUseError> {
    refuse_writable_disks(opts)?;
    let images = src
        .images
        .iter()
        .map(|(role, path, f)| ImageId::of_file(role, path, f))
        .collect::<Result<Vec<_>, _>>()?;
    let launch = postcard::to_stdvec(opts).map_err(|e| SnapshotError::Decode {
        path: PathBuf::from("(options)"),
        reason: e.to_string(),
    })?;
    Ok(SnapshotInfo {
        vmrun_version: env!("CARGO_PKG_VERSION").into(),
        vcpus: opts.vcpus,
        mem_mib: opts.memory_mib.unwrap_or(0),
        images,
        launch,
    })
}

/// Copies the disk upper layer `src` opened into `dst` (an empty file opened for it; `dst_path`
/// names it in errors), with copy_file_range: reflinked or copied in the kernel.
pub fn copy_upper(
    src: &Sources,
    dst: &std::fs::File,
    dst_path: &Path,
) -> Result<(), SnapshotUseError> {
    let Some((path, f)) = &src.upper else {
        return Ok(());
    };
    let mut from = f;
    // The source is shared with nothing else, but another copy may have moved its offset.
    std::io::Seek::rewind(&mut from).map_err(io("upper disk", path))?;
    let mut to = dst;
    std::io::copy(&mut from, &mut to).map_err(io("snapshot upper disk", dst_path))?;
    to.sync_all().map_err(io("snapshot upper disk", dst_path))?;
    Ok(())
}

/// `std::fs::copy` uses copy_file_range, which reflinks or copies in the kernel.
fn copy_file(src: &Path, dst: &Path) -> Result<(), SnapshotUseError> {
    std::fs::copy(src, dst).map_err(io("upper disk", src))?;
    Ok(())
}

/// The options a VM restored from `snap` starts with: the snapshot's own, checked against the
/// images on disk now and against any image the user named (`asked`), with the upper disk
/// (if any) copied to `upper_copy` for this VM alone.
pub fn restore_options(
    snap: &Snapshot,
    asked: &VmOptions,
    upper_copy: &Path,
) -> Result<VmOptions, SnapshotUseError> {
    let mut opts: VmOptions =
        postcard::from_bytes(&snap.info.launch).map_err(|e| SnapshotError::Decode {
            path: snap.dir.join(STATE_FILE),
            reason: format!("its VM options: {e}"),
        })?;
    let asked_root = match &asked.rootfs {
        Rootfs::Path(p) => Some(p),
        _ => None,
    };
    let taken_root = match &opts.rootfs {
        Rootfs::Path(p) => Some(p),
        _ => None,
    };
    for (flag, role, given, taken) in [
        (
            "kernel",
            "kernel",
            asked.kernel.as_ref(),
            opts.kernel.as_ref(),
        ),
        (
            "initrd",
            "initramfs",
            asked.initrd.as_ref(),
            opts.initrd.as_ref(),
        ),
        ("rootfs", "rootfs", asked_root, taken_root),
    ] {
        let (Some(given), Some(taken)) = (given, taken) else {
            continue;
        };
        // Another path is fine when it holds the same image.
        let same = given == taken
            || snap
                .info
                .images
                .iter()
                .find(|i| i.role == role)
                .is_some_and(|i| i.check(given).is_ok());
        if !same {
            return Err(SnapshotUseError::OtherImage {
                flag,
                given: given.clone(),
                taken: taken.clone(),
            });
        }
    }
    for image in &snap.info.images {
        image.check(&image.path)?;
    }
    if let Some(Overlay::Disk { fstype, .. }) = &opts.overlay {
        copy_file(&snap.dir.join(UPPER_FILE), upper_copy)?;
        opts.overlay = Some(Overlay::Disk {
            path: upper_copy.to_path_buf(),
            fstype: fstype.clone(),
        });
    }
    opts.console_log = None;
    opts.vsock = None;
    // How this VM is confined is this start's choice, not the snapshot's.
    opts.no_jail = asked.no_jail;
    opts.jail_user = asked.jail_user;
    opts.cpu_quota = asked.cpu_quota;
    Ok(opts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DiskConfig;

    #[test]
    fn restore_keeps_the_snapshots_options_and_refuses_other_images() {
        let d = tempfile::tempdir().unwrap();
        let file = |n: &str, body: &[u8]| {
            let p = d.path().join(n);
            std::fs::write(&p, body).unwrap();
            p
        };
        let kernel = file("vmlinux", b"kernel");
        let initrd = file("initramfs.cpio", b"initrd");
        let rootfs = file("rootfs.ext4", b"root");
        let upper = file("upper.ext4", b"upper layer");
        let opts = VmOptions {
            kernel: Some(kernel.clone()),
            initrd: Some(initrd.clone()),
            rootfs: Rootfs::Path(rootfs.clone()),
            overlay: Some(Overlay::Disk {
                path: upper,
                fstype: "ext4".into(),
            }),
            memory_mib: Some(256),
            vcpus: 2,
            ..Default::default()
        };
        let snapdir = d.path().join("snap");
        std::fs::create_dir(&snapdir).unwrap();
        let info = info_for(&opts).unwrap();
        assert_eq!(info.images.len(), 3);
        let upper = snapdir.join(UPPER_FILE);
        let dst = std::fs::File::create(&upper).unwrap();
        copy_upper(&Sources::open(&opts).unwrap(), &dst, &upper).unwrap();
        let snap = Snapshot {
            dir: snapdir.clone(),
            info,
            machine: crate::snapshot::tests_support::machine(2),
        };
        let copy = d.path().join("vm-upper.img");
        let o = restore_options(&snap, &VmOptions::default(), &copy).unwrap();
        assert_eq!(o.kernel, Some(kernel.clone()));
        assert_eq!(o.vcpus, 2);
        assert_eq!(std::fs::read(&copy).unwrap(), b"upper layer");
        assert!(
            matches!(&o.overlay, Some(Overlay::Disk { path, .. }) if path == &copy),
            "{:?}",
            o.overlay
        );

        // Another rootfs asked for: refused; the same content elsewhere: fine.
        let other = file("other.ext4", b"ROOT");
        let asked = VmOptions {
            rootfs: Rootfs::Path(other.clone()),
            ..Default::default()
        };
        let e = restore_options(&snap, &asked, &copy)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--rootfs") && e.contains("other.ext4"), "{e}");
        let same = file("same.ext4", b"root");
        let asked = VmOptions {
            rootfs: Rootfs::Path(same),
            ..Default::default()
        };
        restore_options(&snap, &asked, &copy).unwrap();

        // The image itself changed since: refused, naming it.
        std::fs::write(&rootfs, b"r00t").unwrap();
        let e = restore_options(&snap, &VmOptions::default(), &copy)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rootfs") && e.contains("other content"), "{e}");
    }

    #[test]
    fn a_writable_extra_disk_cannot_be_snapshotted() {
        let opts = VmOptions {
            disks: vec![DiskConfig {
                path: "/d".into(),
                read_only: false,
            }],
            ..Default::default()
        };
        assert!(matches!(
            info_for(&opts),
            Err(SnapshotUseError::WritableDisk)
        ));
    }
}
