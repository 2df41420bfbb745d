//! The harness API: a VM as a value. [`Vm::builder`]`…start()` spawns the VMM as its own
//! process (the `vmrun` binary), waits until the guest agent answers, and hands back a `Vm`
//! whose `&self` methods run commands and move files concurrently. Dropping it kills the VMM
//! and removes every host file it made (its runtime directory: socket, console log);
//! [`Vm::detach`] lets the VM outlive this process instead, and [`Vm::attach`] takes hold of a
//! running VM by name.
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
use std::process::Child;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use thiserror::Error;
use vmrun_protocol::agent::{Exec, PORT};

use super::agent::{AgentClient, AgentError, Endpoint, Output, Process};
use crate::control::{self, ControlError, Then};
pub use crate::launch::overlay::Overlay;
use crate::launch::snapshot::SnapshotUseError;
use crate::launch::{ExecDefaults, LaunchError};
use crate::runtime::{self, Claim, RuntimeError, VmPaths};

#[derive(Debug, Error)]
pub enum VmError {
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("cannot find the vmrun binary that runs each VM's VMM: {0}")]
    Binary(String),
    #[error("cannot start the VMM process: {0}")]
    Spawn(std::io::Error),
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
    #[error(transparent)]
    Snapshot(#[from] SnapshotUseError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("no command given, and the VM's image names none to run; give one (after `--` on the command line)")]
    NoCommand,
    #[error("{what} {path}: {source}")]
    Host {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How long a snapshot may take (it writes all guest memory the guest touched).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);

/// A running VM.
/// How long a VMM (or its jail's supervisor) has to end on SIGTERM before it is killed.
const TERM_GRACE: Duration = Duration::from_secs(3);

pub struct Vm {
    paths: VmPaths,
    /// The VMM process, when this process started it.
    child: Mutex<Option<Child>>,
    /// This process's share of the VM's lock while it owns the VM (started here, not
    /// detached): dropping the `Vm` then stops the VM and removes its directory.
    claim: Option<Claim>,
    agent: AgentClient,
    console: PathBuf,
    /// What commands get unless they say otherwise (the image's config).
    defaults: Option<ExecDefaults>,
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

/// Stops a VM from any thread (a signal handler's helper thread, say): kills its VMM and
/// removes its directory. For a launcher that must leave nothing behind when it is killed.
#[derive(Clone, Debug)]
pub struct KillSwitch {
    pid: Option<u32>,
    paths: VmPaths,
}

impl KillSwitch {
    pub fn fire(&self) {
        if let Some(pid) = self.pid {
            // SAFETY: kill(2) on the VMM this process started and has not reaped, so the pid
            // still names it.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        self.paths.remove();
    }
}

impl Vm {
    /// A VM this process has just started (the builder's side).
    pub(crate) fn started(
        paths: VmPaths,
        child: Child,
        claim: Claim,
        console: PathBuf,
        defaults: Option<ExecDefaults>,
    ) -> Vm {
        let agent = agent_at(&paths);
        if let Some(d) = &defaults {
            // Kept beside the VM for `Vm::attach` (`vmrun exec NAME`); without it commands
            // there run without the image's env, which the next attach would show.
            if let Ok(text) = serde_json::to_vec(d) {
                let _ = std::fs::write(paths.exec_defaults(), text);
            }
        }
        Vm {
            paths,
            child: Mutex::new(Some(child)),
            claim: Some(claim),
            agent,
            console,
            defaults,
        }
    }

    /// A running VM by name (`vmrun ls` lists them). The VM is not this process's: dropping
    /// the `Vm` leaves it running; [`Vm::shutdown`] stops it.
    pub fn attach(name: &str) -> Result<Vm, VmError> {
        let paths = runtime::find(name)?;
        if !paths.alive() {
            return Err(RuntimeError::Dead(name.into()).into());
        }
        let agent = agent_at(&paths);
        // Bounded: the file is this host's own, but a VM directory is not a place to trust.
        let defaults = std::fs::File::open(paths.exec_defaults())
            .ok()
            .and_then(|f| {
                let mut v = Vec::new();
                f.take(1 << 20).read_to_end(&mut v).ok()?;
                serde_json::from_slice(&v).ok()
            });
        Ok(Vm {
            console: paths.console(),
            child: Mutex::new(None),
            claim: None,
            agent,
            paths,
            defaults,
        })
    }

    /// Lets the VM outlive this process: it runs on until `vmrun stop NAME` (or
    /// [`Vm::attach`] and [`Vm::shutdown`]). Returns its name.
    pub fn detach(mut self) -> Result<String, VmError> {
        let mark = self.paths.detached_mark();
        std::fs::write(&mark, b"").map_err(|source| VmError::Host {
            what: "VM directory",
            path: mark,
            source,
        })?;
        if let Some(mut r) = self.paths.record() {
            r.named = true;
            self.paths.write_record(&r)?;
        }
        // The VMM keeps its own share of the lock; ours goes.
        self.claim = None;
        if let Some(mut c) = self
            .child
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            // Reaped when it ends, so it does not linger as a zombie of this process.
            std::thread::spawn(move || c.wait());
        }
        Ok(self.paths.name.clone())
    }

    /// The VM's name (generated when none was given).
    pub fn name(&self) -> &str {
        &self.paths.name
    }

    /// Where the VM's host files are.
    pub fn paths(&self) -> &VmPaths {
        &self.paths
    }

    /// The pid of the VMM this process started, if it did.
    fn own_pid(&self) -> Option<u32> {
        self.child
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(Child::id)
    }

    /// The process id of the VMM that runs the guest: the jailed one when there is a jail
    /// (the process this library started, or the record names, is then its supervisor).
    pub fn vmm_pid(&self) -> Option<u32> {
        let pid = self
            .own_pid()
            .or_else(|| self.paths.record().map(|r| r.pid).filter(|p| *p > 0))?;
        Some(jailed_child(pid).unwrap_or(pid))
    }

    /// A handle that stops this VM from another thread.
    pub fn kill_switch(&self) -> KillSwitch {
        KillSwitch {
            pid: self.own_pid(),
            paths: self.paths.clone(),
        }
    }

    /// The VMM's exit status once it has ended (reaped here); for an attached VM, a dead
    /// VM reads as `Some(None)`.
    pub(crate) fn ended(&self) -> Option<Option<std::process::ExitStatus>> {
        let mut c = self.child.lock().unwrap_or_else(|p| p.into_inner());
        match c.as_mut() {
            Some(child) => match child.try_wait() {
                Ok(Some(s)) => Some(Some(s)),
                Ok(None) => None,
                Err(_) => Some(None),
            },
            None => (!self.paths.alive()).then_some(None),
        }
    }

    /// Whether the VM is still running.
    pub fn is_running(&self) -> bool {
        self.ended().is_none()
    }

    /// An agent call's result; a failed connection to a VM that has stopped says so.
    fn call<T>(&self, r: Result<T, AgentError>) -> Result<T, VmError> {
        r.map_err(|e| {
            if !e.is_connection() {
                return e.into();
            }
            // The VMM may still be on its way out: give it a moment to be seen gone.
            for _ in 0..10 {
                match self.ended() {
                    Some(status) => {
                        return VmError::Stopped {
                            status: status.map_or_else(|| "VMM gone".into(), |s| s.to_string()),
                            console_tail: self.console_tail(20),
                        }
                    }
                    None => std::thread::sleep(Duration::from_millis(20)),
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

    /// The defaults commands get here (an image's entrypoint, env, working directory, user).
    pub fn exec_defaults(&self) -> Option<&ExecDefaults> {
        self.defaults.as_ref()
    }

    /// `cmd` with the VM's defaults filled in; an empty argv takes the image's command.
    fn prepare(&self, cmd: impl Into<Cmd>) -> Result<Exec, VmError> {
        let mut x = cmd.into().0;
        if let Some(d) = &self.defaults {
            if x.argv.is_empty() {
                x.argv = d.argv.clone();
            }
            x = d.apply(x);
        }
        if x.argv.is_empty() {
            return Err(VmError::NoCommand);
        }
        Ok(x)
    }

    /// Runs a command to its end and returns its status and output.
    pub fn exec(&self, cmd: impl Into<Cmd>) -> Result<Output, VmError> {
        let x = self.prepare(cmd)?;
        self.call(self.agent.exec(x, None))
    }

    /// Runs a command with `stdin` as its input.
    pub fn exec_with_stdin(&self, cmd: impl Into<Cmd>, stdin: &[u8]) -> Result<Output, VmError> {
        let x = self.prepare(cmd)?;
        self.call(self.agent.exec(x, Some(stdin)))
    }

    /// Starts a command and returns it running (stdin, output events, resize, signals).
    pub fn spawn(&self, cmd: impl Into<Cmd>) -> Result<Process, VmError> {
        let x = self.prepare(cmd)?;
        self.call(self.agent.spawn(x))
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

    /// Copies a host file or directory into the guest, as `docker cp` does: into `guest_path`
    /// when that is a directory, else as `guest_path`. Returns the bytes of file data copied.
    pub fn copy_in(&self, host_path: &Path, guest_path: &str) -> Result<u64, VmError> {
        self.call(super::copy::copy_in(&self.agent, host_path, guest_path))
    }

    /// Copies a guest file or directory to the host, as `docker cp` does: into `host_path`
    /// when that is a directory, else as `host_path`. Returns the bytes of file data copied.
    pub fn copy_out(&self, guest_path: &str, host_path: &Path) -> Result<u64, VmError> {
        self.call(super::copy::copy_out(&self.agent, guest_path, host_path))
    }

    /// Snapshots the VM into `dir` (which must exist and be empty; see
    /// [`crate::launch::snapshot::create_dir`]): the guest's dirty pages go to its disks, then
    /// the VMM pauses the VM and writes its memory and state. With [`Then::Resume`] the VM
    /// runs on; with [`Then::Stop`] it ends (drop this `Vm`). Returns the bytes of guest
    /// memory the snapshot covers.
    pub fn snapshot(&self, dir: &Path, then: Then) -> Result<u64, VmError> {
        self.call(self.agent.sync())?;
        let req = control::Request::Snapshot {
            dir: dir.to_path_buf(),
            then,
        };
        // The VMM writes into files made here: a jailed VMM can create none on the host. A
        // VM without a disk upper layer leaves the upper copy empty, and it goes.
        let create = |name: &str| {
            let path = dir.join(name);
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map(|f| (path.clone(), f))
                .map_err(|source| VmError::Host {
                    what: "snapshot file",
                    path,
                    source,
                })
        };
        let (_, state) = create(crate::snapshot::STATE_FILE)?;
        let (_, memory) = create(crate::snapshot::MEMORY_FILE)?;
        let (upper_path, upper) = create(crate::launch::snapshot::UPPER_FILE)?;
        let taken = control::call(
            &self.paths.control(),
            &req,
            &[&state, &memory, &upper],
            SNAPSHOT_TIMEOUT,
        );
        if upper.metadata().is_ok_and(|m| m.len() == 0) {
            let _ = std::fs::remove_file(&upper_path);
        }
        taken.map_err(|e| {
            // A VMM that died on the request is named with its last word.
            for _ in 0..10 {
                if let Some(status) = self.ended() {
                    let status = status.map_or_else(|| "VMM gone".into(), |s| s.to_string());
                    return VmError::Stopped {
                        status: match self.vmm_last_word() {
                            Some(w) => format!("{status}: {w}"),
                            None => status,
                        },
                        console_tail: self.console_tail(20),
                    };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            e.into()
        })
    }

    /// The VMM's last `vmrun: ` line in its log, if any.
    fn vmm_last_word(&self) -> Option<String> {
        let log = std::fs::read(self.paths.vmm_log()).ok()?;
        let tail = &log[log.len().saturating_sub(8192)..];
        String::from_utf8_lossy(tail)
            .lines()
            .filter_map(|l| l.strip_prefix("vmrun: "))
            .next_back()
            .map(str::to_string)
    }

    /// Streams a tar of everything the guest wrote (the overlay upper layer).
    pub fn capture_overlay(&self, dst: impl Write) -> Result<u64, VmError> {
        self.call(self.agent.capture(dst))
    }

    /// Captures into a file at `path`. It is written under a temporary name in the same
    /// directory and renamed when complete: a capture that did not finish never carries the
    /// final name (and a launcher killed meanwhile leaves the temporary file to the next
    /// `vmrun` run to remove).
    pub fn capture_overlay_to(&self, path: &Path) -> Result<u64, VmError> {
        let host = |what: &'static str| {
            move |source| VmError::Host {
                what,
                path: path.to_path_buf(),
                source,
            }
        };
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = path
            .file_name()
            .map_or_else(|| "capture".into(), |n| n.to_string_lossy().into_owned());
        // Absolute, and recorded in the VM's directory before the file exists: a launcher
        // killed at any moment leaves a name the next `vmrun` run finds and removes.
        let dir = std::path::absolute(&dir).map_err(host("capture directory"))?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".partial")
            .make_in(&dir, |p| {
                self.paths.add_partial(p);
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(p)
            })
            .map_err(host("capture file"))?;
        let result = (|| {
            let mut w = std::io::BufWriter::new(tmp.as_file());
            let n = self.capture_overlay(&mut w)?;
            w.flush().map_err(host("capture file"))?;
            drop(w);
            tmp.as_file().sync_all().map_err(host("capture file"))?;
            Ok(n)
        })();
        let tmp_path = tmp.path().to_path_buf();
        let outcome = result.and_then(|n| {
            tmp.persist(path)
                .map_err(|e| host("capture file")(e.error))
                .map(|_| n)
        });
        self.paths.drop_partial(&tmp_path);
        outcome
    }

    /// Asks the guest to shut down and waits for the VMM to exit (killing it after 30 s);
    /// then its host files are removed. Works on an attached VM too.
    pub fn shutdown(self) -> Result<(), VmError> {
        self.stop(Duration::from_secs(30))
    }

    /// As [`Vm::shutdown`], waiting at most `grace` before the VMM is killed.
    pub fn stop(mut self, grace: Duration) -> Result<(), VmError> {
        let asked = self.agent.shutdown();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && self.ended().is_none() {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
        // An agent that was gone already is no failure: the VM is stopped either way.
        match asked {
            Err(e) if !e.is_connection() => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Kills the VMM if it still runs and removes the VM's directory.
    fn kill(&mut self) {
        let mut c = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(child) = c.as_mut() {
            if let Ok(None) = child.try_wait() {
                // SIGTERM first: a jail's supervisor then kills its VMM, reaps it and removes
                // its cgroup (a SIGKILL would orphan the VMM to init); SIGKILL if it lingers.
                // SAFETY: kill(2) on the child this process started and has not reaped.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                let t = Instant::now();
                while matches!(child.try_wait(), Ok(None)) && t.elapsed() < TERM_GRACE {
                    std::thread::sleep(Duration::from_millis(5));
                }
                if let Ok(None) = child.try_wait() {
                    let _ = child.kill();
                }
            }
            let _ = child.wait();
        } else if self.paths.alive() {
            if let Some(pid) = self.paths.record().map(|r| r.pid).filter(|p| *p > 0) {
                // SAFETY: kill(2) on the VMM named in the VM's record; the lock shows a
                // holder is still alive, so the pid has not been reused by a dead VM's.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        *c = None;
        drop(c);
        self.claim = None;
        // A jailed VMM ends a moment after its supervisor (its parent's death kills it); its
        // directory and cgroup go once it has.
        let t = Instant::now();
        while self.paths.alive() && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.paths.remove();
    }
}

fn agent_at(paths: &VmPaths) -> AgentClient {
    AgentClient::new(Endpoint::Vsock {
        uds: paths.socket(),
        port: PORT,
    })
}

impl Drop for Vm {
    fn drop(&mut self) {
        // Only a VM this process owns is stopped; an attached or detached one runs on.
        if self.claim.is_some() {
            self.kill();
        }
    }
}

/// The one child of a jail's supervisor `pid`, if it has one (a VMM without a jail has none).
fn jailed_child(pid: u32) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    let mut kids = text
        .split_whitespace()
        .filter_map(|k| k.parse::<u32>().ok());
    match (kids.next(), kids.next()) {
        (Some(k), None) => Some(k),
        _ => None,
    }
}
