//! The jail a VMM process runs its guest in, after Firecracker's jailer but inside the VMM
//! process itself (one binary, no second launcher to keep in step):
//!
//! 1. [`enter`] (single-threaded, as root) moves the process into new PID, mount, network,
//!    IPC and UTS namespaces: it forks, the parent stays behind as a small supervisor (it waits,
//!    relays the end, watches the owner, removes the cgroup) and the child becomes PID 1 of the
//!    new PID namespace. The child bind-mounts what the VM needs (`/dev/kvm`, the images
//!    read-only, its disks, its runtime directory) into an empty tmpfs at their own paths,
//!    pivots its root there, mounts a procfs that shows only itself, drops every capability
//!    from its bounding set, sets `no_new_privs`, limits its files and core dumps and joins a
//!    cgroup v2 group with memory and CPU limits where the host has one.
//! 2. The VM is built as root inside the jail (images, disks, sockets, KVM fds opened).
//! 3. [`User::become_it`] runs before the first VMM thread starts: no groups, an unprivileged
//!    uid and gid (a fresh pair per VM unless configured), hence no capabilities left, and a
//!    limit on its threads. Every guest instruction runs after this.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Gid, Pid, Uid};
use thiserror::Error;

/// The supervisor's process name.
pub const SUPERVISOR_NAME: &std::ffi::CStr = c"vmrun-jail";
/// Where fresh per-VM uids and gids start: far above login and system users.
pub const FRESH_ID_BASE: u32 = 1_000_000_000;
/// What a VM's cgroup allows beyond guest memory: the VMM's own heap and buffers, and the
/// page cache of its disk images and snapshot files (which the kernel reclaims at the limit).
pub const MEMORY_OVERHEAD_MIB: u64 = 256;
/// Open files a jailed VMM may hold: its vsock connections are most of them.
pub const OPEN_FILES: u64 = 4096;
/// Threads beyond one per vCPU (event loop, control, main, start-up helpers).
const EXTRA_THREADS: u64 = 32;
/// A cgroup v2 CPU period (cpu.max's second field), in microseconds.
const CPU_PERIOD_US: u64 = 100_000;

#[derive(Debug, Error)]
pub enum JailError {
    #[error("the jail needs root (vmrun runs as uid {0}); run vmrun as root, or pass --no-jail")]
    NotRoot(u32),
    #[error("jail: {what}: {source}; pass --no-jail to start without it")]
    Sys { what: String, source: nix::Error },
    #[error("jail: {what} {path}: {source}; pass --no-jail to start without it")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "jail: entered with {0} threads; it must be entered while the VMM has one (a bug in vmrun)"
    )]
    Threads(usize),
    #[error("--cpu-quota needs a cgroup v2 cpu controller, and {0}")]
    NoCgroup(String),
    #[error("jail: capabilities remain after dropping to uid {uid} (effective {effective:#x}, permitted {permitted:#x})")]
    CapsLeft {
        uid: u32,
        effective: u64,
        permitted: u64,
    },
}

fn sys(what: impl Into<String>) -> impl FnOnce(nix::Error) -> JailError {
    let what = what.into();
    move |source| JailError::Sys { what, source }
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> JailError {
    let path = path.to_path_buf();
    move |source| JailError::Io { what, path, source }
}

/// A path of the host made visible at the same path inside the jail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bind {
    pub path: PathBuf,
    pub writable: bool,
    /// Device nodes stay usable (only `/dev/kvm` needs it).
    pub device: bool,
}

impl Bind {
    pub fn read_only(path: impl Into<PathBuf>) -> Bind {
        Bind {
            path: path.into(),
            writable: false,
            device: false,
        }
    }
    pub fn writable(path: impl Into<PathBuf>) -> Bind {
        Bind {
            path: path.into(),
            writable: true,
            device: false,
        }
    }
}

/// The unprivileged user a jailed VMM runs its VM as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
}

/// cgroup v2 limits for one VM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// memory.max in bytes.
    pub memory: Option<u64>,
    /// cpu.max as a percentage of one CPU (150 = one and a half CPUs).
    pub cpu_percent: Option<u32>,
}

