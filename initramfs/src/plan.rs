//! The overlay root: lower image read-only, upper layer on tmpfs or a block device, overlayfs
//! on top, everything mounted under `base` (the initramfs root `/` in the guest, a scratch
//! directory in a private mount namespace in host tests). Same code in both places.
//!
//! Layout in the new root: `/.overlayfs/lower` (the lower, read-only) and `/.overlayfs/upperfs`
//! (the upper filesystem, holding `upper/` and `work/`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use vmrun_protocol::status::InitError;

use crate::cmdline::{Config, Overlay};
use crate::Failure;

/// Where things are staged under `base` before the switch.
pub const NEWROOT: &str = "newroot";
const STAGE_LOWER: &str = "lower";
const STAGE_UPPERFS: &str = "upperfs";
const STAGE_LAYERS: &str = "layers";
/// Mountpoints inside the new root (created in the image at build time).
pub const LOWER_IN_ROOT: &str = ".overlayfs/lower";
pub const UPPERFS_IN_ROOT: &str = ".overlayfs/upperfs";
/// Kernel filesystems moved into the new root.
const KERNEL_MOUNTPOINTS: &[&str] = &["proc", "sys", "dev", "run"];

const EXT4_MAGIC: u16 = 0xef53;
const EROFS_MAGIC: u32 = 0xe0f5_e1e2;

fn fail(class: InitError, what: impl Into<String>, why: impl std::fmt::Display) -> Failure {
    Failure::new(class, what, why)
}

