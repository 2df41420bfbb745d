//! Starting a plain command with `posix_spawn` (glibc: `clone(CLONE_VM|CLONE_VFORK)`), so the
//! agent's page tables are never copied and neither side takes copy-on-write faults. Where
//! guest ring 0 is emulated a fork of the multi-threaded agent costs hundreds of emulated page
//! faults; this path costs none of them.
//!
//! std's `Command` would use posix_spawn too, but it asks for
//! `posix_spawn_file_actions_addchdir_np` through a dynamic-symbol lookup that finds nothing in
//! a statically linked binary (as the agent is), and then falls back to fork + exec whenever a
//! working directory is set, which every exec here does. So the call is made directly.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// How the command's stdin, stdout and stderr are connected.
pub enum ChildIo<'a> {
    /// Pipes for stdout and stderr, and for stdin when asked (else /dev/null). The command
    /// leads a process group of its own.
    Pipes { with_stdin: bool },
    /// A pseudo-terminal's slave, by path, on all three: the command leads a session of its
    /// own, and opening the terminal makes it the session's controlling terminal.
    Terminal(&'a CStr),
}

/// What a spawned command's parent keeps: its pid and our ends of its pipes (none for a
/// terminal: the caller holds the master).
pub struct Spawned {
    pub pid: i32,
    /// Write end of its stdin (pipes with stdin only).
    pub stdin: Option<File>,
    pub stdout: Option<File>,
    pub stderr: Option<File>,
}

/// Owns a posix_spawn file-actions object and destroys it on every path out.
struct Actions(libc::posix_spawn_file_actions_t);

impl Drop for Actions {
    fn drop(&mut self) {
        // SAFETY: initialised in `spawn` before this guard was made; destroyed once.
        unsafe { libc::posix_spawn_file_actions_destroy(&mut self.0) };
    }
}

/// Owns a posix_spawn attributes object, likewise.
struct Attr(libc::posix_spawnattr_t);

impl Drop for Attr {
    fn drop(&mut self) {
        // SAFETY: initialised in `spawn` before this guard was made; destroyed once.
        unsafe { libc::posix_spawnattr_destroy(&mut self.0) };
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1; 2];
    // SAFETY: pipe2 writes two fds into the array on success; checked.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: two fresh fds that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(r))
    }
}