/// Everything [`enter`] needs.
#[derive(Clone, Debug)]
pub struct Spec {
    /// The VM's name: its cgroup's name and the jail's host name.
    pub name: String,
    /// An empty directory to hold the jail's root (the tmpfs is mounted on it only inside the
    /// jail's mount namespace: on the host it stays an empty directory).
    pub root: PathBuf,
    pub binds: Vec<Bind>,
    /// Default: a fresh uid and gid for this VM, [`FRESH_ID_BASE`] + the supervisor's pid.
    pub user: Option<User>,
    pub limits: Limits,
    /// The process the VM must not outlive (the library's), checked by the supervisor.
    pub owner: Option<i32>,
    /// Its presence means the owner let the VM go (`Vm::detach`).
    pub detached_mark: Option<PathBuf>,
    /// Files the supervisor removes after the VMM ends (sockets the unprivileged VMM could
    /// not unlink from a directory it does not own).
    pub remove_after: Vec<PathBuf>,
}

/// What the jailed child learns from [`enter`].
#[derive(Debug)]
pub struct Jailed {
    pub user: User,
    /// How the cgroup went: its path, or why there is none.
    pub cgroup: Result<PathBuf, String>,
    /// The old root could not be pivoted from (an initramfs root): the jail is a chroot into
    /// the same tmpfs, sealed by the dropped capabilities.
    pub chrooted: bool,
}

impl Jailed {
    pub fn describe(&self) -> String {
        format!(
            "jail: namespaces (pid, mount, net, ipc, uts), {} into an empty tmpfs, no capabilities, no_new_privs, uid {} gid {}; cgroup: {}",
            if self.chrooted { "chroot" } else { "pivot_root" },
            self.user.uid,
            self.user.gid,
            match &self.cgroup {
                Ok(p) => p.display().to_string(),
                Err(why) => format!("none ({why})"),
            }
        )
    }
}

/// Whether this process can build a jail: root, namespaces.
pub fn available() -> Result<(), JailError> {
    let uid = Uid::effective().as_raw();
    if uid != 0 {
        return Err(JailError::NotRoot(uid));
    }
    Ok(())
}

/// The signals the supervisor relays or acts on.
fn supervised_signals() -> SigSet {
    let mut s = SigSet::empty();
    for sig in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGCHLD,
    ] {
        s.add(sig);
    }
    s
}

/// Moves this process into its jail. Must be called while the process has one thread. In
/// the parent it never returns: that process supervises the jailed child and exits as the
/// child did. In the child it returns once the jail is built, still as root (see [`User`]).
pub fn enter(spec: &Spec) -> Result<Jailed, JailError> {
    available()?;
    // Namespaces and capabilities belong to threads: one left behind would stay outside.
    let threads = fs::read_dir("/proc/self/task").map_or(1, |d| d.count());
    if threads != 1 {
        return Err(JailError::Threads(threads));
    }
    let cgroup = Cgroup::prepare(&spec.name, &spec.limits);
    if let (Err(why), Some(_)) = (&cgroup, spec.limits.cpu_percent) {
        return Err(JailError::NoCgroup(why.clone()));
    }
    let cwd = std::env::current_dir().map_err(io("working directory", Path::new(".")))?;
    let signals = supervised_signals();
    signals
        .thread_block()
        .map_err(sys("blocking the supervised signals"))?;
    unshare(CloneFlags::CLONE_NEWPID).map_err(sys("a new PID namespace"))?;
    let (mut go_rx, mut go_tx) = pipe()?;
    // SAFETY: the process has a single thread here (the caller's contract), so the child
    // may run any code after fork.
    match unsafe { fork() }.map_err(sys("fork"))? {
        ForkResult::Parent { child } => {
            drop(go_rx);
            // Told apart from the VMM in `ps` (its comm stays `vmrun`).
            let _ = nix::sys::prctl::set_name(SUPERVISOR_NAME);
            let user = spec.user.unwrap_or_else(|| fresh_user(std::process::id()));
            let joined = cgroup.and_then(|c| c.join(child).map(|()| c));
            // The child learns its user and whether its cgroup holds it, then goes on.
            let msg = format!(
                "{} {} {}\n",
                user.uid,
                user.gid,
                match &joined {
                    Ok(c) => format!("ok {}", c.dir.display()),
                    Err(why) => format!("no {why}"),
                }
            );
            let _ = go_tx.write_all(msg.as_bytes());
            drop(go_tx);
            supervise(spec, child, joined.ok(), signals)
        }
        ForkResult::Child => {
            drop(go_tx);
            let _ = signals.thread_unblock();
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(sys("PR_SET_PDEATHSIG"))?;
            let mut msg = String::new();
            let _ = go_rx.read_to_string(&mut msg);
            let (user, cgroup) = parse_go(&msg).ok_or_else(|| JailError::Sys {
                what: "the supervisor ended before the jail was built".into(),
                source: nix::Error::EPIPE,
            })?;
            let chrooted = build(spec, &cwd)?;
            Ok(Jailed {
                user,
                cgroup,
                chrooted,
            })
        }
    }
}

