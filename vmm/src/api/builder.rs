//! Starting a VM: [`VmBuilder`] resolves the options, claims the VM's runtime directory, spawns
//! the VMM process (`vmrun boot` with every decision on its command line) and waits for the
//! guest agent, reporting the boot phases the host can see as they pass.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmrun_protocol::cmdline::console::{
    DIRECT_ROOT, INIT_ERROR, INIT_READY, INIT_STARTED, KERNEL_STARTED, OVERLAY_ROOT,
};

use super::vm::{KillSwitch, Vm, VmError};
use crate::config::{DiskConfig, VsockConfig, DEFAULT_CID};
use crate::host::compat::Compat;
use crate::launch::overlay::{Overlay, ENV_TOGGLE};
use crate::launch::snapshot::SnapshotUseError;
use crate::launch::{self, Rootfs, VmOptions};
use crate::runtime::{Claim, Record, VmPaths};
use crate::snapshot::Snapshot;

/// Set for the VMM process: the pid whose exit ends the VM (unless it was detached).
pub const OWNER_ENV: &str = "VMRUN_OWNER_PID";
/// Set for the VMM process: the VM's runtime directory (where a detach is marked).
pub const VM_DIR_ENV: &str = "VMRUN_VM_DIR";

/// `start` waits this long unless told otherwise (longer on hosts that emulate ring 0).
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// ... and this long where guest ring 0 is emulated.
const EMULATED_BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// ... and this long where ring 0 runs natively but the whole machine is slow: a host whose
/// own CPU is emulated (a nested test tier under QEMU TCG) or heavily shared.
const SLOW_HOST_BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// A ring-0 loop iteration slower than this (hardware: well under 1 ns) marks a slow host.
const SLOW_RING0_NS: f64 = 10.0;

/// How long `start` waits for the agent unless told: from the kind of host.
fn default_boot_timeout(pvm: bool) -> Duration {
    if pvm {
        return EMULATED_BOOT_TIMEOUT;
    }
    match crate::host::compat::probe_cached() {
        Ok(p) if p.ring0_ns_per_iter > SLOW_RING0_NS => SLOW_HOST_BOOT_TIMEOUT,
        _ => DEFAULT_BOOT_TIMEOUT,
    }
}

/// A step of a VM's start that the host can see, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// The VMM process runs and its socket is up.
    VmmStarted,
    /// The guest kernel printed its first line.
    KernelRunning,
    /// The kernel started vmrun-init.
    InitStarted,
    /// The init mounted the root (the overlay, or the disk directly).
    RootMounted,
    /// The guest agent answered.
    AgentReady,
}

impl Phase {
    pub fn describe(self) -> &'static str {
        match self {
            Phase::VmmStarted => "VMM started",
            Phase::KernelRunning => "kernel running",
            Phase::InitStarted => "init started",
            Phase::RootMounted => "root mounted",
            Phase::AgentReady => "agent ready",
        }
    }
}

/// Called with each phase as it is reached and the time since `start` began.
pub type ProgressFn = Arc<dyn Fn(Phase, Duration) + Send + Sync>;
/// Called once the VMM runs, before `start` waits for the agent.
pub type StartedFn = Arc<dyn Fn(&KillSwitch) + Send + Sync>;

/// Configures a VM; see [`Vm::builder`].
#[derive(Clone)]
pub struct VmBuilder {
    opts: VmOptions,
    name: Option<String>,
    boot_timeout: Option<Duration>,
    progress: Option<ProgressFn>,
    started: Option<StartedFn>,
    binary: Option<PathBuf>,
    snapshot: Option<PathBuf>,
}

impl std::fmt::Debug for VmBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmBuilder")
            .field("opts", &self.opts)
            .field("name", &self.name)
            .field("boot_timeout", &self.boot_timeout)
            .finish_non_exhaustive()
    }
}

impl Vm {
    pub fn builder() -> VmBuilder {
        VmBuilder {
            opts: VmOptions::default(),
            name: None,
            boot_timeout: None,
            progress: None,
            started: None,
            binary: None,
            snapshot: None,
        }
    }
}

