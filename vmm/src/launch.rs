//! From what a user asks for (CLI flags or library options) to a `VmConfig`: which kernel,
//! initramfs and disks, the overlay choice and the kernel command line. One place, so the CLI
//! and the library cannot disagree.

use std::path::PathBuf;

use thiserror::Error;
use vmrun_protocol::cmdline::EXEC;

use crate::builder::{BootProtocol, DiskConfig, Payload, VmConfig, VsockConfig};
use crate::compat::Compat;
use crate::devices::legacy::serial::ConsoleSink;
use crate::images;
use crate::overlay::{self, Overlay, OverlayError, OverlayRequest};

/// The root filesystem disk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Rootfs {
    /// `VMRUN_ROOTFS`, else the built ext4 image.
    #[default]
    Default,
    /// No root disk: the guest stays in the initramfs.
    None,
    Path(PathBuf),
}

#[derive(Clone, Debug)]
pub struct LaunchOptions {
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub rootfs: Rootfs,
    pub overlay: OverlayRequest,
    /// More disks after the rootfs and the overlay disk.
    pub disks: Vec<DiskConfig>,
    /// A command for vmrun-init to run as the workload (until the agent runs it).
    pub exec: Option<String>,
    /// Extra kernel parameters, appended last.
    pub cmdline: Option<String>,
    pub memory_mib: u64,
    pub vcpus: u8,
    pub compat: Compat,
    pub boot_protocol: BootProtocol,
    /// A vsock device and its host socket.
    pub vsock: Option<VsockConfig>,
}

impl Default for LaunchOptions {
    fn default() -> Self {
        LaunchOptions {
            kernel: None,
            initrd: None,
            rootfs: Rootfs::Default,
            overlay: OverlayRequest::default(),
            disks: vec![],
            exec: None,
            cmdline: None,
            memory_mib: 256,
            vcpus: 1,
            compat: Compat::Auto,
            boot_protocol: BootProtocol::Auto,
            vsock: None,
        }
    }
}