fn fresh_user(supervisor: u32) -> User {
    let id = FRESH_ID_BASE.saturating_add(supervisor);
    User { uid: id, gid: id }
}

fn parse_go(msg: &str) -> Option<(User, Result<PathBuf, String>)> {
    let line = msg.strip_suffix('\n')?;
    let mut it = line.splitn(4, ' ');
    let uid = it.next()?.parse().ok()?;
    let gid = it.next()?.parse().ok()?;
    let cgroup = match it.next()? {
        "ok" => Ok(PathBuf::from(it.next()?)),
        "no" => Err(it.next().unwrap_or("").to_string()),
        _ => return None,
    };
    Some((User { uid, gid }, cgroup))
}

fn pipe() -> Result<(fs::File, fs::File), JailError> {
    let (r, w) = nix::unistd::pipe().map_err(sys("pipe"))?;
    Ok((fs::File::from(r), fs::File::from(w)))
}

/// The child's side: namespaces, the root, the limits.
fn build(spec: &Spec, cwd: &Path) -> Result<bool, JailError> {
    unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS,
    )
    .map_err(sys("new mount, network, IPC and UTS namespaces"))?;
    let _ = nix::unistd::sethostname(format!("vmrun-{}", spec.name));
    // Nothing mounted here propagates back to the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(sys("making the mounts private"))?;
    let root = &spec.root;
    mount(
        Some("vmrun-jail"),
        root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("size=1m,mode=0755"),
    )
    .map_err(sys(format!("a tmpfs on {}", root.display())))?;
    // The working directory first, so nothing is created through a bind mount.
    let _ = fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(inside(root, cwd));
    for b in &merged(&spec.binds) {
        bind(root, b)?;
    }
    let proc_dir = root.join("proc");
    fs::DirBuilder::new()
        .mode(0o555)
        .create(&proc_dir)
        .map_err(io("the jail's /proc", &proc_dir))?;
    let chrooted = switch_root(root)?;
    // Only this process (PID 1 here) in it, and no /proc/sys: for /proc/self (page maps).
    let _ = mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("subset=pid,hidepid=invisible"),
    );
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(sys("making the jail's root read-only"))?;
    if nix::unistd::chdir(cwd).is_err() {
        let _ = nix::unistd::chdir("/");
    }
    setrlimit(Resource::RLIMIT_NOFILE, OPEN_FILES, OPEN_FILES).map_err(sys("RLIMIT_NOFILE"))?;
    // Guest memory must never land in a core file.
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(sys("RLIMIT_CORE"))?;
    drop_bounding_set()?;
    nix::sys::prctl::set_no_new_privs().map_err(sys("PR_SET_NO_NEW_PRIVS"))?;
    Ok(chrooted)
}

/// The binds with each path once (the same image may be asked for twice, e.g. one layer given
/// twice; a second bind onto a read-only first would fail): writable or a device when any
/// request for it is.
fn merged(binds: &[Bind]) -> Vec<Bind> {
    let mut out: Vec<Bind> = Vec::new();
    for b in binds {
        match out.iter_mut().find(|o| o.path == b.path) {
            Some(o) => {
                o.writable |= b.writable;
                o.device |= b.device;
            }
            None => out.push(b.clone()),
        }
    }
    out
}

/// `path` as seen under `root`.
fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// Makes `b.path` visible under `root` at the same path: a file or directory of the tmpfs
/// for a mount point, then a bind mount of the (symlink-resolved) source onto it.
fn bind(root: &Path, b: &Bind) -> Result<(), JailError> {
    let abs = std::path::absolute(&b.path).map_err(io("bind source", &b.path))?;
    let source = fs::canonicalize(&abs).map_err(io("bind source", &abs))?;
    let target = inside(root, &abs);
    if let Some(parent) = target.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(io("jail directory", parent))?;
    }
    if source.is_dir() {
        match fs::DirBuilder::new().mode(0o755).create(&target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io("jail mount point", &target)(e)),
        }
    } else {
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&target)
            .map_err(io("jail mount point", &target))?;
    }
    mount(
        Some(&source),
        &target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(sys(format!("binding {}", abs.display())))?;
    let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOSUID;
    if !b.writable {
        flags |= MsFlags::MS_RDONLY;
    }
    if !b.device {
        flags |= MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    }
    mount(None::<&str>, &target, None::<&str>, flags, None::<&str>)
        .map_err(sys(format!("restricting the bind of {}", abs.display())))?;
    Ok(())
}

