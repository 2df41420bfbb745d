//! The `vmrun` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

use crate::builder::{
    BootProtocol, DiskConfig, Outcome, Payload, VmConfig, Vmm, VsockConfig, EXIT_LAUNCHER,
};
use crate::compat::Compat;
use crate::devices::legacy::serial::ConsoleSink;
use crate::launch::{self, LaunchOptions, Rootfs};
use crate::overlay::OverlayRequest;
use crate::{doctor, images, testguest};

#[derive(Parser)]
#[command(
    name = "vmrun",
    version,
    about = "Run Linux microVMs on KVM with an overlay root"
)]
pub struct Cli {
    /// More logging on stderr (-v: info, -vv: debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a kernel and initramfs and exit with the guest's status.
    Boot(Box<BootArgs>),
    /// An interactive shell in a fresh VM (PTY, resize, Ctrl-C to the guest); exits with the
    /// shell's status.
    Bash {
        #[command(flatten)]
        vm: crate::cli_vm::VmArgs,
    },
    /// Run one command in a fresh VM: stdout and stderr kept apart, its exit code returned
    /// (125 launcher error, 126 cannot execute, 127 not found, 128+N killed by signal N).
    Exec {
        #[command(flatten)]
        vm: crate::cli_vm::VmArgs,
        #[command(flatten)]
        cmd: crate::cli_vm::CmdArgs,
    },
    /// Like exec, with files uploaded first and the overlay captured after (with --upload or
    /// --capture and no overlay chosen, a tmpfs overlay is used).
    Run {
        #[command(flatten)]
        vm: crate::cli_vm::VmArgs,
        /// Upload a host file before the command (repeatable).
        #[arg(long, value_name = "SRC:DST")]
        upload: Vec<String>,
        /// Write a tar of everything the guest wrote (the overlay upper layer) here.
        #[arg(long, value_name = "OUT.tar")]
        capture: Option<PathBuf>,
        #[command(flatten)]
        cmd: crate::cli_vm::CmdArgs,
    },
    /// Check this host: KVM, guest ring-0 speed, images, runnable test tiers.
    Doctor,
    /// Measure what vmrun costs: VMM start and memory, the agent over its host transport
    /// (exec, upload, download, capture beside GNU tar), the vsock device model, and guest
    /// figures where this host runs guest ring 0 at speed. Prints median and p99 per row.
    Bench {
        /// Smaller sizes and fewer repetitions (under a minute).
        #[arg(long)]
        quick: bool,
        /// Measure inside a VM even where guest ring 0 is emulated (labelled as such).
        #[arg(long)]
        guest: bool,
    },
    /// Manage upper-layer disks for `--overlay PATH`.
    Overlay {
        #[command(subcommand)]
        action: OverlayAction,
    },
    /// Build or list the guest images.
    Images {
        #[command(subcommand)]
        action: ImagesAction,
    },
    /// Print `pvm` when this host emulates guest ring 0, else `hw` (used by the image scripts).
    #[command(hide = true)]
    HostKind,
    /// Run one of the built-in test guests (used by the test suite).
    #[command(hide = true)]
    TestGuest {
        name: String,
        #[arg(long, default_value_t = 1)]
        cpus: u8,
        /// Print the CLOCK_MONOTONIC time of the first KVM_RUN on stderr.
        #[arg(long)]
        timing: bool,
        /// Attach a vsock device with its host socket here.
        #[arg(long)]
        vsock: Option<PathBuf>,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 32)]
        memory: u64,
    },
}

#[derive(Subcommand)]
enum OverlayAction {
    /// Create a blank upper disk: a sparse image formatted with a filesystem (never overwrites).
    Create {
        path: PathBuf,
        /// Size with an optional k, m or g suffix, e.g. 1G.
        #[arg(long)]
        size: String,
        /// Filesystem for the disk.
        #[arg(long, default_value = "ext4")]
        fstype: String,
    },
}

#[derive(Subcommand)]
enum ImagesAction {
    /// Build kernel (hardware and PVM variants), rootfs and initramfs into the cache.
    Build {
        /// Build only these (kernel, rootfs, initramfs); all when omitted.
        only: Vec<String>,
    },
    /// List the images and where they are.
    Ls,
}

