//! The overlay root, host side: which upper layer a VM gets from `--overlay`, `--overlay-size`,
//! `--overlay-fstype` (or the library's [`Overlay`]) and `GONDOLIN_ROOT_OVERLAY`, the kernel
//! parameters that carry the choice to vmrun-init, and `vmrun overlay create`.
//!
//! Precedence: an explicit `root.overlay=` in the user's `--cmdline` wins over everything; then
//! the chosen overlay (flags or library); then the environment toggle; else no overlay.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;
use vmrun_protocol::cmdline::{
    size_bytes, validate_size, ROOT_OVERLAY, ROOT_OVERLAY_FSTYPE, ROOT_OVERLAY_SIZE,
};

/// The environment toggle Gondolin defined, honoured as-is.
pub const ENV_TOGGLE: &str = "GONDOLIN_ROOT_OVERLAY";
/// The guest device an upper disk appears as (the rootfs is the first disk, /dev/vda).
pub const UPPER_DEVICE: &str = "/dev/vdb";
const DEFAULT_FSTYPE: &str = "ext4";

/// The upper layer of the overlay root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Overlay {
    /// No overlay: the root disk mounted directly, read-only.
    None,
    /// Writes go to a tmpfs (optionally size-limited, e.g. "256M" or "50%").
    Tmpfs { size: Option<String> },
    /// Writes go to a disk image (see `vmrun overlay create`), which persists across VMs.
    Disk { path: PathBuf, fstype: String },
}

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum OverlayError {
    #[error("--overlay-size {0}: {1}")]
    Size(String, #[source] vmrun_protocol::cmdline::SizeError),
    #[error("--overlay-size applies to a tmpfs upper, not to the disk {0}; drop it (the disk's size is its own)")]
    SizeWithDisk(PathBuf),
    #[error("--overlay-fstype needs a disk upper (--overlay PATH); a tmpfs upper has no fstype")]
    FstypeWithoutDisk,
    #[error("--overlay-size {0} with --overlay none: drop one of them")]
    SizeWithoutOverlay(String),
    #[error("--overlay-fstype {0}: not a filesystem type name (e.g. ext4)")]
    Fstype(String),
    #[error("--overlay {0}: no such file; create one with `vmrun overlay create {0} --size 1G`")]
    MissingDisk(PathBuf),
    #[error("{ENV_TOGGLE}={0}: use 1, true or tmpfs to turn on the tmpfs overlay (or 0/false, or unset it)")]
    Env(String),
}

fn valid_fstype(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Reads the toggle's value: `Some(true)` on, `Some(false)` explicitly off, `None` unset.
fn env_toggle(value: Option<&str>) -> Result<bool, OverlayError> {
    match value.map(|v| v.trim().to_ascii_lowercase()) {
        None => Ok(false),
        Some(v) => match v.as_str() {
            "1" | "true" | "tmpfs" => Ok(true),
            "" | "0" | "false" => Ok(false),
            _ => Err(OverlayError::Env(value.unwrap_or_default().to_string())),
        },
    }
}

/// Whether the user's own kernel parameters already choose the overlay.
pub fn cmdline_sets_overlay(user_cmdline: &str) -> bool {
    user_cmdline
        .split_whitespace()
        .any(|w| w.trim_matches('"').starts_with(&format!("{ROOT_OVERLAY}=")))
}

impl Overlay {
    /// The overlay the three flags choose (`--overlay tmpfs|none|PATH`, `--overlay-size`,
    /// `--overlay-fstype`); `None` when they choose nothing. A size alone means a tmpfs
    /// overlay of that size.
    pub fn from_flags(
        overlay: Option<&Path>,
        size: Option<&str>,
        fstype: Option<&str>,
    ) -> Result<Option<Overlay>, OverlayError> {
        let size = size.map(str::to_string);
        let word = overlay.and_then(Path::to_str);
        Ok(match (overlay, word) {
            (Some(_), Some(w)) if w.eq_ignore_ascii_case("tmpfs") => {
                if fstype.is_some() {
                    return Err(OverlayError::FstypeWithoutDisk);
                }
                Some(Overlay::Tmpfs { size })
            }
            (Some(_), Some(w)) if w.eq_ignore_ascii_case("none") => {
                if let Some(s) = size {
                    return Err(OverlayError::SizeWithoutOverlay(s));
                }
                if fstype.is_some() {
                    return Err(OverlayError::FstypeWithoutDisk);
                }
                Some(Overlay::None)
            }
            (Some(path), _) => {
                if size.is_some() {
                    return Err(OverlayError::SizeWithDisk(path.into()));
                }
                Some(Overlay::Disk {
                    path: path.into(),
                    fstype: fstype.unwrap_or(DEFAULT_FSTYPE).into(),
                })
            }
            (None, _) if fstype.is_some() => return Err(OverlayError::FstypeWithoutDisk),
            (None, _) if size.is_some() => Some(Overlay::Tmpfs { size }),
            (None, _) => None,
        })
    }

    /// Refuses what vmrun-init would refuse later, and a disk that is not there.
    fn check(&self) -> Result<(), OverlayError> {
        match self {
            Overlay::None => Ok(()),
            Overlay::Tmpfs { size } => match size {
                Some(s) => validate_size(s).map_err(|why| OverlayError::Size(s.clone(), why)),
                None => Ok(()),
            },
            Overlay::Disk { path, fstype } => {
                if !valid_fstype(fstype) {
                    return Err(OverlayError::Fstype(fstype.clone()));
                }
                if !path.exists() {
                    return Err(OverlayError::MissingDisk(path.clone()));
                }
                Ok(())
            }
        }
    }
}

/// Resolves the chosen overlay against the toggle (`env` is the toggle's value) and the
/// user's command line.
pub fn resolve(
    chosen: Option<&Overlay>,
    env: Option<&str>,
    user_cmdline: &str,
) -> Result<Overlay, OverlayError> {
    if let Some(o) = chosen {
        o.check()?;
    }
    let on_env = env_toggle(env)?;
    let wanted = match chosen {
        Some(o) => o.clone(),
        None if on_env => Overlay::Tmpfs { size: None },
        None => Overlay::None,
    };
    // The user's explicit root.overlay= wins: keep a requested disk attached (their parameters
    // may name it) but add no parameters of ours.
    if cmdline_sets_overlay(user_cmdline) {
        return Ok(match wanted {
            d @ Overlay::Disk { .. } => d,
            _ => Overlay::None,
        });
    }
    Ok(wanted)
}

impl Overlay {
    /// The kernel parameters that tell vmrun-init about this overlay.
    pub fn kernel_params(&self) -> Vec<String> {
        match self {
            Overlay::None => vec![],
            Overlay::Tmpfs { size } => {
                let mut v = vec![format!("{ROOT_OVERLAY}=tmpfs")];
                if let Some(s) = size {
                    v.push(format!("{ROOT_OVERLAY_SIZE}={s}"));
                }
                v
            }
            Overlay::Disk { fstype, .. } => vec![
                format!("{ROOT_OVERLAY}={UPPER_DEVICE}"),
                format!("{ROOT_OVERLAY_FSTYPE}={fstype}"),
            ],
        }
    }
}

/// Why `vmrun overlay create` could not make a disk.
#[derive(Debug, Error)]
pub enum CreateDiskError {
    #[error("overlay disk {path}: size {size}: use a number with an optional k, m or g suffix (e.g. 1G)")]
    Size { path: PathBuf, size: String },
    #[error("overlay disk {path}: size {size} is below the 8 MiB a journaled upper needs")]
    TooSmall { path: PathBuf, size: String },
    #[error(transparent)]
    Fstype(OverlayError),
    #[error("overlay disk {path}: {source} (it will not be overwritten; remove it or pick another path)")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("overlay disk {path}: {source}")]
    Resize {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("overlay disk {path}: cannot run {mkfs}: {source}; install the tools for {fstype} (e2fsprogs for ext4)")]
    MkfsMissing {
        path: PathBuf,
        mkfs: String,
        fstype: String,
        source: std::io::Error,
    },
    #[error("overlay disk {path}: {mkfs} failed: {stderr}")]
    Mkfs {
        path: PathBuf,
        mkfs: String,
        stderr: String,
    },
}

/// `vmrun overlay create`: a sparse image of `size` formatted with `fstype`, ready to be an
/// upper disk. Refuses to overwrite; removes a half-made file on failure.
pub fn create_disk(path: &Path, size: &str, fstype: &str) -> Result<(), CreateDiskError> {
    let p = || path.to_path_buf();
    let bytes = size_bytes(size).ok_or_else(|| CreateDiskError::Size {
        path: p(),
        size: size.into(),
    })?;
    if bytes < 8 << 20 {
        return Err(CreateDiskError::TooSmall {
            path: p(),
            size: size.into(),
        });
    }
    if !valid_fstype(fstype) {
        return Err(CreateDiskError::Fstype(OverlayError::Fstype(fstype.into())));
    }
    let mkfs = format!("mkfs.{fstype}");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|source| CreateDiskError::Create { path: p(), source })?;
    let result = file
        .set_len(bytes)
        .map_err(|source| CreateDiskError::Resize { path: p(), source })
        .and_then(|_| {
            let out = Command::new(&mkfs)
                .args(["-q", "-F"])
                .arg(path)
                .output()
                .map_err(|source| CreateDiskError::MkfsMissing {
                    path: p(),
                    mkfs: mkfs.clone(),
                    fstype: fstype.into(),
                    source,
                })?;
            if out.status.success() {
                Ok(())
            } else {
                Err(CreateDiskError::Mkfs {
                    path: p(),
                    mkfs: mkfs.clone(),
                    stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                })
            }
        });
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flags, as the CLI passes them.
    fn req(
        overlay: Option<&str>,
        size: Option<&str>,
        fstype: Option<&str>,
    ) -> Result<Option<Overlay>, OverlayError> {
        Overlay::from_flags(overlay.map(Path::new), size, fstype)
    }

    /// The flags resolved against the toggle and the user's command line.
    fn resolve(
        req: &Result<Option<Overlay>, OverlayError>,
        env: Option<&str>,
        user: &str,
    ) -> Result<Overlay, OverlayError> {
        let chosen = req.clone()?;
        super::resolve(chosen.as_ref(), env, user)
    }

    #[test]
    fn env_toggle_values() {
        for on in ["1", "true", "TRUE", "tmpfs", "TmpFs", " 1 "] {
            assert_eq!(
                resolve(&req(None, None, None), Some(on), ""),
                Ok(Overlay::Tmpfs { size: None }),
                "{on}"
            );
        }
        for off in ["0", "false", "FALSE", ""] {
            assert_eq!(
                resolve(&req(None, None, None), Some(off), ""),
                Ok(Overlay::None),
                "{off}"
            );
        }
        assert_eq!(resolve(&req(None, None, None), None, ""), Ok(Overlay::None));
        let e = resolve(&req(None, None, None), Some("yes please"), "").unwrap_err();
        assert!(e
            .to_string()
            .contains("GONDOLIN_ROOT_OVERLAY=yes please: use 1, true or tmpfs"));
    }

    #[test]
    fn flags_beat_the_env_and_user_cmdline_beats_both() {
        let disk = tempfile::NamedTempFile::new().unwrap();
        let dpath = disk.path().to_str().unwrap();
        assert_eq!(
            resolve(&req(Some("tmpfs"), Some("64M"), None), Some("0"), ""),
            Ok(Overlay::Tmpfs {
                size: Some("64M".into())
            })
        );
        assert_eq!(
            resolve(&req(Some(dpath), None, None), Some("1"), ""),
            Ok(Overlay::Disk {
                path: disk.path().into(),
                fstype: "ext4".into()
            })
        );
        // Size alone implies tmpfs.
        assert_eq!(
            resolve(&req(None, Some("1G"), None), None, ""),
            Ok(Overlay::Tmpfs {
                size: Some("1G".into())
            })
        );
        // The user's root.overlay= wins: no parameters from us.
        let user = "quiet root.overlay=/dev/vdc";
        assert_eq!(
            resolve(&req(Some("tmpfs"), None, None), Some("1"), user),
            Ok(Overlay::None)
        );
        assert_eq!(
            resolve(&req(None, None, None), Some("1"), user),
            Ok(Overlay::None)
        );
        assert!(cmdline_sets_overlay("\"root.overlay=tmpfs\""));
        assert!(!cmdline_sets_overlay("root.overlaysize=1G"));
        // ...but a requested disk stays attached for the user's parameters to use.
        assert!(matches!(
            resolve(&req(Some(dpath), None, None), None, user),
            Ok(Overlay::Disk { .. })
        ));
    }

    #[test]
    fn bad_requests_name_the_flag_and_the_fix() {
        let e = resolve(&req(Some("tmpfs"), Some("12q"), None), None, "")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--overlay-size 12q: not a tmpfs size"), "{e}");
        let e = resolve(&req(Some("tmpfs"), None, Some("ext4")), None, "").unwrap_err();
        assert_eq!(e, OverlayError::FstypeWithoutDisk);
        let e = resolve(&req(None, None, Some("ext4")), None, "").unwrap_err();
        assert_eq!(e, OverlayError::FstypeWithoutDisk);
        let e = resolve(&req(Some("/nonexistent/upper.img"), None, None), None, "")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("vmrun overlay create /nonexistent/upper.img"),
            "{e}"
        );
        let disk = tempfile::NamedTempFile::new().unwrap();
        let e = resolve(
            &req(Some(disk.path().to_str().unwrap()), Some("1G"), None),
            None,
            "",
        )
        .unwrap_err();
        assert!(matches!(e, OverlayError::SizeWithDisk(_)));
        let e = resolve(
            &req(Some(disk.path().to_str().unwrap()), None, Some("EXT4;")),
            None,
            "",
        )
        .unwrap_err();
        assert!(matches!(e, OverlayError::Fstype(_)));
    }

    #[test]
    fn none_is_an_explicit_choice_that_beats_the_toggle() {
        assert_eq!(req(Some("none"), None, None), Ok(Some(Overlay::None)));
        assert_eq!(
            resolve(&req(Some("NONE"), None, None), Some("1"), ""),
            Ok(Overlay::None)
        );
        assert!(matches!(
            req(Some("none"), Some("1G"), None),
            Err(OverlayError::SizeWithoutOverlay(_))
        ));
        assert_eq!(
            req(Some("none"), None, Some("ext4")),
            Err(OverlayError::FstypeWithoutDisk)
        );
        assert_eq!(req(None, None, None), Ok(None));
    }

    #[test]
    fn kernel_params() {
        assert!(Overlay::None.kernel_params().is_empty());
        assert_eq!(
            Overlay::Tmpfs { size: None }.kernel_params(),
            vec!["root.overlay=tmpfs"]
        );
        assert_eq!(
            Overlay::Tmpfs {
                size: Some("256M".into())
            }
            .kernel_params(),
            vec!["root.overlay=tmpfs", "root.overlaysize=256M"]
        );
        assert_eq!(
            Overlay::Disk {
                path: "/x".into(),
                fstype: "ext4".into()
            }
            .kernel_params(),
            vec!["root.overlay=/dev/vdb", "root.overlayfstype=ext4"]
        );
    }

    #[test]
    fn create_disk_formats_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("upper.ext4");
        create_disk(&p, "16M", "ext4").unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 16 << 20);
        let mut sb = [0u8; 2];
        use std::os::unix::fs::FileExt;
        std::fs::File::open(&p)
            .unwrap()
            .read_exact_at(&mut sb, 1024 + 0x38)
            .unwrap();
        assert_eq!(u16::from_le_bytes(sb), 0xef53);
        let e = create_disk(&p, "16M", "ext4").unwrap_err().to_string();
        assert!(e.contains("will not be overwritten"), "{e}");
        let q = dir.path().join("small.img");
        assert!(create_disk(&q, "1M", "ext4")
            .unwrap_err()
            .to_string()
            .contains("8 MiB"));
        assert!(!q.exists());
        let r = dir.path().join("nofs.img");
        let e = create_disk(&r, "16M", "nosuchfs").unwrap_err().to_string();
        assert!(e.contains("cannot run mkfs.nosuchfs"), "{e}");
        assert!(!r.exists(), "a failed create leaves no file");
    }
}
