//! `exec`: start a command (optionally on a PTY, chrooted, as another user), stream its stdin,
//! stdout and stderr, deliver resizes and signals, enforce the timeout on the whole process
//! group, and report how it ended. The result never waits for a grandchild that keeps the
//! output open: once the child is reaped, what is already buffered is drained and EXIT sent.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmrun_protocol::agent::{
    kind, read_frame, write_frame, ErrorInfo, ErrorKind, Exec, ExitStatus,
};

use crate::config::Config;
use crate::error::resource_error;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const READ_CHUNK: usize = 64 << 10;

struct Running {
    pid: i32,
    pidfd: OwnedFd,
    stdin: Option<File>,
    /// stdout pipe, or the PTY master (which carries everything).
    out: File,
    err: Option<File>,
    pty: bool,
}

fn spawn_error(argv0: &str, e: &io::Error) -> ErrorInfo {
    ErrorInfo {
        kind: ErrorKind::Spawn,
        errno: e.raw_os_error().unwrap_or(0),
        message: format!("cannot start {argv0}: {e}"),
    }
}

fn cstring(s: &str, what: &str) -> Result<CString, ErrorInfo> {
    CString::new(s).map_err(|_| ErrorInfo {
        kind: ErrorKind::InvalidInput,
        errno: 0,
        message: format!("{what} contains a NUL byte"),
    })
}

/// `name` looked up in `path` the way execvp would; `None` when no directory has it.
fn search_path(name: &str, path: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| std::path::Path::new(d).join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

fn spawn(cfg: &Config, x: &Exec) -> Result<Running, ErrorInfo> {
    let argv0 = x.argv[0].as_str();
    // The common case (no chroot or identity change; a terminal is fine) needs nothing
    // between fork and exec that posix_spawn cannot do, so it is started that way
    // (`crate::spawn`), which takes a path.
    // In rooted mode this thread is confined to the root first; children inherit it.
    cfg.confine_thread()?;
    let simple = x.uid.is_none() && x.gid.is_none();
    let program = if simple && !argv0.contains('/') {
        let path = x
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.as_str())
            .unwrap_or(if x.clear_env { "" } else { DEFAULT_PATH });
        match search_path(argv0, path) {
            Some(p) => p.into_os_string(),
            None => {
                return Err(spawn_error(
                    argv0,
                    &io::Error::from_raw_os_error(libc::ENOENT),
                ))
            }
        }
    } else {
        argv0.into()
    };
    let env = child_env(x);
    let mut pty = x.pty.map(|(rows, cols)| open_pty(rows, cols)).transpose()?;
    if simple {
        // posix_spawn (vfork-like: no copy of the agent's page tables); see `spawn`.
        let cwd = match &x.cwd {
            Some(c) => cfg.resolve(c)?,
            None => cfg.resolve("/")?,
        };
        let program = cstring(&program.to_string_lossy(), "the program path")?;
        let argv = x
            .argv
            .iter()
            .map(|a| cstring(a, "an argument"))
            .collect::<Result<Vec<_>, _>>()?;
        let env = env
            .iter()
            .map(|(k, v)| cstring(&format!("{k}={v}"), "an environment variable"))
            .collect::<Result<Vec<_>, _>>()?;
        let cwd = cstring(&cwd.to_string_lossy(), "cwd")?;
        match pty.take() {
            Some((master, slave)) => {
                let path = std::fs::read_link(format!("/proc/self/fd/{}", slave.as_raw_fd()))
                    .map_err(|e| spawn_error(argv0, &e))?;
                let path = cstring(&path.to_string_lossy(), "the terminal's path")?;
                let io = crate::spawn::ChildIo::Terminal(&path);
                match crate::spawn::spawn(&program, &argv, &env, &cwd, io) {
                    Ok(s) => {
                        drop(slave);
                        let out = File::from(master);
                        let stdin = if x.stdin { out.try_clone().ok() } else { None };
                        return supervised(argv0, s.pid, stdin, out, None, true);
                    }
                    // The slave may not open by path (a nodev mount): fork instead, which
                    // hands the child the open slave.
                    Err(e) => {
                        eprintln!("vmrun-agent: posix_spawn on {path:?}: {e}; forking instead");
                        pty = Some((master, slave));
                    }
                }
            }
            None => {
                let io = crate::spawn::ChildIo::Pipes {
                    with_stdin: x.stdin,
                };
                let s = crate::spawn::spawn(&program, &argv, &env, &cwd, io)
                    .map_err(|e| spawn_error(argv0, &e))?;
                let out = s.stdout.expect("pipes give a stdout");
                return supervised(argv0, s.pid, s.stdin, out, s.stderr, false);
            }
        }
    }
    let mut cmd = Command::new(&program);
    cmd.arg0(argv0);
    cmd.args(&x.argv[1..]);
    cmd.env_clear().envs(env);

    cmd.current_dir(match &x.cwd {
        Some(c) => cfg.resolve(c)?,
        None => cfg.resolve("/")?,
    });
    let (uid, gid) = (x.uid, x.gid);

    let mut pty_master: Option<OwnedFd> = None;
    if let Some((master, slave)) = pty {
        let dup = |f: &OwnedFd| {
            f.try_clone()
                .map(Stdio::from)
                .map_err(|e| spawn_error(argv0, &e))
        };
        cmd.stdin(dup(&slave)?)
            .stdout(dup(&slave)?)
            .stderr(Stdio::from(slave));
        pty_master = Some(master);
    } else {
        cmd.stdin(if x.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    }
    let pty = pty_master.is_some();
    set_up_child(&mut cmd, pty, uid, gid);
    let mut child = cmd.spawn().map_err(|e| spawn_error(argv0, &e))?;
    let pid = child.id() as i32;
    let (stdin, out, err) = match pty_master {
        Some(m) => {
            let f = File::from(m);
            let w = if x.stdin { f.try_clone().ok() } else { None };
            (w, f, None)
        }
        None => (
            child.stdin.take().map(|s| File::from(OwnedFd::from(s))),
            File::from(OwnedFd::from(child.stdout.take().expect("stdout is piped"))),
            child.stderr.take().map(|s| File::from(OwnedFd::from(s))),
        ),
    };
    // `child` is dropped without waiting: the pidfd is how we learn it ended.
    drop(child);
    supervised(argv0, pid, stdin, out, err, pty)
}

/// A pseudo-terminal of this size: (master, slave), both close-on-exec (the command gets the
/// slave as its stdin, stdout and stderr; the master must not leak into it).
fn open_pty(rows: u16, cols: u16) -> Result<(OwnedFd, OwnedFd), ErrorInfo> {
    let (mut m, mut s) = (-1, -1);
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: out-pointers to two ints and a valid winsize; name and termios may be null.
    if unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) } != 0 {
        let e = io::Error::last_os_error();
        let message =
            format!("cannot open a pseudo-terminal: {e} (is devpts mounted on /dev/pts?)");
        return Err(ErrorInfo {
            kind: ErrorKind::Io,
            errno: e.raw_os_error().unwrap_or(0),
            message,
        });
    }
    // SAFETY: openpty returned two fresh fds that we now own; fcntl on them.
    unsafe {
        libc::fcntl(m, libc::F_SETFD, libc::FD_CLOEXEC);
        libc::fcntl(s, libc::F_SETFD, libc::FD_CLOEXEC);
        Ok((OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)))
    }
}

