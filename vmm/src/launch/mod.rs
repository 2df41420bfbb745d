//! From what a user asks for to what the VMM builds: [`VmOptions`] (the one option set that
//! the CLI's flags, the library's builder and the VMM process's command line all carry) is
//! resolved against the environment and the built images into a [`Resolved`] launch, which
//! becomes a [`VmConfig`]. One place, so the CLI and the library cannot disagree.

pub mod cmdline;
pub mod diff;
pub mod images;
pub mod layers;
pub mod oci;
pub mod overlay;
pub mod snapshot;
pub mod store;
pub mod tarball;

use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::path::PathBuf;

use thiserror::Error;
use vmrun_protocol::cmdline::{EXEC, ROOT_LAYERS};

use crate::config::{BootProtocol, DiskConfig, Payload, VmConfig, VsockConfig};
use crate::devices::legacy::serial::ConsoleSink;
use crate::host::compat::Compat;
use layers::LayerError;
use overlay::{Overlay, OverlayError};
use store::StoreError;

/// Guest memory unless asked otherwise: room for a shell, package tools and a tmpfs upper
/// (half of RAM by default) without tuning.
pub const DEFAULT_MEMORY_MIB: u64 = 512;
/// The default where guest ring 0 is emulated: the kernel initialises and frees every page
/// at boot (struct page set-up and the buddy allocator took ~15% of a 512 MiB boot's emulated
/// instructions), and data moves through the guest at a few MiB/s there, so little is lost.
pub const DEFAULT_MEMORY_MIB_PVM: u64 = 256;

/// The root filesystem disk.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rootfs {
    /// `VMRUN_ROOTFS`, else the built ext4 image.
    #[default]
    Default,
    /// No root disk: the guest stays in the initramfs.
    None,
    Path(PathBuf),
}

/// What commands run in a VM get unless they say otherwise: an image's entrypoint and
/// command, env, working directory and user (`vmrun images import` reads them from a
/// container image's config).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecDefaults {
    /// What runs when no command is given (entrypoint, then command).
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

impl ExecDefaults {
    /// `x` with these defaults filled in: env entries it does not set, and the working
    /// directory and user where it names none.
    pub fn apply(&self, mut x: vmrun_protocol::agent::Exec) -> vmrun_protocol::agent::Exec {
        if !x.clear_env {
            let mut env: Vec<(String, String)> = self
                .env
                .iter()
                .filter(|(k, _)| !x.env.iter().any(|(k2, _)| k2 == k))
                .cloned()
                .collect();
            env.append(&mut x.env);
            x.env = env;
        }
        if x.cwd.is_none() {
            x.cwd = self.cwd.clone();
        }
        if x.uid.is_none() && x.gid.is_none() {
            x.uid = self.uid;
            x.gid = self.gid;
        }
        x
    }
}

/// Everything a user can ask of a VM. `None` and `Default` fields are decided at
/// [`resolve`] time from the environment and the built images.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmOptions {
    /// Default: `VMRUN_KERNEL`, else the built kernel for this kind of host.
    pub kernel: Option<PathBuf>,
    /// Default: `VMRUN_INITRAMFS`, else the built initramfs.
    pub initrd: Option<PathBuf>,
    pub rootfs: Rootfs,
    /// A named image (`vmrun images ls`): its root and layers below `layers`, its defaults
    /// for commands. Resolved (and dropped) at [`resolve`] time.
    pub image: Option<String>,
    /// Defaults for the commands run in the VM (the image's, once resolved).
    pub exec_defaults: Option<ExecDefaults>,
    /// The upper layer; `None`: `GONDOLIN_ROOT_OVERLAY` decides (else no overlay).
    pub overlay: Option<Overlay>,
    /// Read-only layers above the root disk, bottom first: capture tars (turned into cached
    /// erofs images at resolve time) or built layer images.
    pub layers: Vec<PathBuf>,
    /// More disks after the rootfs, the overlay disk and the layers.
    pub disks: Vec<DiskConfig>,
    /// A command for vmrun-init to run as the workload (instead of the agent).
    pub exec: Option<String>,
    /// Extra kernel parameters, appended last (an explicit `root.overlay=` wins).
    pub cmdline: Option<String>,
    /// Default: [`DEFAULT_MEMORY_MIB`], or [`DEFAULT_MEMORY_MIB_PVM`] where ring 0 is emulated.
    pub memory_mib: Option<u64>,
    pub vcpus: u8,
    pub compat: Compat,
    pub boot_protocol: BootProtocol,
    /// A vsock device and its host socket.
    pub vsock: Option<VsockConfig>,
    /// Keep the guest console in this file.
    pub console_log: Option<PathBuf>,
    /// Run the VMM's threads without their seccomp filters (debugging only).
    pub no_seccomp: bool,
    /// Run the VMM outside its jail (debugging only).
    pub no_jail: bool,
    /// The user the jailed VMM runs as; `None`: a fresh uid and gid per VM.
    pub jail_user: Option<JailUser>,
    /// The VM's CPU time limit, in percent of one CPU (its cgroup's cpu.max).
    pub cpu_quota: Option<u32>,
}

