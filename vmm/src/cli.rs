//! The `vmrun` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

use crate::builder::{BootProtocol, Outcome, Payload, VmConfig, Vmm, EXIT_LAUNCHER};
use crate::compat::Compat;
use crate::devices::legacy::serial::ConsoleSink;
use crate::{cmdline, doctor, images, testguest};

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
    Boot(BootArgs),
    /// Check this host: KVM, guest ring-0 speed, images, runnable test tiers.
    Doctor,
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
    /// Extra kernel command-line parameters, appended after vmrun's own.
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
        _ => log::LevelFilter::Debug,
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
        Command::Boot(args) => boot(args),
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
        Command::TestGuest { name, cpus } => test_guest(&name, cpus),
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

fn boot(a: BootArgs) -> ExitCode {
    let pvm = match a.compat.resolve() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("vmrun: cannot probe this host's KVM: {e}");
            return exit_code(EXIT_LAUNCHER);
        }
    };
    log::info!(
        "PVM compatibility variant: {}",
        if pvm { "on" } else { "off" }
    );
    let cmdline = match cmdline::assemble(a.cmdline.as_deref(), pvm) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmrun: {e}");
            return exit_code(EXIT_LAUNCHER);
        }
    };
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
    let cfg = VmConfig {
        payload: Payload::Linux {
            kernel: a.kernel.unwrap_or_else(|| images::default_kernel(pvm)),
            initrd: Some(a.initrd.unwrap_or_else(images::default_initramfs)),
            cmdline,
            protocol: a.boot_protocol,
        },
        mem_mib: a.memory,
        vcpus: a.cpus,
        console,
    };
    run(cfg, (a.timeout > 0).then(|| Duration::from_secs(a.timeout)))
}

fn test_guest(name: &str, cpus: u8) -> ExitCode {
    let Some(g) = testguest::by_name(name) else {
        eprintln!("vmrun: no test guest named {name}");
        return exit_code(2);
    };
    let cfg = VmConfig {
        payload: Payload::Program {
            code: g.code,
            mode: g.mode,
        },
        mem_mib: 32,
        vcpus: cpus,
        console: ConsoleSink::Stdout,
    };
    run(cfg, Some(Duration::from_secs(30)))
}
