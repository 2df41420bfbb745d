//! The VM options on the command line: one [`VmArgs`], flattened into every command that starts
//! a VM, and its one conversion into the library's [`VmOptions`]. `vmrun boot` adds what only
//! the VMM process takes ([`BootArgs`]); the library spawns it with `VmOptions::to_args`, and
//! the round-trip test below keeps the two in step.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use vmrun::api::{BootProtocol, Compat, DiskConfig, Overlay, Rootfs, VmOptions};
use vmrun::config::{VsockConfig, DEFAULT_CID};
use vmrun::launch::overlay::OverlayError;
use vmrun::launch::{ExecDefaults, JailUser};

/// Options every command that starts a VM shares.
#[derive(clap::Args, Clone, Debug)]
pub struct VmArgs {
    /// Kernel image (ELF vmlinux or bzImage). Default: VMRUN_KERNEL, else the built image for
    /// this host.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs (newc cpio). Default: VMRUN_INITRAMFS, else the built vmrun initramfs.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Root filesystem image, attached read-only as /dev/vda; `none` for no root disk.
    /// Default: VMRUN_ROOTFS, else the built ext4 image.
    #[arg(long, value_name = "PATH|none")]
    rootfs: Option<PathBuf>,
    /// A named image as the root (`vmrun images ls`; made by `vmrun images import` or
    /// `vmrun commit`): its filesystem and layers below any --layer, and its config's env,
    /// working directory, user and command for the commands run in the VM.
    #[arg(long, value_name = "NAME", conflicts_with = "rootfs")]
    image: Option<String>,
    /// Overlay root: `tmpfs`, an upper disk image (see `vmrun overlay create`), or `none` (a
    /// read-only root whatever GONDOLIN_ROOT_OVERLAY says). Without it,
    /// GONDOLIN_ROOT_OVERLAY=1|true|tmpfs turns on the tmpfs overlay.
    #[arg(long, value_name = "tmpfs|none|PATH")]
    overlay: Option<PathBuf>,
    /// Size of a tmpfs upper layer, e.g. 256M or 50% (implies --overlay tmpfs).
    #[arg(long)]
    overlay_size: Option<String>,
    /// Filesystem of a disk upper layer (default ext4).
    #[arg(long)]
    overlay_fstype: Option<String>,
    /// A read-only layer above the root filesystem: a capture tar (`vmrun capture`) or a built
    /// layer image (repeatable; the first given is the lowest). Each tar is turned into an
    /// erofs image once and cached by its SHA-256.
    #[arg(long = "layer", value_name = "TAR|IMAGE")]
    layers: Vec<PathBuf>,
    /// Another disk, PATH or PATH,ro (repeatable); after the rootfs, the overlay disk and the
    /// layers.
    #[arg(long = "disk", value_name = "PATH[,ro]")]
    disks: Vec<PathBuf>,
    /// Extra kernel command-line parameters, appended after vmrun's own (an explicit
    /// root.overlay= here wins over --overlay and GONDOLIN_ROOT_OVERLAY).
    #[arg(long)]
    cmdline: Option<String>,
    /// Guest memory in MiB [default: 512; 256 where this host emulates guest ring 0].
    #[arg(long)]
    memory: Option<u64>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// Keep the guest console in this file.
    #[arg(long)]
    console_log: Option<PathBuf>,
    /// Compatibility variant for hosts that emulate guest ring 0: auto, pvm or off.
    #[arg(long, default_value_t = Compat::Auto)]
    compat: Compat,
    /// Entry protocol for ELF kernels: auto, pvh or linux64.
    #[arg(long, default_value_t = BootProtocol::Auto)]
    boot_protocol: BootProtocol,
    /// Run the VMM without its seccomp filters (debugging; `vmrun doctor` and -v say so).
    #[arg(long)]
    no_seccomp: bool,
    /// Run the VMM outside its jail (its own namespaces, an empty root, an unprivileged user,
    /// a cgroup): debugging only; `vmrun doctor` and -v say so.
    #[arg(long)]
    no_jail: bool,
    /// The user the jailed VMM runs as, UID[:GID]. Default: a fresh uid and gid for each VM.
    #[arg(long, value_name = "UID[:GID]")]
    jail_user: Option<JailUser>,
    /// Limit the VM's CPU time to this percentage of one CPU (50: half a CPU, 200: two),
    /// through its cgroup v2 group.
    #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    cpu_quota: Option<u32>,
    /// Start from a snapshot (a name from `vmrun snapshot ls`, or a directory) instead of
    /// booting: restored in milliseconds with the snapshot's own options. (For `snapshot
    /// create`: the running VM to snapshot.)
    #[arg(long, value_name = "SNAPSHOT")]
    pub from: Option<String>,
    /// Print the kernel, disks and kernel command line the VM would get, and exit.
    #[arg(long)]
    pub dry_run: bool,
}