/// `UID[:GID]` for `--jail-user` (the gid defaults to the uid).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailUser {
    pub uid: u32,
    pub gid: u32,
}

impl std::str::FromStr for JailUser {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let num = |t: &str| {
            t.parse::<u32>()
                .ok()
                .filter(|&n| n != 0 && n != u32::MAX)
                .ok_or_else(|| {
                    format!("{s:?}: give UID[:GID] as numbers other than 0 (the jail never runs a VM as root)")
                })
        };
        let (u, g) = s.split_once(':').unwrap_or((s, s));
        Ok(JailUser {
            uid: num(u)?,
            gid: num(g)?,
        })
    }
}

impl std::fmt::Display for JailUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.uid, self.gid)
    }
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            kernel: None,
            initrd: None,
            rootfs: Rootfs::Default,
            image: None,
            exec_defaults: None,
            overlay: None,
            layers: vec![],
            disks: vec![],
            exec: None,
            cmdline: None,
            memory_mib: None,
            vcpus: 1,
            compat: Compat::Auto,
            boot_protocol: BootProtocol::Auto,
            vsock: None,
            console_log: None,
            no_seccomp: false,
            no_jail: false,
            jail_user: None,
            cpu_quota: None,
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
    #[error("--layer needs a root disk to stack on; drop --rootfs none")]
    LayersWithoutRoot,
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error(transparent)]
    Image(#[from] StoreError),
    #[error("--image and --rootfs both name the root; drop one")]
    ImageAndRootfs,
    #[error("--exec {0:?}: double quotes cannot be passed on the kernel command line")]
    ExecQuote(String),
    #[error("cannot probe this host's KVM: {0}")]
    Probe(#[source] std::sync::Arc<crate::host::compat::ProbeError>),
    #[error(transparent)]
    Cmdline(#[from] cmdline::CmdlineError),
}

/// What a launch resolves to, before the VM exists.
#[derive(Debug)]
pub struct Resolved {
    pub pvm: bool,
    pub overlay: Overlay,
    /// The layer images, bottom first (also among `disks`).
    pub layers: Vec<PathBuf>,
    pub disks: Vec<DiskConfig>,
    pub cmdline: String,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub memory_mib: u64,
    /// The defaults for commands: the image's, else the options'.
    pub exec_defaults: Option<ExecDefaults>,
}

/// Resolves `opts`; `env_overlay` is the value of `GONDOLIN_ROOT_OVERLAY`.
pub fn resolve(opts: &VmOptions, env_overlay: Option<&str>) -> Result<Resolved, LaunchError> {
    let user = opts.cmdline.as_deref().unwrap_or("");
    let overlay = overlay::resolve(opts.overlay.as_ref(), env_overlay, user)?;
    let image = match &opts.image {
        Some(_) if opts.rootfs != Rootfs::Default => return Err(LaunchError::ImageAndRootfs),
        Some(name) => Some(store::load(name)?),
        None => None,
    };
    let rootfs = match (&opts.rootfs, &image) {
        (_, Some(i)) => Some(i.root.clone()),
        (Rootfs::None, _) => None,
        (Rootfs::Path(p), _) => Some(p.clone()),
        (Rootfs::Default, _) => Some(images::default_rootfs()),
    };
    let wanted: Vec<PathBuf> = image
        .iter()
        .flat_map(|i| i.layers.iter().cloned())
        .chain(opts.layers.iter().cloned())
        .collect();
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
    let layers = if wanted.is_empty() {
        vec![]
    } else if disks.is_empty() {
        return Err(LaunchError::LayersWithoutRoot);
    } else {
        layers::images_for(&wanted)?
    };
    let mut devices = Vec::new();
    for l in &layers {
        devices.push(disk_device(disks.len()));
        disks.push(DiskConfig {
            path: l.clone(),
            read_only: true,
        });
    }
    for d in &opts.disks {
        if !d.path.exists() {
            return Err(LaunchError::MissingDisk(d.path.clone()));
        }
        disks.push(d.clone());
    }
    ours.extend(overlay.kernel_params());
    if !devices.is_empty() {
        ours.push(format!("{ROOT_LAYERS}={}", devices.join(",")));
    }
    if let Some(e) = &opts.exec {
        if e.contains('"') {
            return Err(LaunchError::ExecQuote(e.clone()));
        }
        ours.push(format!("{EXEC}=\"{e}\""));
    }
    let pvm = opts.compat.resolve().map_err(LaunchError::Probe)?;
    let cmdline = cmdline::assemble(&ours, opts.cmdline.as_deref(), pvm)?;
    Ok(Resolved {
        pvm,
        overlay,
        layers,
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
        memory_mib: opts.memory_mib.unwrap_or(if pvm {
            DEFAULT_MEMORY_MIB_PVM
        } else {
            DEFAULT_MEMORY_MIB
        }),
        exec_defaults: image
            .map(|i| i.defaults)
            .or_else(|| opts.exec_defaults.clone()),
    })
}

/// The guest's name for the disk at `index` in attach order (vda, vdb, …, vdz, vdaa).
pub fn disk_device(index: usize) -> String {
    let letter = |i: usize| char::from(b'a' + (i % 26) as u8);
    if index < 26 {
        format!("/dev/vd{}", letter(index))
    } else {
        format!("/dev/vd{}{}", letter(index / 26 - 1), letter(index))
    }
}

impl Resolved {
    /// A warning to give before booting: a kernel that is not vmrun's PVM variant, on a host
    /// that emulates guest ring 0, may stop on an instruction the emulator lacks.
    pub fn kernel_warning(&self) -> Option<String> {
        (self.pvm && !images::is_pvm_build(&self.kernel)).then(|| {
            format!(
                "this host's KVM emulates guest ring 0 (nested PVM) and {} is not vmrun's PVM \
                 kernel variant: it may stop on an instruction the emulator lacks (vmrun then \
                 names it); `vmrun images build kernel-pvm` builds one that runs here",
                self.kernel.display()
            )
        })
    }

    pub fn into_config(self, opts: &VmOptions, console: ConsoleSink) -> VmConfig {
        VmConfig {
            payload: Payload::Linux {
                kernel: self.kernel,
                initrd: Some(self.initrd),
                cmdline: self.cmdline,
                protocol: opts.boot_protocol,
            },
            mem_mib: self.memory_mib,
            vcpus: opts.vcpus,
            console,
            disks: self.disks,
            vsock: opts.vsock.clone(),
            probes: false,
            hide_pv_hypercalls: self.pvm,
            seccomp: None,
            run_as: None,
        }
    }
}

impl VmOptions {
    /// These options with every decision `resolve` made written in: the images, the root
    /// disk, the overlay and the kernel variant. A VMM started from them neither reads the
    /// environment nor probes the host again.
    pub fn pinned(&self, r: &Resolved) -> VmOptions {
        VmOptions {
            kernel: Some(r.kernel.clone()),
            initrd: Some(r.initrd.clone()),
            image: None,
            exec_defaults: r.exec_defaults.clone(),
            rootfs: match &self.rootfs {
                Rootfs::Default => r
                    .disks
                    .first()
                    .map_or(Rootfs::None, |d| Rootfs::Path(d.path.clone())),
                other => other.clone(),
            },
            overlay: Some(r.overlay.clone()),
            layers: r.layers.clone(),
            compat: if r.pvm { Compat::Pvm } else { Compat::Off },
            memory_mib: Some(r.memory_mib),
            ..self.clone()
        }
    }

    /// The `vmrun boot` arguments that carry these options (what the library spawns the VMM
    /// process with). The CLI parses them back into the same options.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut flag = |name: &str, value: OsString| {
            a.push(format!("--{name}").into());
            a.push(value);
        };
        if let Some(k) = &self.kernel {
            flag("kernel", k.into());
        }
        if let Some(i) = &self.initrd {
            flag("initrd", i.into());
        }
        match &self.rootfs {
            Rootfs::Default => {}
            Rootfs::None => flag("rootfs", "none".into()),
            Rootfs::Path(p) => flag("rootfs", p.into()),
        }
        match &self.overlay {
            None => {}
            Some(Overlay::None) => flag("overlay", "none".into()),
            Some(Overlay::Tmpfs { size }) => {
                flag("overlay", "tmpfs".into());
                if let Some(s) = size {
                    flag("overlay-size", s.into());
                }
            }
            Some(Overlay::Disk { path, fstype }) => {
                flag("overlay", path.into());
                flag("overlay-fstype", fstype.into());
            }
        }
        if let Some(i) = &self.image {
            flag("image", i.into());
        }
        if let Some(d) = &self.exec_defaults {
            // The VMM keeps them in the snapshots it takes.
            if let Ok(json) = serde_json::to_string(d) {
                flag("exec-defaults", json.into());
            }
        }
        for l in &self.layers {
            flag("layer", l.into());
        }
        for d in &self.disks {
            let mut v: OsString = d.path.clone().into();
            if d.read_only {
                v.push(",ro");
            }
            flag("disk", v);
        }
        if let Some(e) = &self.exec {
            flag("exec", e.into());
        }
        if let Some(c) = &self.cmdline {
            flag("cmdline", c.into());
        }
        if let Some(m) = self.memory_mib {
            flag("memory", m.to_string().into());
        }
        flag("cpus", self.vcpus.to_string().into());
        flag("compat", self.compat.as_str().into());
        flag("boot-protocol", self.boot_protocol.as_str().into());
        if let Some(v) = &self.vsock {
            flag("vsock", v.uds_path.clone().into());
            flag("vsock-cid", v.cid.to_string().into());
        }
        if let Some(l) = &self.console_log {
            flag("console-log", l.into());
        }
        if self.no_seccomp {
            a.push("--no-seccomp".into());
        }
        if self.no_jail {
            a.push("--no-jail".into());
        }
        if let Some(u) = &self.jail_user {
            a.push("--jail-user".into());
            a.push(u.to_string().into());
        }
        if let Some(q) = self.cpu_quota {
            a.push("--cpu-quota".into());
            a.push(q.to_string().into());
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(rootfs: &tempfile::NamedTempFile) -> VmOptions {
        VmOptions {
            rootfs: Rootfs::Path(rootfs.path().into()),
            compat: Compat::Off,
            ..Default::default()
        }
    }

    #[test]
    fn default_memory_follows_the_host_kind_and_an_asked_size_wins() {
        let root = tempfile::NamedTempFile::new().unwrap();
        let mut o = opts(&root);
        assert_eq!(resolve(&o, None).unwrap().memory_mib, DEFAULT_MEMORY_MIB);
        o.compat = Compat::Pvm;
        let r = resolve(&o, None).unwrap();
        assert_eq!(r.memory_mib, DEFAULT_MEMORY_MIB_PVM);
        // Pinned options carry the size to the VMM, which then decides nothing.
        assert_eq!(o.pinned(&r).memory_mib, Some(DEFAULT_MEMORY_MIB_PVM));
        o.memory_mib = Some(1024);
        assert_eq!(resolve(&o, None).unwrap().memory_mib, 1024);
    }

    #[test]
    fn rootfs_is_the_first_disk_read_only_and_the_overlay_disk_second() {
        let root = tempfile::NamedTempFile::new().unwrap();
        let upper = tempfile::NamedTempFile::new().unwrap();
        let mut o = opts(&root);
        o.overlay = Some(Overlay::Disk {
            path: upper.path().into(),
            fstype: "ext4".into(),
        });
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
        flagged.overlay = Some(Overlay::Tmpfs {
            size: Some("64M".into()),
        });
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
        // An explicit "no overlay" beats the toggle.
        let mut none = opts(&root);
        none.overlay = Some(Overlay::None);
        assert!(!resolve(&none, Some("1"))
            .unwrap()
            .cmdline
            .contains("root.overlay"));
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
        let none = VmOptions {
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
        let missing = VmOptions {
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

    #[test]
    fn pinned_options_resolve_to_the_same_launch_without_the_environment() {
        let root = tempfile::NamedTempFile::new().unwrap();
        let o = VmOptions {
            rootfs: Rootfs::Path(root.path().into()),
            compat: Compat::Off,
            cmdline: Some("quiet".into()),
            ..Default::default()
        };
        let r = resolve(&o, Some("tmpfs")).unwrap();
        let p = o.pinned(&r);
        assert_eq!(p.overlay, Some(Overlay::Tmpfs { size: None }));
        assert_eq!(p.kernel.as_deref(), Some(r.kernel.as_path()));
        // Without the toggle now, the pinned options give the same command line and disks.
        let again = resolve(&p, None).unwrap();
        assert_eq!((again.cmdline, again.disks), (r.cmdline, r.disks));
    }
}