#[derive(clap::Args)]
struct BootArgs {
    /// Kernel image (ELF vmlinux or bzImage). Default: the built image for this host.
    #[arg(long, env = "VMRUN_KERNEL")]
    kernel: Option<PathBuf>,
    /// Initramfs (newc cpio). Default: the built vmrun initramfs.
    #[arg(long, env = "VMRUN_INITRAMFS")]
    initrd: Option<PathBuf>,
    /// Root filesystem image, attached read-only as /dev/vda; `none` for no root disk.
    /// Default: VMRUN_ROOTFS, else the built ext4 image.
    #[arg(long)]
    rootfs: Option<String>,
    /// Overlay root: `tmpfs`, or a disk image (see `vmrun overlay create`) for the upper layer.
    /// Without it, GONDOLIN_ROOT_OVERLAY=1|true|tmpfs turns on the tmpfs overlay.
    #[arg(long)]
    overlay: Option<String>,
    /// Size of a tmpfs upper layer, e.g. 256M or 50% (implies --overlay tmpfs).
    #[arg(long)]
    overlay_size: Option<String>,
    /// Filesystem of a disk upper layer (default ext4).
    #[arg(long)]
    overlay_fstype: Option<String>,
    /// Another disk, PATH or PATH,ro (repeatable); after the rootfs and the overlay disk.
    #[arg(long = "disk", value_name = "PATH[,ro]")]
    disks: Vec<String>,
    /// A command for the init to run in the new root; its exit status becomes vmrun's.
    #[arg(long)]
    exec: Option<String>,
    /// Extra kernel command-line parameters, appended after vmrun's own (an explicit
    /// root.overlay= here wins over --overlay and GONDOLIN_ROOT_OVERLAY).
    #[arg(long)]
    cmdline: Option<String>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// Write the guest console to this file instead of stdout.
    #[arg(long)]
    console_log: Option<PathBuf>,
    /// Give up after this many seconds (0: wait forever).
    #[arg(long, default_value_t = 0)]
    timeout: u64,
    /// Compatibility variant for hosts that emulate guest ring 0.
    #[arg(long, value_enum, default_value_t = Compat::Auto)]
    compat: Compat,
    /// Entry protocol for ELF kernels.
    #[arg(long, value_enum, default_value_t = BootProtocol::Auto)]
    boot_protocol: BootProtocol,
    /// Give the guest a vsock device whose host side is this Unix socket (connect, send
    /// `CONNECT <port>\n`, read `OK <port>\n`); guest connections to host port P go to PATH_P.
    #[arg(long, value_name = "PATH")]
    vsock: Option<PathBuf>,
    /// The guest's vsock CID.
    #[arg(long, default_value_t = 3)]
    vsock_cid: u64,
}

impl BootArgs {
    fn launch_options(&self) -> LaunchOptions {
        LaunchOptions {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            rootfs: match self.rootfs.as_deref() {
                None => Rootfs::Default,
                Some("none") => Rootfs::None,
                Some(p) => Rootfs::Path(p.into()),
            },
            overlay: OverlayRequest {
                overlay: self.overlay.clone(),
                size: self.overlay_size.clone(),
                fstype: self.overlay_fstype.clone(),
            },
            disks: self
                .disks
                .iter()
                .map(|d| match d.strip_suffix(",ro") {
                    Some(p) => DiskConfig {
                        path: p.into(),
                        read_only: true,
                    },
                    None => DiskConfig {
                        path: d.into(),
                        read_only: false,
                    },
                })
                .collect(),
            exec: self.exec.clone(),
            cmdline: self.cmdline.clone(),
            memory_mib: self.memory,
            vcpus: self.cpus,
            compat: self.compat,
            boot_protocol: self.boot_protocol,
            vsock: self.vsock.clone().map(|uds_path| VsockConfig {
                cid: self.vsock_cid,
                uds_path,
            }),
        }
    }
}

