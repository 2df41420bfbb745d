//! The harness API: a VM as a value. `Vm::builder()…start()` spawns the VMM as its own process
//! (the `vmrun` binary), waits until the guest agent answers, and hands back a `Vm` whose `&self`
//! methods run commands and move files concurrently. Dropping it kills the VMM and removes
//! every host file it made (socket, console log, temporary directory).
//!
//! ```no_run
//! use vmrun::api::vm::{Overlay, Vm};
//!
//! let vm = Vm::builder().overlay(Overlay::Tmpfs { size: Some("256M".into()) }).start()?;
//! vm.upload_bytes("/work/input.txt", b"hello\n", 0o644)?;
//! let out = vm.exec(["cat", "/work/input.txt"])?;
//! assert_eq!(out.stdout, b"hello\n");
//! let mut tar = Vec::new();
//! vm.capture_overlay(&mut tar)?; // what the workload wrote, as a tar
//! # Ok::<(), vmrun::api::vm::VmError>(())
//! ```

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use thiserror::Error;
use vmrun_protocol::agent::{Exec, PORT};
use vmrun_protocol::cmdline::console::INIT_ERROR;

use super::agent::{AgentClient, AgentError, Endpoint, Output, Process};
use crate::config::{DiskConfig, VsockConfig, DEFAULT_CID};
use crate::host::compat::Compat;
pub use crate::launch::overlay::Overlay;
use crate::launch::overlay::ENV_TOGGLE;
use crate::launch::{self, LaunchError, Rootfs, VmOptions};

#[derive(Debug, Error)]
pub enum VmError {
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error(
        "cannot find the vmrun binary that runs the VMM: {0}; set VMRUN_BIN or put vmrun on PATH"
    )]
    Binary(String),
    #[error("cannot start the VMM process: {0}")]
    Spawn(std::io::Error),
    #[error("host temporary directory: {0}")]
    Temp(std::io::Error),
    /// The VM ended before its agent answered: the init's error line when there is one.
    #[error("the VM stopped during boot: {summary}")]
    BootFailed {
        summary: String,
        init_error: Option<String>,
        console_tail: String,
    },
    #[error("the guest agent did not answer within {secs}s; console tail:\n{console_tail}")]
    BootTimeout { secs: u64, console_tail: String },
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The VM is gone (guest shutdown, crash, or the VMM was killed): what a call on it meets.
    #[error("the VM has stopped ({status}); console tail:\n{console_tail}")]
    Stopped {
        status: String,
        console_tail: String,
    },
}

/// Configures a VM; see [`Vm::builder`].
#[derive(Clone, Debug)]
pub struct VmBuilder {
    opts: VmOptions,
    boot_timeout: Duration,
}

