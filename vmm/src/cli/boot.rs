//! `vmrun boot` (the VMM process: one VM, in the foreground, until it ends) and the hidden
//! `vmrun test-guest`, with the exit-code policy of every command: the workload's own status,
//! 128+N for a signal, and docker's 125 when the VM or the launcher failed.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use vmrun::builder::Vmm;
use vmrun::config::{Payload, VmConfig, VsockConfig, DEFAULT_CID};
use vmrun::control::{self, Then};
use vmrun::devices::legacy::serial::ConsoleSink;
use vmrun::host::testguest;
use vmrun::launch::VmOptions;
use vmrun::launch::{self, overlay::ENV_TOGGLE};
use vmrun::outcome::Outcome;
use vmrun::snapshot::Snapshot;

use super::args::BootArgs;
use super::exit::{exit_code, launcher_error, outcome_code, EXIT_LAUNCHER};

use vmrun::api::builder::{OWNER_ENV, VM_DIR_ENV};

/// How often the VMM process looks for control requests while its VM runs.
const CONTROL_POLL: Duration = Duration::from_millis(50);

/// The control socket of a VM the library started, and the (pinned) options it was started
/// with, which a snapshot records.
struct Control {
    server: control::Server,
    opts: VmOptions,
}

/// Writes a snapshot into `dir` (absolute, existing, empty): images are identified before the
/// pause, the upper disk copied during it; then the VM resumes or stops. A failure after the
/// pause resumes the VM.
fn take_snapshot(vmm: &mut Vmm, opts: &VmOptions, dir: &Path, then: Then) -> Result<u64, String> {
    let empty = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .next()
        .is_none();
    if !empty {
        return Err(format!("{}: not empty", dir.display()));
    }
    let info = launch::snapshot::info_for(opts).map_err(|e| e.to_string())?;
    let t = Instant::now();
    let saved = vmm
        .snapshot(dir, &info)
        .map_err(|e| e.to_string())
        .and_then(|bytes| {
            launch::snapshot::save_upper(opts, dir)
                .map(|()| bytes)
                .map_err(|e| e.to_string())
        });
    log::info!(
        "snapshot into {}: {:?} in {:.1} ms",
        dir.display(),
        saved.as_ref().map(|_| ()),
        t.elapsed().as_secs_f64() * 1e3
    );
    match (&saved, then) {
        (Ok(_), Then::Stop) => vmm.stop(),
        _ => {
            if let Err(e) = vmm.resume() {
                log::error!("cannot resume after the snapshot: {e}");
                vmm.stop();
            }
        }
    }
    saved
}

/// Runs a started VM to its end (at most `timeout`), serving control requests meanwhile, and
/// reports how it ended.
fn run(vmm: Vmm, timeout: Option<Duration>) -> ExitCode {
    run_with(vmm, timeout, None)
}

fn run_with(mut vmm: Vmm, timeout: Option<Duration>, control: Option<Control>) -> ExitCode {
    let t0 = Instant::now();
    let reason = loop {
        let left = timeout.map(|t| t.saturating_sub(t0.elapsed()));
        if left.is_some_and(|l| l.is_zero()) {
            break None;
        }
        let slice = left.map_or(CONTROL_POLL, |l| l.min(CONTROL_POLL));
        if let Some(r) = vmm.wait(Some(slice)) {
            break Some(r);
        }
        let Some(c) = &control else { continue };
        while let Some((req, reply)) = c.server.try_next() {
            match req {
                control::Request::Snapshot { dir, then } => {
                    match take_snapshot(&mut vmm, &c.opts, &dir, then) {
                        Ok(bytes) => reply.ok(bytes),
                        Err(e) => reply.error(&e),
                    }
                }
            }
        }
    };
    let outcome = Outcome::new(reason, vmm.console(), timeout);
    drop(vmm);
    log::info!(
        "{} after {:.2}s",
        outcome.summary,
        t0.elapsed().as_secs_f64()
    );
    let code = outcome_code(&outcome);
    if code != 0 || outcome.reason.is_none() {
        eprintln!("vmrun: {}", outcome.summary);
    }
    exit_code(code)
}

/// With `VMRUN_OWNER_PID` set (the library does), the VM ends when that process does, unless
/// it was detached meanwhile (a mark in the VM's directory, `VMRUN_VM_DIR`).
fn watch_owner() {
    let Some(owner) = std::env::var(OWNER_ENV)
        .ok()
        .and_then(|p| p.parse::<i32>().ok())
    else {
        return;
    };
    let mark = std::env::var_os(VM_DIR_ENV)
        .map(|d| vmrun::runtime::VmPaths::from_dir(d.into()).detached_mark());
    std::thread::spawn(move || loop {
        // SAFETY: getppid has no preconditions and cannot fail.
        if unsafe { libc::getppid() } != owner {
            if mark.as_ref().is_some_and(|m| m.exists()) {
                return;
            }
            eprintln!("vmrun: the owning process {owner} is gone; stopping the VM");
            std::process::exit(EXIT_LAUNCHER);
        }
        std::thread::sleep(Duration::from_millis(200));
    });
}