struct StderrLogger(log::LevelFilter);

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= self.0
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            eprintln!("vmrun: {}: {}", r.level().as_str().to_lowercase(), r.args());
        }
    }
    fn flush(&self) {}
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        2 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    if log::set_boxed_logger(Box::new(StderrLogger(level))).is_ok() {
        log::set_max_level(level);
    }
}

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match cli.command {
        Command::Boot(args) => boot(*args),
        Command::Bash { vm } => crate::cli_vm::bash(&vm),
        Command::Exec { vm, cmd } => crate::cli_vm::run(&vm, &cmd, &[], None),
        Command::Run {
            vm,
            upload,
            capture,
            cmd,
        } => crate::cli_vm::run(&vm, &cmd, &upload, capture.as_ref()),
        Command::Doctor => {
            print!("{}", doctor::Report::gather().render());
            ExitCode::SUCCESS
        }
        Command::Images {
            action: ImagesAction::Ls,
        } => {
            for (name, path, ok) in images::inventory() {
                println!(
                    "{:<16} {:<8} {}",
                    name,
                    if ok { "built" } else { "missing" },
                    path.display()
                );
            }
            ExitCode::SUCCESS
        }
        Command::Images {
            action: ImagesAction::Build { only },
        } => {
            let script = images::scripts_dir().join("build-images.sh");
            match std::process::Command::new("bash")
                .arg(&script)
                .args(&only)
                .status()
            {
                Ok(s) => exit_code(s.code().unwrap_or(1)),
                Err(e) => {
                    eprintln!("vmrun: cannot run {}: {e}", script.display());
                    exit_code(EXIT_LAUNCHER)
                }
            }
        }
        Command::TestGuest {
            name,
            cpus,
            timing,
            vsock,
            memory,
        } => {
            if timing {
                crate::vstate::vcpu::REPORT_FIRST_RUN
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            }
            test_guest(&name, cpus, vsock, memory)
        }
        Command::Overlay {
            action: OverlayAction::Create { path, size, fstype },
        } => match crate::overlay::create_disk(&path, &size, &fstype) {
            Ok(()) => {
                println!(
                    "{}: {size} {fstype} upper disk; use it with --overlay {}",
                    path.display(),
                    path.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("vmrun: {e}");
                exit_code(EXIT_LAUNCHER)
            }
        },
        Command::Bench { quick, guest } => {
            print!(
                "{}",
                crate::bench::run(crate::bench::Scale { quick }, guest)
            );
            ExitCode::SUCCESS
        }
        Command::HostKind => match crate::compat::ring0_emulated() {
            Ok(pvm) => {
                println!("{}", if pvm { "pvm" } else { "hw" });
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("vmrun: cannot probe this host's KVM: {e}");
                exit_code(EXIT_LAUNCHER)
            }
        },
    }
}

fn run(cfg: VmConfig, timeout: Option<Duration>) -> ExitCode {
    let t0 = Instant::now();
    let vmm = match Vmm::start(cfg) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("vmrun: {e}");
            return exit_code(EXIT_LAUNCHER);
        }
    };
    let reason = vmm.wait(timeout);
    let outcome = Outcome::new(reason, vmm.console(), timeout);
    drop(vmm);
    log::info!(
        "{} after {:.2}s",
        outcome.summary,
        t0.elapsed().as_secs_f64()
    );
    if outcome.code != 0 || outcome.reason.is_none() {
        eprintln!("vmrun: {}", outcome.summary);
    }
    exit_code(outcome.code)
}

/// With `VMRUN_OWNER_PID` set (the library does), the VM ends when that process does.
fn watch_owner() {
    let Some(owner) = std::env::var(crate::api::vm::OWNER_ENV)
        .ok()
        .and_then(|p| p.parse::<i32>().ok())
    else {
        return;
    };
    std::thread::spawn(move || loop {
        // SAFETY: getppid has no preconditions and cannot fail.
        if unsafe { libc::getppid() } != owner {
            eprintln!("vmrun: the owning process {owner} is gone; stopping the VM");
            std::process::exit(EXIT_LAUNCHER);
        }
        std::thread::sleep(Duration::from_millis(200));
    });
}

fn boot(a: BootArgs) -> ExitCode {
    watch_owner();
    let opts = a.launch_options();
    let env = std::env::var(crate::overlay::ENV_TOGGLE).ok();
    let resolved = match launch::resolve(&opts, env.as_deref()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmrun: {e}");
            return exit_code(EXIT_LAUNCHER);
        }
    };
    log::info!(
        "PVM compatibility variant: {}",
        if resolved.pvm { "on" } else { "off" }
    );
    log::info!("kernel command line: {}", resolved.cmdline);
    let console = match &a.console_log {
        None => ConsoleSink::Stdout,
        Some(p) => match std::fs::File::create(p) {
            Ok(f) => ConsoleSink::File(f),
            Err(e) => {
                eprintln!("vmrun: console log {}: {e}", p.display());
                return exit_code(EXIT_LAUNCHER);
            }
        },
    };
    run(
        resolved.into_config(&opts, console),
        (a.timeout > 0).then(|| Duration::from_secs(a.timeout)),
    )
}

fn test_guest(name: &str, cpus: u8, vsock: Option<PathBuf>, mem_mib: u64) -> ExitCode {
    let Some(g) = testguest::by_name(name) else {
        eprintln!("vmrun: no test guest named {name}");
        return exit_code(2);
    };
    let cfg = VmConfig {
        payload: Payload::Program {
            code: g.code,
            mode: g.mode,
        },
        mem_mib,
        vcpus: cpus,
        console: ConsoleSink::Stdout,
        disks: vec![],
        vsock: vsock.map(|uds_path| VsockConfig { cid: 3, uds_path }),
    };
    run(cfg, Some(Duration::from_secs(30)))
}