/// `vmrun boot`: the VM options and what only a VM without the agent takes.
#[derive(clap::Args, Clone, Debug)]
pub struct BootArgs {
    #[command(flatten)]
    pub vm: VmArgs,
    /// A command for the init to run in the new root; its exit status becomes vmrun's.
    #[arg(long)]
    exec: Option<String>,
    /// Give up after this many seconds (0: wait forever).
    #[arg(long, default_value_t = 0)]
    pub timeout: u64,
    /// Give the guest a vsock device whose host side is this Unix socket (connect, send
    /// `CONNECT <port>\n`, read `OK <port>\n`); guest connections to host port P go to PATH_P.
    #[arg(long, value_name = "PATH")]
    vsock: Option<PathBuf>,
    /// The guest's vsock CID.
    #[arg(long, default_value_t = DEFAULT_CID)]
    vsock_cid: u64,
    /// Start the VM a snapshot directory holds instead of booting (the library passes the
    /// snapshot's own options with it).
    #[arg(long, value_name = "DIR", hide = true)]
    pub restore: Option<PathBuf>,
    /// The defaults of the commands run in the VM (an image's config), as JSON: the library
    /// passes them so that the snapshots the VMM takes keep them.
    #[arg(long, value_name = "JSON", hide = true, value_parser = parse_defaults)]
    exec_defaults: Option<ExecDefaults>,
}

fn parse_defaults(s: &str) -> Result<ExecDefaults, String> {
    serde_json::from_str(s).map_err(|e| format!("not the command defaults vmrun writes: {e}"))
}

/// `PATH,ro` → (PATH, read-only).
fn disk(arg: &Path) -> DiskConfig {
    let bytes = arg.as_os_str().as_bytes();
    match bytes.strip_suffix(b",ro") {
        Some(p) => DiskConfig {
            path: PathBuf::from(OsString::from_vec(p.to_vec())),
            read_only: true,
        },
        None => DiskConfig {
            path: arg.to_path_buf(),
            read_only: false,
        },
    }
}

impl VmArgs {
    /// The options these flags ask for; a combination that makes no sense is an error.
    pub fn options(&self) -> Result<VmOptions, OverlayError> {
        Ok(VmOptions {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            rootfs: match &self.rootfs {
                None => Rootfs::Default,
                Some(p) if p.as_os_str() == "none" => Rootfs::None,
                Some(p) => Rootfs::Path(p.clone()),
            },
            image: self.image.clone(),
            exec_defaults: None,
            overlay: Overlay::from_flags(
                self.overlay.as_deref(),
                self.overlay_size.as_deref(),
                self.overlay_fstype.as_deref(),
            )?,
            layers: self.layers.clone(),
            disks: self.disks.iter().map(|d| disk(d)).collect(),
            exec: None,
            cmdline: self.cmdline.clone(),
            memory_mib: self.memory,
            vcpus: self.cpus,
            compat: self.compat,
            boot_protocol: self.boot_protocol,
            vsock: None,
            console_log: self.console_log.clone(),
            no_seccomp: self.no_seccomp,
            no_jail: self.no_jail,
            jail_user: self.jail_user,
            cpu_quota: self.cpu_quota,
        })
    }
}

impl VmArgs {
    /// These flags without `--from`.
    pub fn without_from(&self) -> VmArgs {
        VmArgs {
            from: None,
            ..self.clone()
        }
    }

    /// Whether no VM option was given (they apply only where a command starts a VM).
    pub fn is_default(&self) -> bool {
        !self.dry_run
            && self.from.is_none()
            && self.options().is_ok_and(|o| o == VmOptions::default())
    }
}

