//! `vmrun boot` (the VMM process: one VM, in the foreground, until it ends) and the hidden
//! `vmrun test-guest`, with the exit-code policy of every command: the workload's own status,
//! 128+N for a signal, and docker's 125 when the VM or the launcher failed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use vmrun::builder::Vmm;
use vmrun::config::{Payload, VmConfig, VsockConfig, DEFAULT_CID};
use vmrun::devices::legacy::serial::ConsoleSink;
use vmrun::host::testguest;
use vmrun::launch::{self, overlay::ENV_TOGGLE};
use vmrun::outcome::Outcome;

use super::args::BootArgs;
use super::exit::{exit_code, launcher_error, outcome_code, EXIT_LAUNCHER};

use vmrun::api::builder::{OWNER_ENV, VM_DIR_ENV};

/// Runs a started VM to its end (at most `timeout`) and reports how it ended.
fn run(vmm: Vmm, timeout: Option<Duration>) -> ExitCode {
    let t0 = Instant::now();
    let reason = vmm.wait(timeout);
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
    let vmm = match Vmm::start(resolved.into_config(&opts, console)) {
        Ok(v) => v,
        Err(e) => return launcher_error(e),
    };
    run(vmm, (a.timeout > 0).then(|| Duration::from_secs(a.timeout)))
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
    };
    let vmm = match Vmm::start(cfg) {
        Ok(v) => v,
        Err(e) => return launcher_error(e),
    };
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