#[derive(Debug, Error)]
pub enum LaunchError {
    #[error(transparent)]
    Overlay(#[from] OverlayError),
    #[error("rootfs {0}: not found; build the images with `vmrun images build` or pass --rootfs PATH (or --rootfs none)")]
    MissingRootfs(PathBuf),
    #[error("disk {0}: not found")]
    MissingDisk(PathBuf),
    #[error("--overlay needs a root disk; drop --rootfs none")]
    OverlayWithoutRoot,
    #[error("--exec {0:?}: double quotes cannot be passed on the kernel command line")]
    ExecQuote(String),
    #[error("cannot probe this host's KVM: {0}")]
    Probe(String),
    #[error("{0}")]
    Cmdline(String),
}

/// What a launch resolves to, before the VM exists.
#[derive(Debug)]
pub struct Resolved {
    pub pvm: bool,
    pub overlay: Overlay,
    pub disks: Vec<DiskConfig>,
    pub cmdline: String,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Resolves `opts`; `env_overlay` is the value of `GONDOLIN_ROOT_OVERLAY`.
pub fn resolve(opts: &LaunchOptions, env_overlay: Option<&str>) -> Result<Resolved, LaunchError> {
    let user = opts.cmdline.as_deref().unwrap_or("");
    let overlay = overlay::resolve(&opts.overlay, env_overlay, user)?;
    let rootfs = match &opts.rootfs {
        Rootfs::None => None,
        Rootfs::Path(p) => Some(p.clone()),
        Rootfs::Default => Some(
            std::env::var_os("VMRUN_ROOTFS")
                .map(PathBuf::from)
                .unwrap_or_else(|| images::cache_dir().join(images::ROOTFS_EXT4)),
        ),
    };
    let mut disks = Vec::new();
    let mut ours = Vec::new();
    match rootfs {
        Some(p) => {
            if !p.exists() {
                return Err(LaunchError::MissingRootfs(p));
            }
            disks.push(DiskConfig {
                path: p,
                read_only: true,
            });
        }
        None => {
            if overlay != Overlay::None {
                return Err(LaunchError::OverlayWithoutRoot);
            }
            ours.push("root=none".to_string());
        }
    }
    if let Overlay::Disk { path, .. } = &overlay {
        disks.push(DiskConfig {
            path: path.clone(),
            read_only: false,
        });
    }
    for d in &opts.disks {
        if !d.path.exists() {
            return Err(LaunchError::MissingDisk(d.path.clone()));
        }
        disks.push(d.clone());
    }
    ours.extend(overlay.kernel_params());
    if let Some(e) = &opts.exec {
        if e.contains('"') {
            return Err(LaunchError::ExecQuote(e.clone()));
        }
        ours.push(format!("{EXEC}=\"{e}\""));
    }
    let pvm = opts.compat.resolve().map_err(LaunchError::Probe)?;
    let cmdline = crate::cmdline::assemble(&ours, opts.cmdline.as_deref(), pvm)
        .map_err(LaunchError::Cmdline)?;
    Ok(Resolved {
        pvm,
        overlay,
        disks,
        cmdline,
        kernel: opts
            .kernel
            .clone()
            .unwrap_or_else(|| images::default_kernel(pvm)),
        initrd: opts
            .initrd
            .clone()
            .unwrap_or_else(images::default_initramfs),
    })
}

impl Resolved {
    pub fn into_config(self, opts: &LaunchOptions, console: ConsoleSink) -> VmConfig {
        VmConfig {
            payload: Payload::Linux {
                kernel: self.kernel,
                initrd: Some(self.initrd),
                cmdline: self.cmdline,
                protocol: opts.boot_protocol,
            },
            mem_mib: opts.memory_mib,
            vcpus: opts.vcpus,
            console,
            disks: self.disks,
            vsock: opts.vsock.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(rootfs: &tempfile::NamedTempFile) -> LaunchOptions {
        LaunchOptions {
            rootfs: Rootfs::Path(rootfs.path().into()),
            compat: Compat::Off,
            ..Default::default()
        }
    }

    #[test]
    fn rootfs_is_the_first_disk_read_only_and_the_overlay_disk_second() {
        let root = tempfile::NamedTempFile::new().unwrap();
        let upper = tempfile::NamedTempFile::new().unwrap();
        let mut o = opts(&root);
        o.overlay.overlay = Some(upper.path().to_str().unwrap().into());
        let r = resolve(&o, None).unwrap();
        assert_eq!(
            r.disks,
            vec![
                DiskConfig {
                    path: root.path().into(),
                    read_only: true
                },
                DiskConfig {
                    path: upper.path().into(),
                    read_only: false
                },
            ]
        );
        assert!(
            r.cmdline
                .contains("root.overlay=/dev/vdb root.overlayfstype=ext4"),
            "{}",
            r.cmdline
        );
    }

    #[test]
    fn env_toggle_flags_and_user_cmdline_precedence() {
        let root = tempfile::NamedTempFile::new().unwrap();
        let o = opts(&root);
        assert!(resolve(&o, Some("TRUE"))
            .unwrap()
            .cmdline
            .contains("root.overlay=tmpfs"));
        assert!(!resolve(&o, None).unwrap().cmdline.contains("root.overlay"));
        let mut flagged = opts(&root);
        flagged.overlay.overlay = Some("tmpfs".into());
        flagged.overlay.size = Some("64M".into());
        let c = resolve(&flagged, Some("0")).unwrap().cmdline;
        assert!(c.contains("root.overlay=tmpfs root.overlaysize=64M"), "{c}");
        let mut user = opts(&root);
        user.cmdline = Some("root.overlay=tmpfs root.overlaysize=8M".into());
        let c = resolve(&user, Some("1")).unwrap().cmdline;
        assert_eq!(
            c.matches("root.overlay=").count(),
            1,
            "only the user's: {c}"
        );
        assert!(c.ends_with("root.overlay=tmpfs root.overlaysize=8M"));
    }

    #[test]
    fn exec_and_rootfs_none() {
        let root = tempfile::NamedTempFile::new().unwrap();
        let mut o = opts(&root);
        o.exec = Some("/bin/sh -c 'exit 3'".into());
        assert!(resolve(&o, None)
            .unwrap()
            .cmdline
            .contains("vmrun.exec=\"/bin/sh -c 'exit 3'\""));
        o.exec = Some("echo \"hi\"".into());
        assert!(matches!(resolve(&o, None), Err(LaunchError::ExecQuote(_))));
        let none = LaunchOptions {
            rootfs: Rootfs::None,
            compat: Compat::Off,
            ..Default::default()
        };
        let r = resolve(&none, None).unwrap();
        assert!(r.disks.is_empty() && r.cmdline.contains("root=none"));
        assert!(matches!(
            resolve(&none, Some("1")),
            Err(LaunchError::OverlayWithoutRoot)
        ));
        let missing = LaunchOptions {
            rootfs: Rootfs::Path("/nonexistent/root.ext4".into()),
            compat: Compat::Off,
            ..Default::default()
        };
        let e = resolve(&missing, None).unwrap_err().to_string();
        assert!(
            e.contains("/nonexistent/root.ext4") && e.contains("vmrun images build"),
            "{e}"
        );
    }
}