/// Makes `root` this process's root: pivot_root, or where the current root cannot be pivoted
/// from (the kernel's initramfs), the mount moved over `/` and a chroot into it. Returns
/// whether it chrooted.
fn switch_root(root: &Path) -> Result<bool, JailError> {
    nix::unistd::chdir(root).map_err(sys(format!("entering {}", root.display())))?;
    match nix::unistd::pivot_root(".", ".") {
        Ok(()) => {
            // The old root is stacked under the new one: detach it.
            umount2(".", MntFlags::MNT_DETACH).map_err(sys("detaching the old root"))?;
            nix::unistd::chdir("/").map_err(sys("chdir /"))?;
            Ok(false)
        }
        Err(nix::Error::EINVAL) => {
            mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
                .map_err(sys("moving the jail's root over /"))?;
            nix::unistd::chroot(".").map_err(sys("chroot"))?;
            nix::unistd::chdir("/").map_err(sys("chdir /"))?;
            Ok(true)
        }
        Err(e) => Err(sys("pivot_root")(e)),
    }
}

/// Empties the capability bounding set: nothing this process or its threads run can gain a
/// capability again. Its current (root) capabilities stay until [`User::become_it`].
fn drop_bounding_set() -> Result<(), JailError> {
    for cap in 0..64 {
        // SAFETY: PR_CAPBSET_DROP takes a capability number and changes only this thread.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if r != 0 {
            let e = nix::Error::last();
            // Past the last capability this kernel knows.
            if e == nix::Error::EINVAL {
                break;
            }
            return Err(sys(format!(
                "dropping capability {cap} from the bounding set"
            ))(e));
        }
    }
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes no pointers.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    Ok(())
}

impl User {
    /// Drops to this user for good (every thread of the process: glibc applies set*id to
    /// all of them), then checks no capability is left and limits the user's threads.
    pub fn become_it(&self, vcpus: u8) -> Result<(), JailError> {
        let (uid, gid) = (Uid::from_raw(self.uid), Gid::from_raw(self.gid));
        nix::unistd::setgroups(&[]).map_err(sys("clearing the supplementary groups"))?;
        nix::unistd::setresgid(gid, gid, gid).map_err(sys(format!("gid {}", self.gid)))?;
        nix::unistd::setresuid(uid, uid, uid).map_err(sys(format!("uid {}", self.uid)))?;
        // A credential change clears the parent-death signal: set it again, so the VMM still
        // ends with its supervisor.
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(sys("PR_SET_PDEATHSIG"))?;
        let (effective, permitted) = capabilities()?;
        if effective != 0 || permitted != 0 {
            return Err(JailError::CapsLeft {
                uid: self.uid,
                effective,
                permitted,
            });
        }
        let threads = u64::from(vcpus) + EXTRA_THREADS;
        setrlimit(Resource::RLIMIT_NPROC, threads, threads).map_err(sys("RLIMIT_NPROC"))?;
        Ok(())
    }
}

/// This thread's effective and permitted capability sets.
fn capabilities() -> Result<(u64, u64), JailError> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut h = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut d = [Data::default(); 2];
    // SAFETY: capget with a version-3 header writes two Data structs into the array.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut h, d.as_mut_ptr()) };
    if r != 0 {
        return Err(sys("capget")(nix::Error::last()));
    }
    let join = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    Ok((
        join(d[0].effective, d[1].effective),
        join(d[0].permitted, d[1].permitted),
    ))
}

/// A VM's cgroup v2 group, `<cgroup2 mount>/vmrun/<name>`.
struct Cgroup {
    dir: PathBuf,
}