impl VmBuilder {
    /// All options at once (what the CLI's flags resolve to).
    pub fn options(mut self, opts: VmOptions) -> Self {
        self.opts = opts;
        self
    }
    /// The VM's name (`vmrun ls`, `vmrun exec NAME`, [`Vm::attach`]); one is generated when
    /// none is given.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
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
        self.opts.memory_mib = Some(mib);
        self
    }
    pub fn vcpus(mut self, n: u8) -> Self {
        self.opts.vcpus = n;
        self
    }
    /// A read-only layer above the rootfs (call again for more; the first is the lowest): a
    /// capture tar from [`Vm::capture_overlay_to`](super::Vm::capture_overlay_to), turned into a cached erofs image
    /// at start, or such an image.
    pub fn layer(mut self, path: impl Into<PathBuf>) -> Self {
        self.opts.layers.push(path.into());
        self
    }
    /// A named image (`vmrun images import`, `vmrun commit`) as the root: its filesystem and
    /// layers below any [`layer`](Self::layer), and its config's env, working directory, user
    /// and command as the defaults of [`Vm::exec`](super::Vm::exec) and friends.
    pub fn image(mut self, name: impl Into<String>) -> Self {
        self.opts.image = Some(name.into());
        self
    }
    /// Extra disk after the rootfs (and the overlay disk and the layers).
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
    /// Keep the guest console in this file (default: in the VM's runtime directory, removed
    /// with the VM).
    pub fn console_log(mut self, path: impl Into<PathBuf>) -> Self {
        self.opts.console_log = Some(path.into());
        self
    }
    /// How long `start` waits for the agent (default 60 s; 600 s where ring 0 is emulated, 300 s
    /// on a host whose ring 0 is native but slow, such as one whose own CPU is emulated).
    pub fn boot_timeout(mut self, t: Duration) -> Self {
        self.boot_timeout = Some(t);
        self
    }
    pub fn compat(mut self, c: Compat) -> Self {
        self.opts.compat = c;
        self
    }
    /// The `vmrun` binary that runs the VMM (default: [`vmm_binary`]); `vmrun profile` runs
    /// other builds with it.
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }
    /// Start the VM a snapshot directory holds (see [`Vm::snapshot`],
    /// [`crate::launch::snapshot::find`]) instead of booting: the snapshot's own options are
    /// used; kernel, initrd or rootfs given here must be the images it was taken with. The
    /// restored VM gets fresh entropy and the host's time before `start` returns.
    pub fn from_snapshot(mut self, dir: impl Into<PathBuf>) -> Self {
        self.snapshot = Some(dir.into());
        self
    }

    /// Called as the start passes each [`Phase`].
    pub fn on_progress(mut self, f: impl Fn(Phase, Duration) + Send + Sync + 'static) -> Self {
        self.progress = Some(Arc::new(f));
        self
    }

    /// Called with the VM's [`KillSwitch`] as soon as its VMM runs, before `start` waits for
    /// the agent: a launcher that may be killed while the VM boots stops it with that.
    pub fn on_started(mut self, f: impl Fn(&KillSwitch) + Send + Sync + 'static) -> Self {
        self.started = Some(Arc::new(f));
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
        let t0 = Instant::now();
        let env = std::env::var(ENV_TOGGLE).ok();
        let snapshot = match &self.snapshot {
            // Read and checked before anything is made on the host.
            Some(dir) => Some(Snapshot::load(dir).map_err(SnapshotUseError::from)?),
            // Refuse bad options before anything is made on the host.
            None => {
                launch::resolve(&self.opts, env.as_deref())?;
                None
            }
        };
        let bin = match self.binary.clone() {
            Some(b) if b.is_file() => b,
            Some(b) => {
                return Err(VmError::Binary(format!(
                    "{} is not a file; point the builder at a vmrun binary",
                    b.display()
                )))
            }
            None => vmm_binary()?,
        };
        let claim = Claim::new(self.name.as_deref())?;
        let paths = claim.paths.clone();
        let mut opts = match &snapshot {
            None => self.opts.clone(),
            Some(snap) => {
                match launch::snapshot::restore_options(snap, &self.opts, &paths.upper_copy()) {
                    Ok(o) => o,
                    Err(e) => {
                        paths.remove();
                        return Err(e.into());
                    }
                }
            }
        };
        opts.vsock = Some(VsockConfig {
            cid: DEFAULT_CID,
            uds_path: paths.socket(),
        });
        let console = opts.console_log.clone().unwrap_or_else(|| paths.console());
        opts.console_log = Some(console.clone());
        let resolved = match launch::resolve(&opts, env.as_deref()) {
            Ok(r) => r,
            Err(e) => {
                paths.remove();
                return Err(e.into());
            }
        };
        if let Some(w) = resolved.kernel_warning() {
            log::warn!("{w}");
        }
        let mut record = Record::new(
            &paths.name,
            self.name.is_some(),
            overlay_label(&resolved.overlay),
            resolved.memory_mib,
            opts.vcpus,
        );
        if resolved.overlay != Overlay::None {
            record.lower = resolved
                .disks
                .first()
                .map(|d| d.path.clone())
                .into_iter()
                .collect();
            record.lower.extend(resolved.layers.iter().cloned());
        }
        let timeout = self
            .boot_timeout
            .unwrap_or_else(|| default_boot_timeout(resolved.pvm));
        let child = spawn_vmm(
            &bin,
            &opts.pinned(&resolved),
            snapshot.as_ref().map(|s| s.dir.as_path()),
            &claim,
            &paths,
        );
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                paths.remove();
                return Err(e);
            }
        };
        record.pid = child.id();
        let _ = paths.write_record(&record);
        let vm = Vm::started(
            paths,
            child,
            claim,
            console.clone(),
            resolved.exec_defaults.clone(),
        );
        if let Some(f) = &self.started {
            f(&vm.kill_switch());
        }
        let mut watch = Watch {
            console,
            offset: 0,
            carry: String::new(),
            reached: None,
            progress: self.progress,
            t0,
            // A restored VM answers at once: look often.
            poll: if snapshot.is_some() {
                Duration::from_millis(5)
            } else {
                Duration::from_millis(200)
            },
        };
        watch.wait_for_agent(&vm, timeout)?;
        if snapshot.is_some() {
            refresh(&vm)?;
        }
        Ok(vm)
    }
}