/// Waits until `dev` exists, at most `wait`.
pub fn wait_for_device(dev: &str, wait: Duration, role: &str, fix: &str) -> Result<(), Failure> {
    let deadline = Instant::now() + wait;
    loop {
        if Path::new(dev).exists() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(fail(
                InitError::Device,
                format!("{role} device {dev}"),
                format!("did not appear within {}s; {fix}", wait.as_secs()),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The filesystem on `dev`, from its superblock: ext4 (also ext2/3, mounted as ext4) or erofs.
pub fn detect_fstype(dev: &str) -> Result<&'static str, Failure> {
    let what = || format!("root device {dev}");
    let mut sb = [0u8; 2048];
    let mut f = std::fs::File::open(dev).map_err(|e| fail(InitError::Device, what(), e))?;
    f.read_exact(&mut sb).map_err(|e| {
        fail(
            InitError::Mount,
            what(),
            format!("cannot read its superblock: {e}"),
        )
    })?;
    if u32::from_le_bytes([sb[1024], sb[1025], sb[1026], sb[1027]]) == EROFS_MAGIC {
        return Ok("erofs");
    }
    if u16::from_le_bytes([sb[1024 + 0x38], sb[1024 + 0x39]]) == EXT4_MAGIC {
        return Ok("ext4");
    }
    Err(fail(
        InitError::Mount,
        what(),
        "holds neither an ext4 nor an erofs filesystem; pass rootfstype= or check the image",
    ))
}

/// The filesystems this kernel can mount (from /proc/filesystems).
pub fn kernel_filesystems() -> Vec<String> {
    std::fs::read_to_string("/proc/filesystems")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().last().map(str::to_string))
        .collect()
}

fn require_fstype(fstype: &str, param: &str) -> Result<(), Failure> {
    let known = kernel_filesystems();
    if known.is_empty() || known.iter().any(|k| k == fstype) {
        return Ok(());
    }
    let mut block: Vec<&str> = known
        .iter()
        .map(String::as_str)
        .filter(|k| {
            [
                "ext4", "ext3", "ext2", "xfs", "btrfs", "erofs", "f2fs", "vfat", "tmpfs",
            ]
            .contains(k)
        })
        .collect();
    block.sort_unstable();
    Err(fail(
        InitError::Mount,
        format!("{param}={fstype}"),
        format!(
            "the guest kernel does not support {fstype} (it has: {})",
            block.join(", ")
        ),
    ))
}

fn mkdir_all(path: &Path) -> Result<(), Failure> {
    std::fs::create_dir_all(path)
        .map_err(|e| fail(InitError::Mount, format!("mkdir {}", path.display()), e))
}

fn errno_text(e: Errno) -> String {
    format!("{e}: {}", e.desc())
}

/// Mounts the lower image read-only at `target`. ext4 gets `noload` so its journal is never
/// replayed and the image stays byte-identical.
fn mount_lower(cfg: &Config, target: &Path) -> Result<String, Failure> {
    mount_ro(
        cfg,
        &cfg.root,
        cfg.rootfstype.as_deref(),
        target,
        "root",
        "attach the rootfs image as the first disk or fix root=",
    )
}

/// Mounts `dev` read-only at `target` (`fstype` detected when not given).
fn mount_ro(
    cfg: &Config,
    dev: &str,
    fstype: Option<&str>,
    target: &Path,
    role: &str,
    fix: &str,
) -> Result<String, Failure> {
    wait_for_device(dev, cfg.device_wait, role, fix)?;
    let fstype = match fstype {
        Some(t) => {
            require_fstype(t, "rootfstype")?;
            t.to_string()
        }
        None => detect_fstype(dev)?.to_string(),
    };
    let data = (fstype == "ext4").then_some("noload");
    mount(
        Some(dev),
        target,
        Some(fstype.as_str()),
        MsFlags::MS_RDONLY,
        data,
    )
    .map_err(|e| {
        fail(
            InitError::Mount,
            format!("mount {role} device {dev} ({fstype}) read-only"),
            format!(
                "{}; {}",
                errno_text(e),
                if role == "root" {
                    "check rootfstype= and the image"
                } else {
                    "check the image"
                }
            ),
        )
    })?;
    Ok(fstype)
}

/// Mounts the layers read-only under `base/layers/N`; the overlay's `lowerdir=` for the stack,
/// top first, ending with `lower`. The layer mounts stay in the initramfs after the switch
/// (the overlay holds them), so they add nothing to the root image or the upper layer.
fn mount_layers(cfg: &Config, base: &Path, lower: &Path) -> Result<String, Failure> {
    let mut dirs = Vec::new();
    for (i, dev) in cfg.layers.iter().enumerate() {
        let at = base.join(STAGE_LAYERS).join(i.to_string());
        mkdir_all(&at)?;
        mount_ro(
            cfg,
            dev,
            None,
            &at,
            "layer",
            "attach the layer's disk or fix root.layers=",
        )?;
        dirs.push(at.display().to_string());
    }
    dirs.reverse();
    dirs.push(lower.display().to_string());
    Ok(dirs.join(":"))
}

/// Mounts the upper filesystem at `target`; returns its type.
fn mount_upper(cfg: &Config, overlay: &Overlay, target: &Path) -> Result<String, Failure> {
    match overlay {
        Overlay::Tmpfs { size } => {
            let data = match size {
                Some(s) => format!("mode=0755,size={s}"),
                None => "mode=0755".to_string(),
            };
            mount(
                Some("tmpfs"),
                target,
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                Some(data.as_str()),
            )
            .map_err(|e| {
                fail(
                    InitError::Mount,
                    format!("mount tmpfs upper ({data})"),
                    format!("{}; check root.overlaysize=", errno_text(e)),
                )
            })?;
            Ok("tmpfs".into())
        }
        Overlay::Device { path, fstype } => {
            wait_for_device(
                path,
                cfg.device_wait,
                "upper",
                "attach a writable disk for it (vmrun --overlay PATH) or use root.overlay=tmpfs",
            )?;
            require_fstype(fstype, "root.overlayfstype")?;
            mount(Some(path.as_str()), target, Some(fstype.as_str()), MsFlags::empty(), None::<&str>).map_err(|e| {
                let hint = match e {
                    Errno::EROFS | Errno::EACCES => "the disk is read-only; attach it writable".to_string(),
                    _ => format!("is it formatted as {fstype}? (`vmrun overlay create PATH` makes one; or set root.overlayfstype=)"),
                };
                fail(InitError::Mount, format!("mount upper device {path} as {fstype}"), format!("{}; {hint}", errno_text(e)))
            })?;
            Ok(fstype.clone())
        }
    }
}

/// `upper/` is kept (a device upper persists across boots); `work/` starts empty every boot.
fn prepare_upper_dirs(upperfs: &Path, what: &str) -> Result<(), Failure> {
    let upper = upperfs.join("upper");
    let work = upperfs.join("work");
    let full = |op: &str, e: std::io::Error| {
        let why = match e.raw_os_error() {
            Some(libc::ENOSPC) => "the upper layer is full (ENOSPC); give it more room (root.overlaysize=, a larger disk) or free space on it".to_string(),
            Some(libc::EROFS) => format!("the upper filesystem is read-only (EROFS); {what} must be writable"),
            _ => e.to_string(),
        };
        fail(
            InitError::Mount,
            format!("{op} on the upper layer {what}"),
            why,
        )
    };
    if !upper.is_dir() {
        std::fs::create_dir(&upper).map_err(|e| full("mkdir upper/", e))?;
    }
    if work.exists() {
        std::fs::remove_dir_all(&work).map_err(|e| full("empty work/", e))?;
    }
    std::fs::create_dir(&work).map_err(|e| full("mkdir work/", e))?;
    Ok(())
}

/// Makes `dir` exist inside the new root, warning when that writes into the upper layer.
fn ensure_mountpoint(newroot: &Path, rel: &str) -> Result<PathBuf, Failure> {
    let p = newroot.join(rel);
    if !p.is_dir() {
        eprintln!("vmrun-init: note: the root image has no /{rel}; creating it (it will show in the upper layer)");
        mkdir_all(&p)?;
    }
    Ok(p)
}

fn move_mount(from: &Path, to: &Path) -> Result<(), Failure> {
    mount(Some(from), to, None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(|e| {
        fail(
            InitError::Mount,
            format!("move mount {} to {}", from.display(), to.display()),
            errno_text(e),
        )
    })
}

fn is_mountpoint(p: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(p), p.parent().map(std::fs::metadata)) {
        (Ok(m), Some(Ok(parent))) => m.dev() != parent.dev(),
        _ => false,
    }
}

/// What was built.
#[derive(Debug)]
pub struct NewRoot {
    pub path: PathBuf,
    pub lower_fstype: String,
    pub upper_fstype: Option<String>,
}

/// Builds the new root under `base/newroot` from `cfg` and moves the kernel filesystems
/// mounted under `base` into it. Does not switch to it.
pub fn build_root(cfg: &Config, base: &Path) -> Result<NewRoot, Failure> {
    let newroot = base.join(NEWROOT);
    mkdir_all(&newroot)?;
    let (lower_fstype, upper_fstype) = match &cfg.overlay {
        None if !cfg.layers.is_empty() => {
            // The layers with no upper: a read-only overlay.
            let lower = base.join(STAGE_LOWER);
            mkdir_all(&lower)?;
            let fstype = mount_lower(cfg, &lower)?;
            let lowerdirs = mount_layers(cfg, base, &lower)?;
            let data = format!("lowerdir={lowerdirs}");
            mount(
                Some("overlay"),
                &newroot,
                Some("overlay"),
                MsFlags::MS_RDONLY,
                Some(data.as_str()),
            )
            .map_err(|e| {
                fail(
                    InitError::Mount,
                    "mount overlayfs (layers, no upper)",
                    errno_text(e),
                )
            })?;
            // The read-only root cannot gain a mountpoint; the image has one.
            let mp = newroot.join(LOWER_IN_ROOT);
            if mp.is_dir() {
                move_mount(&lower, &mp)?;
            }
            (fstype, None)
        }
        None => {
            let fstype = mount_lower(cfg, &newroot)?;
            if cfg.rw {
                // Remount writable; a read-only disk refuses, and that is the user's error.
                mount(
                    None::<&str>,
                    &newroot,
                    None::<&str>,
                    MsFlags::MS_REMOUNT,
                    None::<&str>,
                )
                .map_err(|e| {
                    fail(
                        InitError::Mount,
                        format!("remount root device {} read-write (rw)", cfg.root),
                        format!("{}; attach the disk writable or drop rw", errno_text(e)),
                    )
                })?;
            }
            (fstype, None)
        }
        Some(overlay) => {
            let lower = base.join(STAGE_LOWER);
            let upperfs = base.join(STAGE_UPPERFS);
            mkdir_all(&lower)?;
            mkdir_all(&upperfs)?;
            let lower_fstype = mount_lower(cfg, &lower)?;
            let lowerdirs = mount_layers(cfg, base, &lower)?;
            let upper_fstype = mount_upper(cfg, overlay, &upperfs)?;
            let what = match overlay {
                Overlay::Tmpfs { .. } => "(tmpfs)".to_string(),
                Overlay::Device { path, .. } => format!("({path}, {upper_fstype})"),
            };
            prepare_upper_dirs(&upperfs, &what)?;
            let data = format!(
                "lowerdir={lowerdirs},upperdir={},workdir={}",
                upperfs.join("upper").display(),
                upperfs.join("work").display()
            );
            mount(Some("overlay"), &newroot, Some("overlay"), MsFlags::empty(), Some(data.as_str())).map_err(|e| {
                fail(
                    InitError::Mount,
                    format!("mount overlayfs (upper on {upper_fstype})"),
                    format!("{}; the upper filesystem must be writable and support trusted xattrs (use tmpfs or ext4)", errno_text(e)),
                )
            })?;
            let lower_mp = ensure_mountpoint(&newroot, LOWER_IN_ROOT)?;
            let upperfs_mp = ensure_mountpoint(&newroot, UPPERFS_IN_ROOT)?;
            move_mount(&lower, &lower_mp)?;
            move_mount(&upperfs, &upperfs_mp)?;
            (lower_fstype, Some(upper_fstype))
        }
    };
    for name in KERNEL_MOUNTPOINTS {
        let from = base.join(name);
        if is_mountpoint(&from) {
            let to = ensure_mountpoint(&newroot, name)?;
            move_mount(&from, &to)?;
        }
    }
    Ok(NewRoot {
        path: newroot,
        lower_fstype,
        upper_fstype,
    })
}

/// Makes `newroot` the root of this process (initramfs style: move it onto `/`, then chroot).
pub fn switch_root(newroot: &Path) -> Result<(), Failure> {
    let what = || format!("switch root to {}", newroot.display());
    nix::unistd::chdir(newroot).map_err(|e| fail(InitError::Mount, what(), errno_text(e)))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| fail(InitError::Mount, what(), errno_text(e)))?;
    nix::unistd::chroot(".").map_err(|e| fail(InitError::Mount, what(), errno_text(e)))?;
    nix::unistd::chdir("/").map_err(|e| fail(InitError::Mount, what(), errno_text(e)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(bytes_at: &[(usize, &[u8])]) -> tempfile::NamedTempFile {
        let t = tempfile::NamedTempFile::new().unwrap();
        let mut v = vec![0u8; 4096];
        for (off, b) in bytes_at {
            v[*off..off + b.len()].copy_from_slice(b);
        }
        std::fs::write(t.path(), v).unwrap();
        t
    }

    #[test]
    fn superblock_detection() {
        let ext4 = image(&[(1024 + 0x38, &0xef53u16.to_le_bytes())]);
        assert_eq!(
            detect_fstype(ext4.path().to_str().unwrap()).unwrap(),
            "ext4"
        );
        let erofs = image(&[(1024, &0xe0f5_e1e2u32.to_le_bytes())]);
        assert_eq!(
            detect_fstype(erofs.path().to_str().unwrap()).unwrap(),
            "erofs"
        );
        let junk = image(&[]);
        let e = detect_fstype(junk.path().to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("neither an ext4 nor an erofs") && e.contains("rootfstype="),
            "{e}"
        );
        let e = detect_fstype("/nonexistent/vda").unwrap_err();
        assert_eq!(e.class, InitError::Device);
    }

    #[test]
    fn device_wait_is_bounded_and_names_the_fix() {
        let t = Instant::now();
        let e = wait_for_device(
            "/dev/vmrun-no-such-disk",
            Duration::from_millis(100),
            "upper",
            "attach it",
        )
        .unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(2));
        assert_eq!(e.to_string(), "vmrun-init: error: upper device /dev/vmrun-no-such-disk: did not appear within 0s; attach it");
    }

    #[test]
    fn unknown_fstype_is_refused_before_mounting() {
        let e = require_fstype("nosuchfs", "root.overlayfstype")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("root.overlayfstype=nosuchfs: the guest kernel does not support nosuchfs"),
            "{e}"
        );
    }
}
