//! PID 1 of the vmrun initramfs: kernel filesystems, the root (overlay or direct) from the
//! kernel command line, the switch, the workload, orphan reaping, and the status report.

use std::path::Path;
use std::process::Command;

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use vmrun_init::cmdline::{self, Config, NO_ROOT};
use vmrun_init::{mount_kernel_filesystems, plan, report, uptime, Failure};
use vmrun_protocol::status::{InitError, Status};

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("vsock-echo") {
        // Test tooling, run as an ordinary process; never as PID 1.
        match vmrun_init::echo::run(&args[1..]) {
            Ok(()) => std::process::exit(0),
            Err(e) => {
                eprintln!("vsock-echo: {e}");
                std::process::exit(1);
            }
        }
    }
    let status = match run() {
        Ok(s) => s,
        Err(f) => {
            eprintln!("{f}");
            Status::InitFailed(f.class as u8)
        }
    };
    report::finish(status);
}

fn run() -> Result<Status, Failure> {
    mount_kernel_filesystems(Path::new("/"))?;
    let line = std::fs::read_to_string("/proc/cmdline")
        .map_err(|e| Failure::new(InitError::Other, "read /proc/cmdline", e))?;
    let cfg = cmdline::parse(&line)?;
    if cfg.root != NO_ROOT {
        let root = plan::build_root(&cfg, Path::new("/"))?;
        plan::switch_root(&root.path)?;
        let mode = match &root.upper_fstype {
            Some(t) => format!(
                "overlay root: {} lower ({}), {t} upper",
                cfg.root, root.lower_fstype
            ),
            None => format!(
                "root: {} ({}, {})",
                cfg.root,
                root.lower_fstype,
                if cfg.rw { "rw" } else { "ro" }
            ),
        };
        println!("vmrun-init: {mode}");
    }
    println!(
        "vmrun-init: ready after {:.2}s of guest uptime",
        uptime().unwrap_or(-1.0)
    );
    match &cfg.exec {
        Some(argv) => run_workload(&cfg, argv),
        None => Ok(Status::Exited(0)),
    }
}

/// Starts the workload and reaps every child until it ends (PID 1 inherits all orphans).
fn run_workload(_cfg: &Config, argv: &[String]) -> Result<Status, Failure> {
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .env_clear()
        .env("PATH", PATH)
        .env("HOME", "/root")
        .env("TERM", "linux")
        .current_dir("/")
        .spawn()
        .map_err(|e| Failure::new(InitError::Exec, format!("vmrun.exec: start {}", argv[0]), e))?;
    let pid = Pid::from_raw(child.id() as i32);
    loop {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(p, code)) if p == pid => return Ok(Status::Exited(code as u8)),
            Ok(WaitStatus::Signaled(p, sig, _)) if p == pid => {
                return Ok(Status::Signaled(sig as i32 as u8))
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(Failure::new(InitError::Other, "wait for the workload", e)),
        }
    }
}