impl VmBuilder {
    /// All options at once (what the CLI's flags resolve to).
    pub fn options(mut self, opts: VmOptions) -> Self {
        self.opts = opts;
        self
    }
    pub fn kernel(mut self, path: impl Into<PathBuf>) -> Self {
        self.opts.kernel = Some(path.into());
        self
    }
    pub fn initrd(mut self, path: impl Into<PathBuf>) -> Self {
        self.opts.initrd = Some(path.into());
        self
    }
    pub fn rootfs(mut self, path: impl Into<PathBuf>) -> Self {
        self.opts.rootfs = Rootfs::Path(path.into());
        self
    }
    /// The upper layer. Without it, `GONDOLIN_ROOT_OVERLAY=1|true|tmpfs` selects a tmpfs one.
    pub fn overlay(mut self, overlay: Overlay) -> Self {
        self.opts.overlay = Some(overlay);
        self
    }
    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.opts.memory_mib = mib;
        self
    }
    pub fn vcpus(mut self, n: u8) -> Self {
        self.opts.vcpus = n;
        self
    }
    /// Extra disk after the rootfs (and the overlay disk).
    pub fn disk(mut self, path: impl Into<PathBuf>, read_only: bool) -> Self {
        self.opts.disks.push(DiskConfig {
            path: path.into(),
            read_only,
        });
        self
    }
    /// Extra kernel parameters (an explicit `root.overlay=` here wins over [`Self::overlay`]).
    pub fn cmdline(mut self, params: impl Into<String>) -> Self {
        self.opts.cmdline = Some(params.into());
        self
    }
    /// Keep the guest console in this file (default: a temporary file removed with the VM).
    pub fn console_log(mut self, path: impl Into<PathBuf>) -> Self {
        self.opts.console_log = Some(path.into());
        self
    }
    /// How long `start` waits for the agent (default 60 s, 600 s where ring 0 is emulated).
    pub fn boot_timeout(mut self, t: Duration) -> Self {
        self.boot_timeout = t;
        self
    }
    pub fn compat(mut self, c: Compat) -> Self {
        self.opts.compat = c;
        self
    }

    /// The options as they stand.
    pub fn options_ref(&self) -> &VmOptions {
        &self.opts
    }

    /// What the VM would be: options after defaults, the overlay toggle and the user's command
    /// line are applied (no VM is started).
    pub fn resolve(&self) -> Result<launch::Resolved, VmError> {
        let env = std::env::var(ENV_TOGGLE).ok();
        Ok(launch::resolve(&self.opts, env.as_deref())?)
    }

    /// Boots the VM and waits for its agent.
    pub fn start(self) -> Result<Vm, VmError> {
        let dir = tempfile::Builder::new()
            .prefix("vmrun-")
            .tempdir()
            .map_err(VmError::Temp)?;
        let sock = dir.path().join("vsock.sock");
        let console = self
            .opts
            .console_log
            .clone()
            .unwrap_or_else(|| dir.path().join("console.log"));
        let mut opts = self.opts.clone();
        opts.vsock = Some(VsockConfig {
            cid: DEFAULT_CID,
            uds_path: sock.clone(),
        });
        opts.console_log = Some(console.clone());
        let env = std::env::var(ENV_TOGGLE).ok();
        let resolved = launch::resolve(&opts, env.as_deref())?;
        let timeout = if resolved.pvm && self.boot_timeout == DEFAULT_BOOT_TIMEOUT {
            Duration::from_secs(600)
        } else {
            self.boot_timeout
        };

        let mut cmd = Command::new(vmm_binary()?);
        // Every decision is in the arguments: the VMM reads no environment of ours.
        cmd.arg("boot").args(opts.pinned(&resolved).to_args());
        cmd.env_remove(ENV_TOGGLE)
            .env_remove("VMRUN_KERNEL")
            .env_remove("VMRUN_INITRAMFS")
            .env_remove("VMRUN_ROOTFS");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // The VMM must not outlive its owner, even one killed without running Drop: it watches
        // for this process to go away. (PR_SET_PDEATHSIG would fire when the spawning *thread*
        // ends, which kills VMs started from worker threads.)
        cmd.env(OWNER_ENV, std::process::id().to_string());
        let child = cmd.spawn().map_err(VmError::Spawn)?;
        let agent = AgentClient::new(Endpoint::Vsock {
            uds: sock,
            port: PORT,
        });
        let vm = Vm {
            child: Mutex::new(child),
            agent,
            console,
            _dir: dir,
        };
        vm.wait_for_agent(timeout)?;
        Ok(vm)
    }
}

/// Set for the VMM process: the pid whose exit ends the VM.
pub const OWNER_ENV: &str = "VMRUN_OWNER_PID";

/// `start` waits this long unless told otherwise (longer on hosts that emulate ring 0).
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// The `vmrun` binary: `VMRUN_BIN`, next to the running program (or its parent directory, as
/// for test binaries under `target/*/deps`), or on `PATH`.
pub fn vmm_binary() -> Result<PathBuf, VmError> {
    if let Some(p) = std::env::var_os("VMRUN_BIN") {
        return Ok(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let c = dir.join("vmrun");
            if c.is_file() {
                return Ok(c);
            }
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let c = dir.join("vmrun");
            if c.is_file() {
                return Ok(c);
            }
        }
    }
    Err(VmError::Binary(
        "not next to this program and not on PATH".into(),
    ))
}

/// A running VM.
pub struct Vm {
    child: Mutex<Child>,
    agent: AgentClient,
    console: PathBuf,
    _dir: tempfile::TempDir,
}

/// A command: anything that yields its argv, or a full [`Exec`].
pub struct Cmd(pub Exec);

fn argv<S: AsRef<str>>(items: &[S]) -> Cmd {
    Cmd(Exec {
        argv: items.iter().map(|s| s.as_ref().to_string()).collect(),
        ..Default::default()
    })
}

impl<const N: usize> From<[&str; N]> for Cmd {
    fn from(a: [&str; N]) -> Self {
        argv(&a)
    }
}

impl From<&[&str]> for Cmd {
    fn from(a: &[&str]) -> Self {
        argv(a)
    }
}

impl From<Vec<String>> for Cmd {
    fn from(a: Vec<String>) -> Self {
        argv(&a)
    }
}

impl From<Exec> for Cmd {
    fn from(e: Exec) -> Self {
        Cmd(e)
    }
}

impl Vm {
    pub fn builder() -> VmBuilder {
        VmBuilder {
            opts: VmOptions::default(),
            boot_timeout: DEFAULT_BOOT_TIMEOUT,
        }
    }