impl Cgroup {
    /// Creates the group with its limits, or says why there is none.
    fn prepare(name: &str, limits: &Limits) -> Result<Cgroup, String> {
        let mount = cgroup2_mount()
            .ok_or_else(|| "this host has no cgroup v2 hierarchy mounted".to_string())?;
        let missing = missing_controllers(&mount);
        if !missing.is_empty() {
            return Err(format!(
                "the cgroup v2 hierarchy at {} has no {} controller (on this host they belong to cgroup v1)",
                mount.display(),
                missing.join(" or ")
            ));
        }
        let write = |path: PathBuf, value: &str| {
            fs::write(&path, value).map_err(|e| format!("{}: {e}", path.display()))
        };
        write(mount.join("cgroup.subtree_control"), "+memory +cpu")?;
        let parent = mount.join("vmrun");
        match fs::create_dir(&parent) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("{}: {e}", parent.display())),
        }
        write(parent.join("cgroup.subtree_control"), "+memory +cpu")?;
        let dir = parent.join(name);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("{}: {e}", dir.display())),
        }
        let c = Cgroup { dir };
        let limit = || -> Result<(), String> {
            if let Some(m) = limits.memory {
                write(c.dir.join("memory.max"), &m.to_string())?;
            }
            if let Some(p) = limits.cpu_percent {
                let quota = u64::from(p) * CPU_PERIOD_US / 100;
                write(c.dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
            }
            Ok(())
        };
        if let Err(e) = limit() {
            c.remove();
            return Err(e);
        }
        Ok(c)
    }

    fn join(&self, pid: Pid) -> Result<(), String> {
        let procs = self.dir.join("cgroup.procs");
        fs::write(&procs, pid.as_raw().to_string()).map_err(|e| {
            self.remove();
            format!("{}: {e}", procs.display())
        })
    }

    /// Removes the group once its processes are gone (a moment after they exit).
    fn remove(&self) {
        for _ in 0..50 {
            match fs::remove_dir(&self.dir) {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => return,
            }
        }
    }
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup`, or `…/unified` on a hybrid
/// host), from the mount table.
fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split_whitespace().next() == Some("cgroup2"))
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

/// Removes the cgroup of a VM that ended without its supervisor (killed with SIGKILL). A
/// group that still holds a process stays (rmdir refuses it).
pub fn remove_stale_cgroup(name: &str) {
    if let Some(m) = cgroup2_mount() {
        let _ = fs::remove_dir(m.join("vmrun").join(name));
    }
}

/// Where the cgroup of the VM `name` is, on a host whose cgroup v2 hierarchy has the memory
/// and cpu controllers (`None` elsewhere: VMs there run without cgroup limits).
pub fn cgroup_of(name: &str) -> Option<PathBuf> {
    let m = cgroup2_mount()?;
    missing_controllers(&m)
        .is_empty()
        .then(|| m.join("vmrun").join(name))
}

/// Which of the controllers a VM's limits need the cgroup v2 hierarchy at `mount` lacks.
fn missing_controllers(mount: &Path) -> Vec<&'static str> {
    let c = fs::read_to_string(mount.join("cgroup.controllers")).unwrap_or_default();
    let have: Vec<&str> = c.split_whitespace().collect();
    ["memory", "cpu"]
        .into_iter()
        .filter(|n| !have.contains(n))
        .collect()
}

/// The names of the VM cgroups on this host, for the runtime directory's sweep.
pub fn cgroup_names() -> Vec<String> {
    let Some(m) = cgroup2_mount() else {
        return Vec::new();
    };
    let Ok(rd) = fs::read_dir(m.join("vmrun")) else {
        return Vec::new();
    };
    rd.flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect()
}

/// Whether this host lets a process make the jail's namespaces: tried in a child process
/// that makes them and exits.
pub fn probe() -> Result<(), String> {
    available().map_err(|e| e.to_string())?;
    let flags = libc::CLONE_NEWPID
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS;
    // SAFETY: the child only calls unshare and _exit, both async-signal-safe, so forking a
    // process with other threads is sound.
    match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            // SAFETY: unshare takes flags only; _exit ends the child at once.
            unsafe {
                let r = libc::unshare(flags);
                libc::_exit(if r == 0 { 0 } else { 1 });
            }
        }
        ForkResult::Parent { child } => match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, 0)) => Ok(()),
            Ok(_) => Err("this host refuses new PID, mount, network, IPC or UTS namespaces (a container without CAP_SYS_ADMIN?)".into()),
            Err(e) => Err(format!("waiting for the probe: {e}")),
        },
    }
}

/// The cgroup limits a jail gets on this host, for `vmrun doctor`.
pub fn cgroup_report() -> String {
    match cgroup2_mount() {
        None => "no cgroup v2 hierarchy: VMs run without memory and CPU limits".to_string(),
        Some(m) => {
            if missing_controllers(&m).is_empty() {
                format!(
                    "cgroup v2 at {} (memory.max = guest memory + {MEMORY_OVERHEAD_MIB} MiB; --cpu-quota)",
                    m.display()
                )
            } else {
                format!(
                    "cgroup v2 at {} lacks the memory/cpu controllers (cgroup v1 holds them here): VMs run without memory and CPU limits, --cpu-quota is refused",
                    m.display()
                )
            }
        }
    }
}

/// The supervisor: waits for the jailed child, relays a stop signal as SIGKILL (the child is
/// PID 1 of its namespace, which ignores signals it has no handler for), stops it when the
/// owner goes away, cleans up, and ends as the child ended.
fn supervise(spec: &Spec, child: Pid, cgroup: Option<Cgroup>, signals: SigSet) -> ! {
    let mut stop_signal: Option<Signal> = None;
    let status = loop {
        match wait_signal(&signals, Duration::from_millis(200)) {
            Some(Signal::SIGCHLD) | None => {}
            Some(sig) => {
                stop_signal.get_or_insert(sig);
                let _ = kill(child, Signal::SIGKILL);
            }
        }
        match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(s @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => break s,
            Ok(_) => {}
            Err(_) => break WaitStatus::Exited(child, 125),
        }
        if let Some(owner) = spec.owner {
            if nix::unistd::getppid().as_raw() != owner
                && !spec.detached_mark.as_ref().is_some_and(|m| m.exists())
            {
                eprintln!("vmrun: the owning process {owner} is gone; stopping the VM");
                let _ = kill(child, Signal::SIGKILL);
                let _ = waitpid(child, None);
                cleanup(spec, cgroup.as_ref());
                std::process::exit(125);
            }
        }
    };
    cleanup(spec, cgroup.as_ref());
    let code = match (stop_signal, status) {
        (Some(sig), _) => raise(sig),
        (None, WaitStatus::Exited(_, code)) => code,
        (None, WaitStatus::Signaled(_, sig, _)) => raise(sig),
        _ => 125,
    };
    std::process::exit(code)
}

fn cleanup(spec: &Spec, cgroup: Option<&Cgroup>) {
    for p in &spec.remove_after {
        let _ = fs::remove_file(p).or_else(|_| fs::remove_dir(p));
    }
    if let Some(c) = cgroup {
        c.remove();
    }
}

/// Ends this process by `sig` as the child ended (the default action, no core file), or
/// returns 128 + `sig` for a signal whose default does not end a process.
fn raise(sig: Signal) -> i32 {
    let _ = setrlimit(Resource::RLIMIT_CORE, 0, 0);
    // SAFETY: restoring the default action of a signal has no preconditions.
    let _ = unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigDfl) };
    let mut set = SigSet::empty();
    set.add(sig);
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&set), None);
    let _ = nix::sys::signal::raise(sig);
    128 + sig as i32
}

/// Waits at most `timeout` for one of the blocked `signals`.
fn wait_signal(signals: &SigSet, timeout: Duration) -> Option<Signal> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: sigtimedwait reads the set and the timespec and writes no siginfo (null).
    let r = unsafe { libc::sigtimedwait(signals.as_ref(), std::ptr::null_mut(), &ts) };
    if r <= 0 {
        return None;
    }
    Signal::try_from(r).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_asked_for_twice_is_bound_once() {
        let m = merged(&[
            Bind::read_only("/c/l.erofs"),
            Bind::read_only("/k"),
            Bind::read_only("/c/l.erofs"),
            Bind::writable("/k"),
        ]);
        assert_eq!(m, vec![Bind::read_only("/c/l.erofs"), Bind::writable("/k")]);
    }

    #[test]
    fn go_message_round_trips() {
        let (u, c) = parse_go("1000000042 1000000042 ok /sys/fs/cgroup/vmrun/a b\n").unwrap();
        assert_eq!(
            u,
            User {
                uid: 1_000_000_042,
                gid: 1_000_000_042
            }
        );
        assert_eq!(c.unwrap(), PathBuf::from("/sys/fs/cgroup/vmrun/a b"));
        let (_, c) = parse_go("5 6 no no cgroup v2 here\n").unwrap();
        assert_eq!(c.unwrap_err(), "no cgroup v2 here");
        assert!(parse_go("").is_none());
        assert!(parse_go("x 6 ok /a\n").is_none());
        assert!(parse_go("5 6 maybe\n").is_none());
    }

    #[test]
    fn fresh_users_are_far_from_real_ones() {
        assert_eq!(fresh_user(7).uid, FRESH_ID_BASE + 7);
        assert_eq!(fresh_user(u32::MAX).uid, u32::MAX);
    }

    #[test]
    fn paths_map_under_the_root() {
        assert_eq!(
            inside(Path::new("/run/j"), Path::new("/dev/kvm")),
            PathBuf::from("/run/j/dev/kvm")
        );
    }
}