/// The environment a command gets: a default PATH, HOME and TERM (unless the request clears
/// it), what the init handed the agent for every program, then the request's own (later
/// entries win).
fn child_env(x: &Exec) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    if !x.clear_env {
        let term = if x.pty.is_some() {
            "xterm-256color"
        } else {
            "dumb"
        };
        env.push(("PATH".into(), DEFAULT_PATH.into()));
        env.push(("HOME".into(), "/root".into()));
        env.push(("TERM".into(), term.into()));
        // glibc's CPU tunables on hosts that emulate guest ring 0, where AVX state leaks
        // between tasks.
        if let Ok(t) = std::env::var("GLIBC_TUNABLES") {
            env.push(("GLIBC_TUNABLES".into(), t));
        }
    }
    for (k, v) in &x.env {
        env.retain(|(e, _)| e != k);
        env.push((k.clone(), v.clone()));
    }
    env
}

/// A started command under supervision: a pidfd to learn when it ends, the OOM score of an
/// ordinary process.
fn supervised(
    argv0: &str,
    pid: i32,
    stdin: Option<File>,
    out: File,
    err: Option<File>,
    pty: bool,
) -> Result<Running, ErrorInfo> {
    // SAFETY: pidfd_open on our own child's pid; the result is checked.
    let pfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as RawFd;
    if pfd < 0 {
        let e = io::Error::last_os_error();
        // SAFETY: killing our own child's process group.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
        let _ = reap(pid, false);
        return Err(spawn_error(argv0, &e));
    }
    // SAFETY: a fresh pidfd we own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pfd) };
    normal_oom_score(pid);
    Ok(Running {
        pid,
        pidfd,
        stdin,
        out,
        err,
        pty,
    })
}