    fn wait_for_agent(&self, timeout: Duration) -> Result<(), VmError> {
        let deadline = Instant::now() + timeout;
        loop {
            // The guard must be gone before `boot_failure` locks the child again.
            let exited = self.exit_status().map_err(VmError::Spawn)?;
            if let Some(status) = exited {
                return Err(self.boot_failure(status));
            }
            if self.agent.stat("/").is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(VmError::BootTimeout {
                    secs: timeout.as_secs(),
                    console_tail: self.console_tail(20),
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn boot_failure(&self, status: std::process::ExitStatus) -> VmError {
        let mut stderr = String::new();
        if let Some(e) = self
            .child
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .stderr
            .as_mut()
        {
            let _ = e.take(64 << 10).read_to_string(&mut stderr);
        }
        let console = std::fs::read_to_string(&self.console).unwrap_or_default();
        let init_error = console
            .lines()
            .rev()
            .find(|l| l.contains(INIT_ERROR))
            .map(str::to_string);
        let summary = stderr
            .lines()
            .filter_map(|l| l.strip_prefix("vmrun: "))
            .next_back()
            .map(str::to_string)
            .unwrap_or_else(|| format!("VMM exited with {status}"));
        VmError::BootFailed {
            summary,
            init_error,
            console_tail: self.console_tail(20),
        }
    }

    /// The VMM's exit status once it has ended (reaped here).
    fn exit_status(&self) -> std::io::Result<Option<std::process::ExitStatus>> {
        self.child
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .try_wait()
    }

    /// Whether the VMM process is still running.
    pub fn is_running(&self) -> bool {
        matches!(self.exit_status(), Ok(None))
    }

    /// An agent call's result; a failed connection to a VM that has stopped says so.
    fn call<T>(&self, r: Result<T, AgentError>) -> Result<T, VmError> {
        r.map_err(|e| {
            if !e.is_connection() {
                return e.into();
            }
            // The VMM may still be on its way out: give it a moment to be seen gone.
            for _ in 0..10 {
                match self.exit_status() {
                    Ok(Some(status)) => {
                        return VmError::Stopped {
                            status: status.to_string(),
                            console_tail: self.console_tail(20),
                        }
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                    Err(_) => break,
                }
            }
            e.into()
        })
    }

    /// The last `n` lines of the guest console.
    pub fn console_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.console).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The agent client, for anything this type does not wrap.
    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// Runs a command to its end and returns its status and output.
    pub fn exec(&self, cmd: impl Into<Cmd>) -> Result<Output, VmError> {
        self.call(self.agent.exec(cmd.into().0, None))
    }

    /// Runs a command with `stdin` as its input.
    pub fn exec_with_stdin(&self, cmd: impl Into<Cmd>, stdin: &[u8]) -> Result<Output, VmError> {
        self.call(self.agent.exec(cmd.into().0, Some(stdin)))
    }

    /// Starts a command and returns it running (stdin, output events, resize, signals).
    pub fn spawn(&self, cmd: impl Into<Cmd>) -> Result<Process, VmError> {
        self.call(self.agent.spawn(cmd.into().0))
    }

    pub fn upload_bytes(&self, guest_path: &str, bytes: &[u8], mode: u32) -> Result<u64, VmError> {
        self.call(self.agent.upload(guest_path, mode, true, false, bytes))
    }

    pub fn upload_reader(
        &self,
        guest_path: &str,
        src: impl Read,
        mode: u32,
    ) -> Result<u64, VmError> {
        self.call(self.agent.upload(guest_path, mode, true, false, src))
    }

    /// Uploads a host file, keeping its permission bits.
    pub fn upload_file(&self, host_path: &Path, guest_path: &str) -> Result<u64, VmError> {
        use std::os::unix::fs::PermissionsExt;
        let f = std::fs::File::open(host_path).map_err(|e| AgentError::Local {
            what: "upload source",
            source: e,
        })?;
        let mode = f
            .metadata()
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(0o644);
        self.call(self.agent.upload(guest_path, mode, true, false, f))
    }

    pub fn download(&self, guest_path: &str, dst: impl Write) -> Result<u64, VmError> {
        self.call(self.agent.download(guest_path, dst).map(|r| r.0))
    }

    pub fn download_bytes(&self, guest_path: &str) -> Result<Vec<u8>, VmError> {
        let mut v = Vec::new();
        self.call(self.agent.download(guest_path, &mut v))?;
        Ok(v)
    }

    /// Streams a tar of everything the guest wrote (the overlay upper layer).
    pub fn capture_overlay(&self, dst: impl Write) -> Result<u64, VmError> {
        self.call(self.agent.capture(dst))
    }

    /// Captures into a file at `path`.
    pub fn capture_overlay_to(&self, path: &Path) -> Result<u64, VmError> {
        let f = std::fs::File::create(path).map_err(|e| AgentError::Local {
            what: "capture file",
            source: e,
        })?;
        self.capture_overlay(std::io::BufWriter::new(f))
    }

    /// Asks the guest to shut down and waits for the VMM to exit (then kills it after 30 s).
    pub fn shutdown(self) -> Result<(), VmError> {
        self.agent.shutdown()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.exit_status().map_err(VmError::Spawn)?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let mut c = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(None) = c.try_wait() {
            let _ = c.kill();
        }
        let _ = c.wait();
        // The temporary directory (socket, console log) is removed when `_dir` drops.
    }
}
