//! Starting a plain command with `posix_spawn` (glibc: `clone(CLONE_VM|CLONE_VFORK)`), so the
//! agent's page tables are never copied and neither side takes copy-on-write faults. Where
//! guest ring 0 is emulated a fork of the multi-threaded agent costs hundreds of emulated page
//! faults; this path costs none of them.
//!
//! std's `Command` would use posix_spawn too, but it asks for
//! `posix_spawn_file_actions_addchdir_np` through a dynamic-symbol lookup that finds nothing in
//! a statically linked binary (as the agent is), and then falls back to fork + exec whenever a
//! working directory is set, which every exec here does. So the call is made directly.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// What a spawned command's parent keeps: its pid and our ends of its pipes.
pub struct Spawned {
    pub pid: i32,
    /// Write end of its stdin (when asked for; otherwise its stdin is /dev/null).
    pub stdin: Option<File>,
    pub stdout: File,
    pub stderr: File,
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

/// Starts `program` (a path) with `argv` and `env` in `cwd`, in a process group of its own,
/// with the default signal mask and SIGPIPE at its default (the agent ignores it).
pub fn spawn(
    program: &CString,
    argv: &[CString],
    env: &[CString],
    cwd: &CString,
    with_stdin: bool,
) -> io::Result<Spawned> {
    // Every pipe end is close-on-exec; the child gets its ends as 0/1/2 through dup2, which
    // clears the flag on the copy.
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (stdin_w, stdin_r): (Option<OwnedFd>, OwnedFd) = if with_stdin {
        let (r, w) = pipe()?;
        (Some(w), r)
    } else {
        (None, OwnedFd::from(File::open("/dev/null")?))
    };

    let mut fa = MaybeUninit::<libc::posix_spawn_file_actions_t>::uninit();
    // SAFETY: initialises the object in place; checked before use.
    check(unsafe { libc::posix_spawn_file_actions_init(fa.as_mut_ptr()) })?;
    // SAFETY: initialised just above.
    let mut fa = Actions(unsafe { fa.assume_init() });
    for (fd, to) in [
        (stdin_r.as_raw_fd(), 0),
        (out_w.as_raw_fd(), 1),
        (err_w.as_raw_fd(), 2),
    ] {
        // SAFETY: a valid actions object and fds that stay open until posix_spawn returns.
        check(unsafe { libc::posix_spawn_file_actions_adddup2(&mut fa.0, fd, to) })?;
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
        let flags = libc::POSIX_SPAWN_SETPGROUP
            | libc::POSIX_SPAWN_SETSIGMASK
            | libc::POSIX_SPAWN_SETSIGDEF;
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
    // The child's ends close here (dropped with the guards and the locals).
    drop((out_w, err_w, stdin_r));
    Ok(Spawned {
        pid,
        stdin: stdin_w.map(File::from),
        stdout: File::from(out_r),
        stderr: File::from(err_r),
    })
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
            true,
        )
        .unwrap();
        s.stdin.take().unwrap().write_all(b"in-ok\n").unwrap();
        let mut out = String::new();
        s.stdout.read_to_string(&mut out).unwrap();
        let mut err = String::new();
        s.stderr.read_to_string(&mut err).unwrap();
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
            false,
        )
        .unwrap();
        assert!(s.stdin.is_none());
        assert_eq!(wait(s.pid), 3);
        let e = spawn(&c("/nonexistent/prog"), &[c("prog")], &[], &c("/"), false)
            .err()
            .unwrap();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        let e = spawn(
            &c("/bin/true"),
            &[c("true")],
            &[],
            &c("/nonexistent-dir"),
            false,
        )
        .err()
        .unwrap();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    }
}
