//! `vmrun boot` (the VMM process: one VM, in the foreground, until it ends) and the hidden
//! `vmrun test-guest`, with the exit-code policy of every command: the workload's own status,
//! 128+N for a signal, and docker's 125 when the VM or the launcher failed.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use vmrun::builder::{SnapshotFiles, Vmm};
use vmrun::config::{Payload, VmConfig, VsockConfig, DEFAULT_CID};
use vmrun::control::{self, Then};
use vmrun::devices::legacy::serial::ConsoleSink;
use vmrun::host::testguest;
use vmrun::jail;
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
    /// What snapshots read on the host, opened before the jail (or why they could not be).
    sources: Result<launch::snapshot::Sources, String>,
}

/// Writes a snapshot into the files the caller sent (state, memory and, with a disk upper
/// layer, its copy), named under `dir` in messages: images are identified before the pause,
/// the upper disk copied during it; then the VM resumes or stops. A failure after the pause
/// resumes the VM.
fn take_snapshot(
    vmm: &mut Vmm,
    c: &Control,
    dir: &Path,
    files: &[std::fs::File],
    then: Then,
) -> Result<u64, String> {
    let sources = c.sources.as_ref().map_err(|e| e.clone())?;
    // The caller sends state, memory and an upper file, which stays empty without a disk
    // upper layer.
    let (Some(state), Some(memory)) = (files.first(), files.get(1)) else {
        return Err(format!(
            "a snapshot takes its files (state, memory, upper) with the request; {} came",
            files.len()
        ));
    };
    let upper = match (sources.has_upper(), files.get(2)) {
        (false, _) => None,
        (true, Some(u)) => Some(u),
        (true, None) => {
            return Err("this VM has a disk upper layer: send a third file for its copy".into())
        }
    };
    let info = launch::snapshot::info_from(&c.opts, sources).map_err(|e| e.to_string())?;
    let t = Instant::now();
    let state_path = dir.join(vmrun::snapshot::STATE_FILE);
    let memory_path = dir.join(vmrun::snapshot::MEMORY_FILE);
    let saved = vmm
        .snapshot_into(
            SnapshotFiles {
                state: (&state_path, state),
                memory: (&memory_path, memory),
            },
            &info,
        )
        .map_err(|e| e.to_string())
        .and_then(|bytes| match upper {
            Some(upper) => {
                let p = dir.join(launch::snapshot::UPPER_FILE);
                launch::snapshot::copy_upper(sources, upper, &p)
                    .map(|()| bytes)
                    .map_err(|e| e.to_string())
            }
            None => Ok(bytes),
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
        while let Some(inc) = c.server.try_next() {
            match inc.request {
                control::Request::Snapshot { dir, then } => {
                    match take_snapshot(&mut vmm, c, &dir, &inc.files, then) {
                        Ok(bytes) => inc.reply.ok(bytes),
                        Err(e) => inc.reply.error(&e),
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

/// The process a library-started VM must not outlive (`VMRUN_OWNER_PID`), and the mark of
/// its letting the VM go (in the VM's directory, `VMRUN_VM_DIR`).
fn owner() -> (Option<i32>, Option<PathBuf>) {
    let owner = std::env::var(OWNER_ENV)
        .ok()
        .and_then(|p| p.parse::<i32>().ok());
    let mark = std::env::var_os(VM_DIR_ENV)
        .map(|d| vmrun::runtime::VmPaths::from_dir(d.into()).detached_mark());
    (owner, mark)
}

/// Without a jail (whose supervisor does this), the VM ends when its owner does, unless it
/// was detached meanwhile.
fn watch_owner(owner: Option<i32>, mark: Option<PathBuf>) {
    let Some(owner) = owner else {
        return;
    };
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

/// The jail of this VM: what it must see (the KVM device, its images and disks, its runtime
/// directory or socket directory, a snapshot it restores), its limits and its supervision.
fn jail_spec(
    opts: &VmOptions,
    cfg: &VmConfig,
    restore: Option<&Path>,
    vm_dir: Option<&Path>,
) -> Result<jail::Spec, String> {
    let mut binds = vec![jail::Bind {
        path: "/dev/kvm".into(),
        writable: true,
        device: true,
    }];
    if let Payload::Linux { kernel, initrd, .. } = &cfg.payload {
        binds.push(jail::Bind::read_only(kernel));
        if let Some(i) = initrd {
            binds.push(jail::Bind::read_only(i));
        }
    }
    for d in &cfg.disks {
        binds.push(if d.read_only {
            jail::Bind::read_only(&d.path)
        } else {
            jail::Bind::writable(&d.path)
        });
    }
    let mut remove_after = Vec::new();
    let (name, root) = match vm_dir {
        Some(d) => {
            binds.push(jail::Bind::writable(d));
            let p = vmrun::runtime::VmPaths::from_dir(d.to_path_buf());
            remove_after.push(p.control());
            (p.name.clone(), p.jail_root())
        }
        None => {
            let pid = std::process::id();
            (
                format!("boot-{pid}"),
                std::env::temp_dir().join(format!("vmrun-jail-{pid}")),
            )
        }
    };
    if let Some(v) = &cfg.vsock {
        // The device binds its socket there (and guest connections reach PATH_PORT there).
        let dir = match v.uds_path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if vm_dir != Some(dir.as_path()) {
            binds.push(jail::Bind::writable(dir));
        }
        remove_after.push(v.uds_path.clone());
    }
    if let Some(r) = restore {
        binds.push(jail::Bind::read_only(r));
    }
    std::fs::create_dir_all(&root).map_err(|e| format!("jail root {}: {e}", root.display()))?;
    remove_after.push(root.clone());
    let (owner, detached_mark) = owner();
    Ok(jail::Spec {
        name,
        root,
        binds,
        user: opts.jail_user.map(|u| jail::User {
            uid: u.uid,
            gid: u.gid,
        }),
        limits: jail::Limits {
            memory: Some((cfg.mem_mib + jail::MEMORY_OVERHEAD_MIB) << 20),
            cpu_percent: opts.cpu_quota,
        },
        owner,
        detached_mark,
        remove_after,
    })
}

pub fn boot(a: &BootArgs) -> ExitCode {
    let opts = match a.options() {
        Ok(o) => o,
        Err(e) => return launcher_error(e),
    };
    if opts.no_jail && opts.cpu_quota.is_some() {
        return launcher_error(
            "--cpu-quota is enforced by the VM's jail (its cgroup); drop --no-jail",
        );
    }
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
    let vm_dir = std::env::var_os(VM_DIR_ENV).map(PathBuf::from);
    // What a snapshot reads on the host, opened while the VMM still can.
    let sources = vm_dir
        .as_ref()
        .map(|_| launch::snapshot::Sources::open(&opts).map_err(|e| e.to_string()));
    if opts.no_jail {
        eprintln!("vmrun: warning: the jail is off (--no-jail): the VMM runs with this process's privileges and view of the host");
        let (owner, mark) = owner();
        watch_owner(owner, mark);
    } else {
        let spec = match jail_spec(&opts, &cfg, a.restore.as_deref(), vm_dir.as_deref()) {
            Ok(s) => s,
            Err(e) => return launcher_error(e),
        };
        match jail::enter(&spec) {
            Ok(j) => {
                log::info!("{}", j.describe());
                cfg.run_as = Some(j.user);
            }
            Err(jail::JailError::NotRoot(uid)) => {
                log::warn!("jail: off: vmrun runs as uid {uid}, and building the jail needs root");
                let (owner, mark) = owner();
                watch_owner(owner, mark);
            }
            Err(e) => return launcher_error(e),
        }
    }
    super::signals::install();
    // A VM the library started (it has a runtime directory) takes control requests: its
    // socket is bound now, while the VMM may still create it.
    let bound = vm_dir.as_ref().and_then(|d| {
        let path = vmrun::runtime::VmPaths::from_dir(d.clone()).control();
        match control::Bound::bind(&path) {
            Ok(b) => Some(b),
            Err(e) => {
                log::warn!("no control socket at {}: {e}", path.display());
                None
            }
        }
    });
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
    let control = bound.and_then(|b| match b.serve(filters.clone()) {
        Ok(server) => Some(Control {
            server,
            opts,
            sources: sources.unwrap_or_else(|| Err("no runtime directory".into())),
        }),
        Err(e) => {
            log::warn!("control socket: {e}");
            None
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
        run_as: None,
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