/// Starts `program` (a path) with `argv` and `env` in `cwd`, with the default signal mask
/// and SIGPIPE at its default (the agent ignores it).
pub fn spawn(
    program: &CStr,
    argv: &[CString],
    env: &[CString],
    cwd: &CStr,
    io: ChildIo,
) -> io::Result<Spawned> {
    let mut fa = MaybeUninit::<libc::posix_spawn_file_actions_t>::uninit();
    // SAFETY: initialises the object in place; checked before use.
    check(unsafe { libc::posix_spawn_file_actions_init(fa.as_mut_ptr()) })?;
    // SAFETY: initialised just above.
    let mut fa = Actions(unsafe { fa.assume_init() });
    let mut ours = Spawned {
        pid: 0,
        stdin: None,
        stdout: None,
        stderr: None,
    };
    // The child's ends, closed here once it has its copies.
    let mut theirs: Vec<OwnedFd> = Vec::new();
    let session = matches!(io, ChildIo::Terminal(_));
    match io {
        ChildIo::Pipes { with_stdin } => {
            // Every pipe end is close-on-exec; the child gets its ends as 0/1/2 through
            // dup2, which clears the flag on the copy.
            let (out_r, out_w) = pipe()?;
            let (err_r, err_w) = pipe()?;
            let stdin_r = if with_stdin {
                let (r, w) = pipe()?;
                ours.stdin = Some(File::from(w));
                r
            } else {
                OwnedFd::from(File::open("/dev/null")?)
            };
            ours.stdout = Some(File::from(out_r));
            ours.stderr = Some(File::from(err_r));
            theirs = vec![stdin_r, out_w, err_w];
            for (fd, to) in theirs.iter().zip(0..) {
                // SAFETY: a valid actions object and an fd that stays open until
                // posix_spawn returns.
                check(unsafe {
                    libc::posix_spawn_file_actions_adddup2(&mut fa.0, fd.as_raw_fd(), to)
                })?;
            }
        }
        ChildIo::Terminal(slave) => {
            // SAFETY: a valid actions object and a NUL-terminated path that outlives the
            // call; then plain dup2 actions.
            unsafe {
                check(libc::posix_spawn_file_actions_addopen(
                    &mut fa.0,
                    0,
                    slave.as_ptr(),
                    libc::O_RDWR,
                    0,
                ))?;
                check(libc::posix_spawn_file_actions_adddup2(&mut fa.0, 0, 1))?;
                check(libc::posix_spawn_file_actions_adddup2(&mut fa.0, 0, 2))?;
            }
        }
    }
    // SAFETY: a valid actions object and a NUL-terminated path that outlives the call.
    check(unsafe { libc::posix_spawn_file_actions_addchdir_np(&mut fa.0, cwd.as_ptr()) })?;

    let mut attr = MaybeUninit::<libc::posix_spawnattr_t>::uninit();
    // SAFETY: initialises the object in place; checked before use.
    check(unsafe { libc::posix_spawnattr_init(attr.as_mut_ptr()) })?;
    // SAFETY: initialised just above.
    let mut attr = Attr(unsafe { attr.assume_init() });
    let mut none = MaybeUninit::<libc::sigset_t>::uninit();
    let mut pipe_sig = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigset initialisers on local storage, then plain setters on a valid attribute
    // object; every result is checked.
    unsafe {
        libc::sigemptyset(none.as_mut_ptr());
        libc::sigemptyset(pipe_sig.as_mut_ptr());
        libc::sigaddset(pipe_sig.as_mut_ptr(), libc::SIGPIPE);
        // A session (glibc makes it before the file actions run, so opening the terminal
        // makes it the controlling one), or a process group.
        let group = if session {
            libc::POSIX_SPAWN_SETSID as libc::c_int
        } else {
            libc::POSIX_SPAWN_SETPGROUP
        };
        let flags = group | libc::POSIX_SPAWN_SETSIGMASK | libc::POSIX_SPAWN_SETSIGDEF;
        check(libc::posix_spawnattr_setflags(
            &mut attr.0,
            flags as libc::c_short,
        ))?;
        check(libc::posix_spawnattr_setpgroup(&mut attr.0, 0))?;
        check(libc::posix_spawnattr_setsigmask(&mut attr.0, none.as_ptr()))?;
        check(libc::posix_spawnattr_setsigdefault(
            &mut attr.0,
            pipe_sig.as_ptr(),
        ))?;
    }

    let mut argv_p: Vec<*mut libc::c_char> = argv.iter().map(|a| a.as_ptr().cast_mut()).collect();
    argv_p.push(std::ptr::null_mut());
    let mut env_p: Vec<*mut libc::c_char> = env.iter().map(|e| e.as_ptr().cast_mut()).collect();
    env_p.push(std::ptr::null_mut());
    let mut pid: libc::pid_t = 0;
    // SAFETY: every pointer is valid for the call: the path, NULL-terminated argv and envp
    // arrays of NUL-terminated strings that outlive it, and initialised actions/attributes.
    // posix_spawn reads them and does not keep them.
    check(unsafe {
        libc::posix_spawn(
            &mut pid,
            program.as_ptr(),
            &fa.0,
            &attr.0,
            argv_p.as_ptr(),
            env_p.as_ptr(),
        )
    })?;
    drop(theirs);
    ours.pid = pid;
    Ok(ours)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn c(s: &str) -> CString {
        CString::new(s).unwrap()
    }

    fn wait(pid: i32) -> i32 {
        let mut st = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut st, 0) }, pid);
        libc::WEXITSTATUS(st)
    }

    #[test]
    fn runs_in_its_directory_and_group_with_pipes_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let script = "read x; echo \"$x $PWD $V\"; echo err >&2; \
                      [ \"$(ps -o pgid= -p $$ | tr -d ' ')\" = \"$$\" ] && exit 7";
        let mut s = spawn(
            &c("/bin/sh"),
            &[c("sh"), c("-c"), c(script)],
            &[c("V=env-ok"), c("PATH=/usr/bin:/bin")],
            &c(dir.path().to_str().unwrap()),
            ChildIo::Pipes { with_stdin: true },
        )
        .unwrap();
        s.stdin.take().unwrap().write_all(b"in-ok\n").unwrap();
        let mut out = String::new();
        s.stdout.unwrap().read_to_string(&mut out).unwrap();
        let mut err = String::new();
        s.stderr.unwrap().read_to_string(&mut err).unwrap();
        let real = std::fs::canonicalize(dir.path()).unwrap();
        assert_eq!(out, format!("in-ok {} env-ok\n", real.display()));
        assert_eq!(err, "err\n");
        // Exit 7 only when the shell leads its own process group.
        assert_eq!(wait(s.pid), 7);
    }

    #[test]
    fn without_stdin_it_reads_eof_and_a_missing_program_is_an_error() {
        let s = spawn(
            &c("/bin/sh"),
            &[c("sh"), c("-c"), c("cat; exit 3")],
            &[],
            &c("/"),
            ChildIo::Pipes { with_stdin: false },
        )
        .unwrap();
        assert!(s.stdin.is_none());
        assert_eq!(wait(s.pid), 3);
        let none = || ChildIo::Pipes { with_stdin: false };
        let e = spawn(&c("/nonexistent/prog"), &[c("prog")], &[], &c("/"), none())
            .err()
            .unwrap();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        let e = spawn(
            &c("/bin/true"),
            &[c("true")],
            &[],
            &c("/nonexistent-dir"),
            none(),
        )
        .err()
        .unwrap();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    }

    #[test]
    fn on_a_terminal_it_leads_a_session_with_the_terminal_as_its_own() {
        let (mut m, mut sl) = (-1, -1);
        // SAFETY: out-pointers to two ints; name, termios and winsize may be null.
        let r = unsafe {
            libc::openpty(
                &mut m,
                &mut sl,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(r, 0);
        // SAFETY: openpty returned two fresh fds that we now own.
        let (master, slave) = unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(sl)) };
        let path = std::fs::read_link(format!("/proc/self/fd/{}", slave.as_raw_fd())).unwrap();
        let path = c(path.to_str().unwrap());
        // Exit 9 only when the shell leads its session and the terminal is its controlling one.
        let script = "[ \"$(ps -o sid= -p $$ | tr -d ' ')\" = \"$$\" ] && tty -s && \
                      [ \"$(ps -o tty= -p $$ | tr -d ' ')\" != '?' ] && exit 9; exit 1";
        let s = spawn(
            &c("/bin/sh"),
            &[c("sh"), c("-c"), c(script)],
            &[c("PATH=/usr/bin:/bin")],
            &c("/"),
            ChildIo::Terminal(&path),
        )
        .unwrap();
        assert!(s.stdin.is_none() && s.stdout.is_none() && s.stderr.is_none());
        drop(slave);
        assert_eq!(wait(s.pid), 9);
        drop(master);
    }
}