/// What runs between fork and exec when the simple path does not apply: a session (and the
/// PTY as controlling terminal) and identity. (The root is the thread's, inherited.)
fn set_up_child(cmd: &mut Command, pty: bool, uid: Option<u32>, gid: Option<u32>) {
    // SAFETY: the closure runs in the child between fork and exec and only makes
    // async-signal-safe system calls on data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            // A session of its own: the process group the timeout and signals address, and the
            // PTY's controlling terminal.
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if pty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(g) = gid {
                if libc::setgid(g) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some(u) = uid {
                if libc::setgroups(0, std::ptr::null()) < 0 || libc::setuid(u) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Runs the request to its end on this connection: `STARTED`, the output, `EXIT`. An error
/// is one the command could not start with (or its supervision), for the server to send.
pub fn run(s: &mut UnixStream, cfg: &Config, x: Exec) -> Result<(), ErrorInfo> {
    let running = spawn(cfg, &x)?;
    if write_frame(s, kind::STARTED, &(running.pid as u32).to_le_bytes()).is_err() {
        // SAFETY: killing the process group we created.
        unsafe { libc::kill(-running.pid, libc::SIGKILL) };
    }
    supervise(s, running, x.timeout_ms.map(Duration::from_millis))
}

/// The agent shields itself from the OOM killer (see `main`); the commands it runs must not
/// inherit that, so a command that exhausts guest memory is the one killed, not the agent.
fn normal_oom_score(pid: i32) {
    static OWN: std::sync::OnceLock<i32> = std::sync::OnceLock::new();
    let own = *OWN.get_or_init(|| {
        std::fs::read_to_string("/proc/self/oom_score_adj")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    });
    if own < 0 {
        let _ = std::fs::write(format!("/proc/{pid}/oom_score_adj"), "0");
    }
}

fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl flag manipulation on an fd we own.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
}

/// Reads what is available; `Ok(false)` at end of stream (EOF, or EIO from a PTY whose slave
/// closed).
fn pump(f: &mut File, frame: u8, out: &Mutex<UnixStream>, buf: &mut [u8]) -> io::Result<bool> {
    loop {
        match f.read(buf) {
            Ok(0) => return Ok(false),
            Ok(n) => {
                let mut w = out.lock().unwrap_or_else(|e| e.into_inner());
                write_frame(&mut *w, frame, &buf[..n])?;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.raw_os_error() == Some(libc::EIO) => return Ok(false),
            Err(e) => return Err(e),
        }
    }
}

fn supervise(s: &mut UnixStream, r: Running, timeout: Option<Duration>) -> Result<(), ErrorInfo> {
    let Running {
        pid,
        pidfd,
        stdin,
        mut out,
        mut err,
        pty,
    } = r;
    let (Ok(reader), Ok(writer)) = (s.try_clone(), s.try_clone()) else {
        // SAFETY: killing the process group we created.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
        let _ = reap(pid, false);
        return Err(resource_error(
            "duplicate the connection",
            &io::Error::last_os_error(),
        ));
    };
    let writer = Arc::new(Mutex::new(writer));
    let finished = Arc::new(AtomicBool::new(false));
    let master_fd = if pty { Some(out.as_raw_fd()) } else { None };
    // The client's input (stdin, resizes, signals) on a pooled thread; `input_done` says
    // when it has returned.
    let (done_tx, input_done) = std::sync::mpsc::sync_channel::<()>(1);
    let input = {
        let finished = finished.clone();
        crate::pool::execute_here(Box::new(move || {
            client_input(reader, stdin, master_fd, pid, finished);
            let _ = done_tx.send(());
        }))
    };
    if let Err(e) = input {
        eprintln!("vmrun-agent: exec: cannot start the input thread: {e}");
        // SAFETY: killing the process group we created.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
        let _ = reap(pid, false);
        return Err(resource_error("start the command's input thread", &e));
    }

    set_nonblocking(out.as_raw_fd());
    if let Some(e) = &err {
        set_nonblocking(e.as_raw_fd());
    }
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut buf = vec![0u8; READ_CHUNK];
    let (mut out_open, mut err_open) = (true, err.is_some());
    let mut timed_out = false;
    let send_failed = loop {
        let mut fds = vec![libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        if out_open {
            fds.push(libc::pollfd {
                fd: out.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        if err_open {
            if let Some(e) = &err {
                fds.push(libc::pollfd {
                    fd: e.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
        }
        let wait_ms = match deadline {
            Some(d) => d
                .saturating_duration_since(Instant::now())
                .as_millis()
                .min(i32::MAX as u128) as i32,
            None => -1,
        };
        // SAFETY: fds is a live array of pollfd of the length passed.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait_ms) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break true;
        }
        if n == 0 && deadline.is_some_and(|d| Instant::now() >= d) {
            timed_out = true;
            // SAFETY: killing the process group we created.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            break false;
        }
        let exited = fds[0].revents != 0;
        if out_open {
            match pump(&mut out, kind::STDOUT, &writer, &mut buf) {
                Ok(open) => out_open = open,
                Err(e) => break lost(pid, &e),
            }
        }
        if err_open {
            if let Some(e) = err.as_mut() {
                match pump(e, kind::STDERR, &writer, &mut buf) {
                    Ok(open) => err_open = open,
                    Err(e) => break lost(pid, &e),
                }
            }
        }
        if exited {
            break false;
        }
    };
    let status = reap(pid, timed_out);
    if !send_failed {
        // Whatever the child wrote before it ended is already in the pipes: drain it, without
        // waiting for writers that outlive it.
        if out_open {
            let _ = pump(&mut out, kind::STDOUT, &writer, &mut buf);
        }
        if let (true, Some(e)) = (err_open, err.as_mut()) {
            let _ = pump(e, kind::STDERR, &writer, &mut buf);
        }
        finished.store(true, Ordering::SeqCst);
        let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
        let _ = write_frame(&mut *w, kind::EXIT, &status.encode());
        let _ = w.flush();
    } else {
        // The client is gone: nobody will read the result.
        // SAFETY: killing the process group we created.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    }
    let _ = s.shutdown(std::net::Shutdown::Both);
    let _ = input_done.recv();
    Ok(())
}

/// The client connection failed mid-command: said on the console, since nobody else hears it.
fn lost(pid: i32, e: &io::Error) -> bool {
    eprintln!("vmrun-agent: exec pid {pid}: connection lost: {e}; killing the command");
    true
}

fn reap(pid: i32, timed_out: bool) -> ExitStatus {
    let mut st = 0;
    loop {
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid, &mut st, 0) };
        if r == pid {
            break;
        }
        if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return ExitStatus::Exited(-1);
        }
    }
    if timed_out {
        ExitStatus::TimedOut
    } else if libc::WIFEXITED(st) {
        ExitStatus::Exited(libc::WEXITSTATUS(st))
    } else {
        ExitStatus::Signaled(libc::WTERMSIG(st))
    }
}

/// Frames from the client while the command runs: stdin, resize, signals. A client that goes
/// away before the result is sent gets the process group killed.
fn client_input(
    mut s: UnixStream,
    mut stdin: Option<File>,
    pty_master: Option<RawFd>,
    pid: i32,
    finished: Arc<AtomicBool>,
) {
    let mut buf = Vec::new();
    loop {
        let frame = read_frame(&mut s, &mut buf);
        let k = match frame {
            Ok(Some(k)) => k,
            _ => {
                if !finished.load(Ordering::SeqCst) {
                    // SAFETY: killing the process group we created.
                    unsafe { libc::kill(-pid, libc::SIGKILL) };
                }
                return;
            }
        };
        match k {
            kind::DATA => {
                if let Some(f) = stdin.as_mut() {
                    if f.write_all(&buf).is_err() {
                        // The command closed its stdin; further input is dropped.
                        stdin = None;
                    }
                }
            }
            kind::EOF => {
                if pty_master.is_some() {
                    // On a terminal, end of input is the EOF character.
                    if let Some(f) = stdin.as_mut() {
                        let _ = f.write_all(&[4]);
                    }
                } else {
                    stdin = None;
                }
            }
            kind::RESIZE if buf.len() == 4 => {
                if let Some(m) = pty_master {
                    let ws = libc::winsize {
                        ws_row: u16::from_le_bytes([buf[0], buf[1]]),
                        ws_col: u16::from_le_bytes([buf[2], buf[3]]),
                        ws_xpixel: 0,
                        ws_ypixel: 0,
                    };
                    // SAFETY: TIOCSWINSZ with a valid winsize on the master we own; the kernel
                    // then signals SIGWINCH to the terminal's foreground group.
                    unsafe { libc::ioctl(m, libc::TIOCSWINSZ, &ws) };
                }
            }
            kind::SIGNAL if buf.len() == 4 => {
                let sig = i32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
                if (1..=64).contains(&sig) {
                    // SAFETY: signalling the process group we created.
                    unsafe { libc::kill(-pid, sig) };
                }
            }
            _ => {}
        }
    }
}
