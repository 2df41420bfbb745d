//! PID 1 of the vmrun initramfs: kernel filesystems, the root (overlay or direct) from the
//! kernel command line, the switch, then the workload (`vmrun.exec=`) or the agent, orphan
//! reaping, and the status report.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use vmrun_init::cmdline::{self, NO_ROOT};
use vmrun_init::{mount_kernel_filesystems, plan, report, uptime, Failure};
use vmrun_protocol::cmdline::console::{AGENT_STARTED, DIRECT_ROOT, INIT_READY, OVERLAY_ROOT};
use vmrun_protocol::status::{InitError, Status};

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Environment the init hands on from its own (the kernel's command line) to what it starts.
const INHERITED: &[&str] = &["GLIBC_TUNABLES"];

/// `KEY=VALUE` for each inherited variable that is set.
fn inherited_env() -> Vec<(String, String)> {
    INHERITED
        .iter()
        .filter_map(|k| Some((k.to_string(), std::env::var(k).ok()?)))
        .collect()
}
/// The agent: this very binary, run under the name `vmrun-agent` (one binary in the initramfs
/// instead of two: the guest kernel copies every initramfs byte at boot, ~4 s per MiB where
/// guest ring 0 is emulated). It is opened before the switch and executed from the open file
/// afterwards, so the new root (and its upper layer) never holds it.
const AGENT: &str = "/init";
/// The name under which this binary is the agent.
const AGENT_NAME: &str = "vmrun-agent";

fn main() {
    let arg0 = std::env::args().next().unwrap_or_default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if Path::new(&arg0).file_name().and_then(|n| n.to_str()) == Some(AGENT_NAME) {
        vmrun_agent::entry::main(args);
    }
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
    // Before anything asks for random bytes; a failure costs speed, not correctness.
    if let Err(e) = vmrun_init::entropy::seed_kernel_rng() {
        eprintln!("vmrun-init: cannot seed the kernel's random number generator: {e}");
    }
    let line = std::fs::read_to_string("/proc/cmdline")
        .map_err(|e| Failure::new(InitError::Other, "read /proc/cmdline", e))?;
    let cfg = cmdline::parse(&line)?;
    // A name for prompts and logs; failure is harmless.
    let _ = nix::unistd::sethostname("vmrun");
    let agent = File::open(AGENT).ok();
    if cfg.root != NO_ROOT {
        let root = plan::build_root(&cfg, Path::new("/"))?;
        plan::switch_root(&root.path)?;
        let layers = match cfg.layers.len() {
            0 => String::new(),
            n => format!(", {n} read-only layer{}", if n == 1 { "" } else { "s" }),
        };
        match &root.upper_fstype {
            Some(t) => println!(
                "{OVERLAY_ROOT} {} lower ({}){layers}, {t} upper",
                cfg.root, root.lower_fstype
            ),
            None if !layers.is_empty() => println!(
                "{DIRECT_ROOT} {} ({}){layers}, no upper (read-only)",
                cfg.root, root.lower_fstype
            ),
            None => println!(
                "{DIRECT_ROOT} {} ({}, {})",
                cfg.root,
                root.lower_fstype,
                if cfg.rw { "rw" } else { "ro" }
            ),
        }
    }
    println!(
        "{INIT_READY} after {:.2}s of guest uptime",
        uptime().unwrap_or(-1.0)
    );
    match (&cfg.exec, agent) {
        (Some(argv), _) => run_workload(argv),
        (None, Some(agent)) => run_agent(agent),
        (None, None) => Ok(Status::Exited(0)),
    }
}

/// Starts the `vmrun.exec=` workload.
fn run_workload(argv: &[String]) -> Result<Status, Failure> {
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .env_clear()
        .env("PATH", PATH)
        .env("HOME", "/root")
        .env("TERM", "linux")
        .envs(inherited_env())
        .current_dir("/")
        .spawn()
        .map_err(|e| Failure::new(InitError::Exec, format!("vmrun.exec: start {}", argv[0]), e))?;
    wait_for(Pid::from_raw(child.id() as i32))
}

/// Runs the agent from its open file (fexecve).
fn run_agent(agent: File) -> Result<Status, Failure> {
    let fail = |what: &str, e: std::io::Error| {
        Failure::new(InitError::Exec, format!("start the agent: {what}"), e)
    };
    let arg0 = CString::new(AGENT_NAME).map_err(|e| fail("argv", std::io::Error::other(e)))?;
    let env: Vec<CString> = [format!("PATH={PATH}"), "HOME=/root".to_string()]
        .into_iter()
        .chain(inherited_env().into_iter().map(|(k, v)| format!("{k}={v}")))
        .filter_map(|s| CString::new(s).ok())
        .collect();
    let argv = [arg0.as_ptr(), std::ptr::null()];
    let mut envp: Vec<*const libc::c_char> = env.iter().map(|c| c.as_ptr()).collect();
    envp.push(std::ptr::null());
    // SAFETY: fork in PID 1, which has no other threads; the child only calls fexecve and
    // _exit (async-signal-safe) with pointers prepared before the fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(fail("fork", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: see above; on failure the child exits at once with 127.
        unsafe {
            libc::fexecve(agent.as_raw_fd(), argv.as_ptr(), envp.as_ptr());
            libc::_exit(127);
        }
    }
    drop(agent);
    println!("{AGENT_STARTED}");
    wait_for(Pid::from_raw(pid))
}

/// Reaps every child (PID 1 inherits all orphans) until `pid` ends.
fn wait_for(pid: Pid) -> Result<Status, Failure> {
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
