//! The `vmrun` command line: argument parsing and the exit-code policy live here, outside the
//! library; each command is a thin layer over `vmrun::api` or the VMM's builder.

mod args;
mod bash;
mod bench;
mod boot;
mod doctor;
mod exit;
mod named;
mod progress;
mod signals;
mod snapshot;
mod vm;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use clap::{Parser, Subcommand};

use args::{BootArgs, VmArgs};
use exit::{exit_code, EXIT_LAUNCHER};
use vmrun::launch::images;

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
    /// Start a VM in the background and print its name once its agent answers; use it with
    /// `exec NAME`, `bash NAME`, `cp`, `capture`, and end it with `stop`.
    Start {
        /// The VM's name (letters, digits, '-', '_', '.'); one is generated when omitted.
        #[arg(long)]
        name: Option<String>,
        /// Start this many VMs (with --from: forks of one snapshot); with --name they are
        /// NAME-1 … NAME-N.
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[command(flatten)]
        vm: VmArgs,
    },
    /// An interactive shell (PTY, resize, Ctrl-C to the guest) in the running VM NAME, or in a
    /// fresh VM that ends with it; exits with the shell's status.
    Bash {
        /// A running VM (see `vmrun ls`); without it, a fresh VM.
        #[arg(value_name = "NAME")]
        name: Option<String>,
        #[command(flatten)]
        vm: VmArgs,
    },
    /// Run one command, in the running VM NAME or in a fresh VM: stdout and stderr kept apart,
    /// its exit code returned (125 launcher error, 126 cannot execute, 127 not found, 128+N
    /// killed by signal N).
    Exec {
        /// A running VM (see `vmrun ls`); without it, a fresh VM runs the command.
        #[arg(value_name = "NAME")]
        name: Option<String>,
        #[command(flatten)]
        vm: VmArgs,
        #[command(flatten)]
        cmd: vm::CmdArgs,
    },
    /// Copy files or directories between the host and a running VM (NAME:/path on one side),
    /// as `docker cp` does.
    Cp {
        #[arg(value_name = "SRC")]
        src: String,
        #[arg(value_name = "DST")]
        dst: String,
    },
    /// Write a tar of everything the running VM NAME wrote (its overlay upper layer).
    Capture {
        name: String,
        #[arg(value_name = "OUT.tar")]
        out: PathBuf,
    },
    /// What a running VM (its upper layer) or a capture tar changed, as `docker diff` shows
    /// it: A added, C changed, D deleted. Needs root (the images below are mounted read-only).
    Diff {
        #[arg(value_name = "NAME|CAPTURE.tar")]
        target: String,
        /// JSON: an array of {"kind": "A|C|D", "path": "/…"}.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        below: BelowArgs,
    },
    /// Keep a running VM's stack plus what it wrote (or a capture tar over its stack) as a
    /// named image for `--image`: the root and layers below, the upper as the top layer, and
    /// the image's defaults for commands.
    Commit {
        #[arg(value_name = "NAME|CAPTURE.tar")]
        target: String,
        /// The new image's name.
        #[arg(value_name = "IMAGE")]
        new_image: String,
        #[command(flatten)]
        below: BelowArgs,
    },
    /// List the VMs: name, state (running or dead), VMM pid, age, memory, vCPUs, overlay.
    Ls,
    /// Stop running VMs: a clean shutdown, then a kill after --time seconds; their files are
    /// removed (also a dead VM's leftovers).
    Stop {
        names: Vec<String>,
        /// Every VM.
        #[arg(long)]
        all: bool,
        /// Seconds to wait for a clean shutdown before the VMM is killed.
        #[arg(long, default_value_t = 10)]
        time: u64,
    },
    /// Like exec, with files uploaded first and the overlay captured after (with --upload or
    /// --capture and no overlay chosen, a tmpfs overlay is used).
    Run {
        #[command(flatten)]
        vm: VmArgs,
        /// Upload a host file before the command (repeatable).
        #[arg(long, value_name = "SRC:DST")]
        upload: Vec<String>,
        /// Write a tar of everything the guest wrote (the overlay upper layer) here.
        #[arg(long, value_name = "OUT.tar")]
        capture: Option<PathBuf>,
        #[command(flatten)]
        cmd: vm::CmdArgs,
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
        /// Only these groups of rows (repeatable): vmm, agent, vsock, guest, snapshot, layers.
        #[arg(long, value_enum)]
        only: Vec<bench::Group>,
    },
    /// Where a VM's start and one exec spend their time: the start phases, the guest kernel's
    /// log, KVM's exits and page faults. With several --build, the builds are compared side by
    /// side (boots alternate between them).
    Profile {
        /// Boots per build.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// `exec /bin/true` round trips per boot.
        #[arg(long, default_value_t = 10)]
        execs: usize,
        /// A build: NAME=DIR[,memory=MIB][,cmdline=PARAMS], DIR holding vmrun, vmlinux and
        /// initramfs.cpio (scripts/profile-build.sh makes one); NAME alone is this vmrun with
        /// the default images. Default: one, "this".
        #[arg(long = "build", value_name = "NAME=DIR")]
        builds: Vec<bench::profile::Build>,
        /// Log every initcall's time (adds `initcall_debug`; its own cost shows in the boot).
        #[arg(long)]
        initcalls: bool,
    },
    /// Memory snapshots: boot once, then start VMs from the snapshot in milliseconds
    /// (`vmrun start|exec|bash|run --from NAME`).
    Snapshot {
        #[command(subcommand)]
        action: SnapshotAction,
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

/// What a capture tar was taken over (a running VM's stack is known).
#[derive(clap::Args)]
struct BelowArgs {
    /// For a tar: the root image it was taken over (default: the built rootfs).
    #[arg(long, value_name = "PATH", conflicts_with = "image")]
    rootfs: Option<PathBuf>,
    /// For a tar: the named image it was taken over (its root and layers).
    #[arg(long, value_name = "NAME")]
    image: Option<String>,
    /// For a tar: the layers it was taken over, bottom first, above the root or the image's
    /// layers (repeatable).
    #[arg(long = "layer", value_name = "TAR|IMAGE")]
    layers: Vec<PathBuf>,
}

impl BelowArgs {
    fn below(&self) -> named::Below<'_> {
        named::Below {
            rootfs: self.rootfs.as_deref(),
            layers: &self.layers,
            image: self.image.as_deref(),
        }
    }
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
enum SnapshotAction {
    /// Boot a VM with these options, wait for its agent and snapshot it (the VM then ends);
    /// or, with --from VM, snapshot the running VM VM (see `vmrun ls`), which runs on.
    Create {
        /// The snapshot's name (kept in VMRUN_SNAPSHOT_DIR, else ~/.local/share/vmrun/snapshots),
        /// or a directory path (with a '/').
        name: String,
        #[command(flatten)]
        vm: Box<VmArgs>,
    },
    /// List the snapshots: memory, vCPUs, size on disk, the images they need.
    Ls,
    /// Remove snapshots.
    Rm { names: Vec<String> },
}

#[derive(Subcommand)]
enum ImagesAction {
    /// Build kernel (hardware and PVM variants), rootfs and initramfs into the cache.
    Build {
        /// Build only these (kernel, rootfs, initramfs); all when omitted.
        only: Vec<String>,
    },
    /// List the built images and the named ones (`--image NAME`).
    Ls,
    /// Make a named image from a container image: a `docker save` archive or an OCI image
    /// layout (a directory or a tar of one). Its layers are flattened into one read-only
    /// root; its config's entrypoint, env, working directory and user become the defaults
    /// of commands run with `--image NAME`. Needs root (the layers' owners are kept).
    Import {
        #[arg(value_name = "ARCHIVE|DIR")]
        archive: PathBuf,
        /// The image's name (default: the archive's tag without registry and path, else the
        /// archive's file name).
        #[arg(long)]
        name: Option<String>,
        /// Which image, where the archive holds several: a tag or ref name.
        #[arg(long = "ref", value_name = "REF")]
        reference: Option<String>,
    },
    /// Remove named images (VMs running from one keep running).
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
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

static VERBOSE: AtomicU8 = AtomicU8::new(0);

/// How many `-v` were given.
pub fn verbose() -> u8 {
    VERBOSE.load(Ordering::Relaxed)
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The VMM takes its signals once its jail is built (which needs a single thread).
    if !matches!(cli.command, Command::Boot(_)) {
        signals::install();
    }
    VERBOSE.store(cli.verbose, Ordering::Relaxed);
    init_logging(cli.verbose);
    match cli.command {
        Command::Boot(args) => boot::boot(&args),
        Command::Start { name, count, vm } => named::start(name.as_deref(), count, &vm),
        Command::Snapshot {
            action: SnapshotAction::Create { name, vm },
        } => snapshot::create(&name, &vm),
        Command::Snapshot {
            action: SnapshotAction::Ls,
        } => snapshot::ls(),
        Command::Snapshot {
            action: SnapshotAction::Rm { names },
        } => snapshot::rm(&names),
        Command::Bash { name, vm } => bash::bash(name.as_deref(), &vm),
        Command::Exec {
            name: Some(name),
            vm,
            cmd,
        } => named::exec_in(&name, &vm, &cmd),
        Command::Exec {
            name: None,
            vm,
            cmd,
        } => vm::run(&vm, &cmd, &[], None),
        Command::Cp { src, dst } => named::cp(&src, &dst),
        Command::Capture { name, out } => named::capture(&name, &out),
        Command::Diff {
            target,
            json,
            below,
        } => named::diff(&target, &below.below(), json),
        Command::Commit {
            target,
            new_image,
            below,
        } => named::commit(&target, &new_image, &below.below()),
        Command::Ls => named::ls(),
        Command::Stop { names, all, time } => named::stop(&names, all, Duration::from_secs(time)),
        Command::Run {
            vm,
            upload,
            capture,
            cmd,
        } => vm::run(&vm, &cmd, &upload, capture.as_ref()),
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
            named::images_ls();
            ExitCode::SUCCESS
        }
        Command::Images {
            action:
                ImagesAction::Import {
                    archive,
                    name,
                    reference,
                },
        } => named::images_import(&archive, name.as_deref(), reference.as_deref()),
        Command::Images {
            action: ImagesAction::Rm { names },
        } => named::images_rm(&names),
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
        } => boot::test_guest(&name, cpus, vsock, memory, timing),
        Command::Overlay {
            action: OverlayAction::Create { path, size, fstype },
        } => match vmrun::launch::overlay::create_disk(&path, &size, &fstype) {
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
        Command::Bench { quick, guest, only } => {
            print!("{}", bench::run(bench::Scale { quick }, guest, &only));
            ExitCode::SUCCESS
        }
        Command::Profile {
            runs,
            execs,
            mut builds,
            initcalls,
        } => {
            if builds.is_empty() {
                builds.push("this".parse().expect("a bare name is a build"));
            }
            let o = bench::profile::Options {
                runs: runs.max(1),
                execs: execs.max(1),
                initcalls,
            };
            match bench::profile::run(&builds, o) {
                Ok(report) => {
                    print!("{report}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("vmrun profile: {e}");
                    exit_code(EXIT_LAUNCHER)
                }
            }
        }
        Command::HostKind => match vmrun::host::compat::ring0_emulated() {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Clap's own checks of every command (duplicate names, conflicting ids), which otherwise
    /// fire only when that command is parsed.
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