pub fn boot(a: &BootArgs) -> ExitCode {
    watch_owner();
    let opts = match a.options() {
        Ok(o) => o,
        Err(e) => return launcher_error(e),
    };
    let env = std::env::var(ENV_TOGGLE).ok();
    let resolved = match launch::resolve(&opts, env.as_deref()) {
        Ok(r) => r,
        Err(e) => return launcher_error(e),
    };
    if a.vm.dry_run {
        super::vm::print_resolved(&resolved);
        return ExitCode::SUCCESS;
    }
    if let Some(w) = resolved.kernel_warning() {
        eprintln!("vmrun: warning: {w}");
    }
    log::info!(
        "PVM compatibility variant: {}",
        if resolved.pvm { "on" } else { "off" }
    );
    log::info!("kernel command line: {}", resolved.cmdline);
    let console = match &opts.console_log {
        None => ConsoleSink::Stdout,
        Some(p) => match std::fs::File::create(p) {
            Ok(f) => ConsoleSink::File(f),
            Err(e) => return launcher_error(format!("console log {}: {e}", p.display())),
        },
    };
    let mut cfg = resolved.into_config(&opts, console);
    let filters = if opts.no_seccomp {
        eprintln!(
            "vmrun: warning: seccomp is off (--no-seccomp): the VMM's threads are not filtered"
        );
        None
    } else {
        match vmrun::seccomp::Filters::build() {
            Ok(f) => Some(f),
            Err(e) => return launcher_error(e),
        }
    };
    log::info!(
        "seccomp: {}",
        if filters.is_some() {
            "on (allow-lists per thread: vCPU, event loop, control, main)"
        } else {
            "off"
        }
    );
    cfg.seccomp = filters.clone();
    let started = match &a.restore {
        None => Vmm::start(cfg),
        Some(dir) => match (Instant::now(), Snapshot::load(dir)) {
            (t, Ok(snap)) => {
                let r = Vmm::restore(cfg, &snap);
                if r.is_ok() {
                    // In the VM's log for `vmrun bench`.
                    eprintln!(
                        "{}{:.2} ms",
                        super::bench::snapshot::RESTORE_TIMING,
                        t.elapsed().as_secs_f64() * 1e3
                    );
                }
                r
            }
            (_, Err(e)) => return launcher_error(e),
        },
    };
    let vmm = match started {
        Ok(v) => v,
        Err(e) => return launcher_error(e),
    };
    // A VM the library started (it has a runtime directory) takes control requests.
    let control = std::env::var_os(VM_DIR_ENV).and_then(|d| {
        let path = vmrun::runtime::VmPaths::from_dir(d.into()).control();
        match control::Server::bind(&path, filters.clone()) {
            Ok(server) => Some(Control { server, opts }),
            Err(e) => {
                log::warn!("no control socket at {}: {e}", path.display());
                None
            }
        }
    });
    // The main thread from here on: waiting, control requests, the end.
    if let Some(f) = &filters {
        if let Err(e) = vmrun::seccomp::apply("main", &f.main) {
            return launcher_error(e);
        }
    }
    run_with(
        vmm,
        (a.timeout > 0).then(|| Duration::from_secs(a.timeout)),
        control,
    )
}

/// One of the built-in test guests (the test suite and the bench use them).
pub fn test_guest(
    name: &str,
    cpus: u8,
    vsock: Option<PathBuf>,
    mem_mib: u64,
    timing: bool,
) -> ExitCode {
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
        vsock: vsock.map(|uds_path| VsockConfig {
            cid: DEFAULT_CID,
            uds_path,
        }),
        probes: true,
        hide_pv_hypercalls: false,
        seccomp: None,
    };
    let filters = match vmrun::seccomp::Filters::build() {
        Ok(f) => f,
        Err(e) => return launcher_error(e),
    };
    let cfg = VmConfig {
        seccomp: Some(filters.clone()),
        ..cfg
    };
    let vmm = match Vmm::start(cfg) {
        Ok(v) => v,
        Err(e) => return launcher_error(e),
    };
    if let Err(e) = vmrun::seccomp::apply("main", &filters.main) {
        return launcher_error(e);
    }
    if timing {
        // The bench compares this CLOCK_MONOTONIC time with its own from before the spawn.
        let t = Instant::now();
        while vmm.first_run_ns().is_none() && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_micros(100));
        }
        match vmm.first_run_ns() {
            Some(ns) => eprintln!("vmrun: timing: first KVM_RUN at {ns} ns"),
            None => eprintln!("vmrun: timing: no vCPU entered KVM_RUN within 5s"),
        }
    }
    run(vmm, Some(Duration::from_secs(30)))
}