/// A restored guest's random pool gets fresh host entropy and its clock the host's time, so
/// forks of one snapshot differ and none lives in the past.
fn refresh(vm: &Vm) -> Result<(), VmError> {
    let mut entropy = [0u8; 64];
    // SAFETY: getrandom writes at most `len` bytes into the buffer.
    let n = unsafe { libc::getrandom(entropy.as_mut_ptr().cast(), entropy.len(), 0) };
    if n != entropy.len() as isize {
        return Err(VmError::Host {
            what: "host entropy",
            path: "getrandom(2)".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    vm.agent().refresh(&entropy, now)?;
    Ok(())
}

/// How `vmrun ls` shows an overlay.
fn overlay_label(o: &Overlay) -> String {
    match o {
        Overlay::None => "none".into(),
        Overlay::Tmpfs { size: None } => "tmpfs".into(),
        Overlay::Tmpfs { size: Some(s) } => format!("tmpfs {s}"),
        Overlay::Disk { path, fstype } => format!("{fstype} {}", path.display()),
    }
}

/// Starts `vmrun boot` for these (pinned) options, in a session of its own so a terminal's
/// signals do not reach it, with its stderr in the VM's directory and the VM's lock inherited
/// (it holds the VM alive for as long as it runs).
fn spawn_vmm(
    bin: &std::path::Path,
    opts: &VmOptions,
    restore: Option<&std::path::Path>,
    claim: &Claim,
    paths: &VmPaths,
) -> Result<std::process::Child, VmError> {
    let log = File::create(paths.vmm_log()).map_err(|source| VmError::Host {
        what: "VMM log",
        path: paths.vmm_log(),
        source,
    })?;
    let mut cmd = Command::new(bin);
    // Every decision is in the arguments: the VMM reads no environment of ours.
    cmd.arg("boot").args(opts.to_args());
    if let Some(dir) = restore {
        cmd.arg("--restore").arg(dir);
    }
    cmd.env_remove(ENV_TOGGLE)
        .env_remove("VMRUN_KERNEL")
        .env_remove("VMRUN_INITRAMFS")
        .env_remove("VMRUN_ROOTFS");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
    // The VMM must not outlive its owner, even one killed without running Drop: it watches for
    // this process to go away, unless the VM was detached. (PR_SET_PDEATHSIG would fire when
    // the spawning *thread* ends, which kills VMs started from worker threads.)
    cmd.env(OWNER_ENV, std::process::id().to_string())
        .env(VM_DIR_ENV, &paths.dir);
    let lock_fd = claim.lock_file().as_raw_fd();
    // SAFETY: between fork and exec the closure only makes async-signal-safe calls (setsid,
    // fcntl) on an fd that stays open in the parent for the duration of the spawn.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Keep the VM's lock across exec: the VMM then holds it for its whole life.
            let flags = libc::fcntl(lock_fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(lock_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().map_err(VmError::Spawn)
}

/// Follows a start: the console for the phases, the VMM for an early end, the agent.
struct Watch {
    console: PathBuf,
    offset: u64,
    /// The end of what was read last, so a marker split across two reads is still seen.
    carry: String,
    reached: Option<Phase>,
    progress: Option<ProgressFn>,
    t0: Instant,
    poll: Duration,
}

impl Watch {
    fn reach(&mut self, p: Phase) {
        if self.reached.is_some_and(|r| r >= p) {
            return;
        }
        self.reached = Some(p);
        if let Some(f) = &self.progress {
            f(p, self.t0.elapsed());
        }
    }

    /// New console output, checked for the markers of each phase.
    fn poll_console(&mut self) {
        let Ok(mut f) = File::open(&self.console) else {
            return;
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        // At most 1 MiB a poll: a chatty guest cannot make the launcher read without end.
        if let Ok(n) = f.take(1 << 20).read_to_end(&mut buf) {
            self.offset += n as u64;
        }
        if buf.is_empty() {
            return;
        }
        let mut text = std::mem::take(&mut self.carry);
        text.push_str(&String::from_utf8_lossy(&buf));
        for (marker, phase) in [
            (KERNEL_STARTED, Phase::KernelRunning),
            (INIT_STARTED, Phase::InitStarted),
            (OVERLAY_ROOT, Phase::RootMounted),
            (DIRECT_ROOT, Phase::RootMounted),
            (INIT_READY, Phase::RootMounted),
        ] {
            if text.contains(marker) {
                self.reach(phase);
            }
        }
        let keep = text.len().saturating_sub(64);
        let keep = (keep..=text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(text.len());
        self.carry = text[keep..].to_string();
    }

    fn wait_for_agent(&mut self, vm: &Vm, timeout: Duration) -> Result<(), VmError> {
        let deadline = self.t0 + timeout;
        loop {
            if vm.paths().socket().exists() {
                self.reach(Phase::VmmStarted);
            }
            self.poll_console();
            if let Some(status) = vm.ended() {
                return Err(boot_failure(vm, status));
            }
            if vm.agent().stat("/").is_ok() {
                self.reach(Phase::AgentReady);
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(VmError::BootTimeout {
                    secs: timeout.as_secs(),
                    console_tail: vm.console_tail(20),
                });
            }
            std::thread::sleep(self.poll);
        }
    }
}

/// Why the VM ended before its agent answered: the VMM's last word, and the init's error line.
fn boot_failure(vm: &Vm, status: Option<std::process::ExitStatus>) -> VmError {
    let mut log = String::new();
    if let Ok(f) = File::open(vm.paths().vmm_log()) {
        let _ = f.take(64 << 10).read_to_string(&mut log);
    }
    let console = std::fs::read_to_string(vm.paths().console()).unwrap_or_default();
    let init_error = console
        .lines()
        .rev()
        .find(|l| l.contains(INIT_ERROR))
        .map(str::to_string);
    let summary = log
        .lines()
        .filter_map(|l| l.strip_prefix("vmrun: "))
        .next_back()
        .map(str::to_string)
        .unwrap_or_else(|| match status {
            Some(s) => format!("VMM exited with {s}"),
            None => "the VMM is gone".into(),
        });
    VmError::BootFailed {
        summary,
        init_error,
        console_tail: vm.console_tail(20),
    }
}

/// The `vmrun` binary: `VMRUN_BIN`, next to the running program (or its parent directory, as
/// for test binaries under `target/*/deps`), or on `PATH`.
pub fn vmm_binary() -> Result<PathBuf, VmError> {
    if let Some(p) = std::env::var_os("VMRUN_BIN") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        return Err(VmError::Binary(format!(
            "VMRUN_BIN={} is not a file; point it at the vmrun binary",
            p.display()
        )));
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
        "`vmrun` is neither next to this program nor on PATH; install it with `cargo install --locked --path vmm` from a vmrun checkout, or set VMRUN_BIN=/path/to/vmrun".into(),
    ))
}