impl BootArgs {
    pub fn options(&self) -> Result<VmOptions, OverlayError> {
        Ok(VmOptions {
            exec: self.exec.clone(),
            exec_defaults: self.exec_defaults.clone(),
            vsock: self.vsock.clone().map(|uds_path| VsockConfig {
                cid: self.vsock_cid,
                uds_path,
            }),
            ..self.vm.options()?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Boot {
        #[command(flatten)]
        args: BootArgs,
    }

    fn parse(args: Vec<OsString>) -> VmOptions {
        let argv = std::iter::once(OsString::from("vmrun-boot")).chain(args);
        Boot::try_parse_from(argv).unwrap().args.options().unwrap()
    }

    /// What the library puts on the VMM's command line is what the VMM reads back.
    #[test]
    fn options_survive_the_vmm_command_line() {
        let samples = vec![
            VmOptions::default(),
            VmOptions {
                image: Some("debian:12".into()),
                ..Default::default()
            },
            VmOptions {
                kernel: Some("/k/vmlinux".into()),
                initrd: Some("/i/initramfs.cpio".into()),
                rootfs: Rootfs::None,
                overlay: Some(Overlay::None),
                memory_mib: Some(128),
                vcpus: 4,
                compat: Compat::Pvm,
                boot_protocol: BootProtocol::Linux64,
                exec: Some("/bin/sh -c 'exit 3'".into()),
                exec_defaults: Some(ExecDefaults {
                    argv: vec!["/app/run".into(), "--flag=\"x y\"".into()],
                    env: vec![("PATH".into(), "/app:/bin".into())],
                    cwd: Some("/app".into()),
                    uid: Some(1000),
                    gid: Some(1000),
                }),
                ..Default::default()
            },
            VmOptions {
                rootfs: Rootfs::Path("/images/root fs.ext4".into()),
                overlay: Some(Overlay::Tmpfs {
                    size: Some("50%".into()),
                }),
                disks: vec![
                    DiskConfig {
                        path: "/d/a.img".into(),
                        read_only: true,
                    },
                    DiskConfig {
                        path: "/d/b,rw.img".into(),
                        read_only: false,
                    },
                ],
                cmdline: Some("quiet root.overlaysize=8M --not-a-flag".into()),
                compat: Compat::Off,
                vsock: Some(VsockConfig {
                    cid: 7,
                    uds_path: "/run/v.sock".into(),
                }),
                console_log: Some("/tmp/console.log".into()),
                no_seccomp: true,
                no_jail: true,
                ..Default::default()
            },
            VmOptions {
                // Paths need not be UTF-8.
                rootfs: Rootfs::Path(PathBuf::from(OsString::from_vec(b"/img/\xffroot".to_vec()))),
                overlay: Some(Overlay::Disk {
                    path: "/u/upper.ext4".into(),
                    fstype: "xfs".into(),
                }),
                jail_user: Some(JailUser {
                    uid: 4000,
                    gid: 4001,
                }),
                cpu_quota: Some(150),
                layers: vec!["/l/one.tar".into(), "/l/two.erofs".into()],
                ..Default::default()
            },
            VmOptions {
                overlay: Some(Overlay::Tmpfs { size: None }),
                ..Default::default()
            },
        ];
        for o in samples {
            assert_eq!(parse(o.to_args()), o);
        }
    }

    #[test]
    fn one_default_memory_size_everywhere() {
        // Left to `resolve`, which knows the host: the CLI and the library agree.
        assert_eq!(parse(vec![]).memory_mib, None);
        assert_eq!(VmOptions::default().memory_mib, None);
    }

    #[test]
    fn flag_combinations_that_make_no_sense_are_errors() {
        let bad = |flags: &[&str]| {
            let argv = std::iter::once("vmrun-boot").chain(flags.iter().copied());
            Boot::try_parse_from(argv)
                .unwrap()
                .args
                .options()
                .unwrap_err()
        };
        assert_eq!(
            bad(&["--overlay", "tmpfs", "--overlay-fstype", "ext4"]),
            OverlayError::FstypeWithoutDisk
        );
        assert!(matches!(
            bad(&["--overlay", "/u.img", "--overlay-size", "1G"]),
            OverlayError::SizeWithDisk(_)
        ));
        assert!(Boot::try_parse_from(["vmrun-boot", "--compat", "maybe"]).is_err());
    }
}
