//! `vmrun bash [NAME]`: an interactive shell on a PTY, in a fresh VM or in a running one
//! (several at once). The terminal goes raw for the session and is restored on every way out,
//! a kill from outside included; window resizes and Ctrl-C reach the guest.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use vmrun::api::agent::Event;
use vmrun_protocol::agent::Exec;

use vmrun::api::vm::Vm;

use super::args::VmArgs;
use super::exit::{exit_code, launcher_error, status_code, EXIT_LAUNCHER};
use super::signals::{self, Reaction};
use super::vm::{builder, dry_run};
use super::{named, progress};

static WINCH: AtomicBool = AtomicBool::new(false);

extern "C" fn on_winch(_: libc::c_int) {
    WINCH.store(true, Ordering::SeqCst);
}

/// The terminal as it was before raw mode, for the signal thread to put back at once.
static SAVED_TERMIOS: std::sync::OnceLock<libc::termios> = std::sync::OnceLock::new();
/// SIGTERM, SIGHUP or SIGQUIT received: the shell is hung up and the VM shut down in order.
static TERM_SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// On a signal: the terminal back at once, then the shell is hung up and the session ends in
/// order (the signal thread tears down what is left after a grace).
fn on_term(sig: libc::c_int) -> Reaction {
    TERM_SIGNAL.store(sig, Ordering::SeqCst);
    if let Some(t) = SAVED_TERMIOS.get() {
        // SAFETY: tcsetattr on fd 0 with attributes saved from it.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, t) };
    }
    Reaction::Wind(Duration::from_secs(10))
}

fn window_size() -> (u16, u16) {
    // SAFETY: TIOCGWINSZ writes one winsize through the valid pointer.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        if libc::ioctl(0, libc::TIOCGWINSZ, &mut ws) == 0 && ws.ws_row > 0 {
            (ws.ws_row, ws.ws_col)
        } else {
            (24, 80)
        }
    }
}

/// Puts the terminal in raw mode and restores it when dropped (every exit path, panics too).
struct RawTerminal(libc::termios);

impl RawTerminal {
    fn enter() -> Option<RawTerminal> {
        // SAFETY: tcgetattr/tcsetattr on fd 0 with termios values we own.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return None;
            }
            let saved = t;
            let _ = SAVED_TERMIOS.set(saved);
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(0, libc::TCSANOW, &t);
            Some(RawTerminal(saved))
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restoring the attributes saved from fd 0.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.0) };
    }
}

/// `vmrun bash [NAME]`: an interactive shell on a PTY, in the running VM `name` or in a fresh
/// one that ends with the shell.
pub fn bash(name: Option<&str>, vm_args: &VmArgs) -> ExitCode {
    if !vm_args.dry_run && !std::io::stdin().is_terminal() {
        return launcher_error(
            "vmrun bash needs a terminal; use `vmrun exec -- bash -c '…'` otherwise",
        );
    }
    if let Some(n) = name {
        if let Err(code) = named::no_vm_options(n, vm_args) {
            return code;
        }
        return match named::attach(n) {
            Ok(vm) => shell(&vm),
            Err(code) => code,
        };
    }
    let builder = match builder(vm_args) {
        Ok(b) => b,
        Err(code) => return code,
    };
    if vm_args.dry_run {
        return dry_run(&builder);
    }
    let (builder, _owned) = signals::own_on_start(builder);
    let (builder, bar) = progress::attach(builder, "a VM");
    let started = builder.start();
    progress::done(bar);
    let vm = match started {
        Ok(vm) => vm,
        Err(e) => return launcher_error(e),
    };
    let code = shell(&vm);
    let _ = vm.shutdown();
    code
}

/// The shell session itself; the exit code is the shell's (128+N when a signal ended us).
fn shell(vm: &Vm) -> ExitCode {
    let (rows, cols) = window_size();
    let term = std::env::var("TERM").unwrap_or_else(|_| "xterm-256color".into());
    // An image may have no bash (BusyBox, Alpine): its POSIX shell then.
    let shell = match vm.agent().stat("/bin/bash") {
        Ok(_) => "/bin/bash",
        Err(_) => "/bin/sh",
    };
    let exec = Exec {
        argv: vec![shell.into(), "-l".into()],
        env: vec![("TERM".into(), term)],
        pty: Some((rows, cols)),
        stdin: true,
        // An image's working directory, else root's home.
        cwd: match vm.exec_defaults().and_then(|d| d.cwd.as_ref()) {
            Some(_) => None,
            None => Some("/root".into()),
        },
        ..Default::default()
    };
    let mut p = match vm.spawn(exec) {
        Ok(p) => p,
        Err(e) => return launcher_error(e),
    };
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe { libc::signal(libc::SIGWINCH, on_winch as *const () as libc::sighandler_t) };
    let raw = RawTerminal::enter();
    signals::set_handler(on_term);
    let input = p.input();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut hung_up: Option<std::time::Instant> = None;
        loop {
            // Killed from outside: hang the shell up like a closed terminal would, and
            // insist if it lingers; the main loop then sees it exit and cleans up.
            if TERM_SIGNAL.load(Ordering::SeqCst) != 0 {
                match hung_up {
                    None => {
                        let _ = input.signal(libc::SIGHUP);
                        hung_up = Some(std::time::Instant::now());
                    }
                    Some(t) if t.elapsed() > Duration::from_secs(2) => {
                        let _ = input.signal(libc::SIGKILL);
                        return;
                    }
                    Some(_) => {}
                }
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            if WINCH.swap(false, Ordering::SeqCst) {
                let (r, c) = window_size();
                let _ = input.resize(r, c);
            }
            let mut pfd = libc::pollfd {
                fd: 0,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(&mut pfd, 1, 100) };
            if ready <= 0 {
                continue;
            }
            // SAFETY: reading into our buffer from fd 0.
            let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                let _ = input.close_stdin();
                return;
            }
            if input.write_stdin(&buf[..n as usize]).is_err() {
                return;
            }
        }
    });
    let mut out = std::io::stdout();
    let mut status = EXIT_LAUNCHER;
    loop {
        match p.next_event() {
            Ok(Some(Event::Stdout(b))) | Ok(Some(Event::Stderr(b))) => {
                let _ = out.write_all(&b);
                let _ = out.flush();
            }
            Ok(Some(Event::Exit(s))) => {
                status = status_code(s);
                break;
            }
            Ok(None) => break,
            Err(e) => {
                drop(raw);
                return launcher_error(e);
            }
        }
    }
    drop(raw);
    match TERM_SIGNAL.load(Ordering::SeqCst) {
        0 => exit_code(status),
        sig => exit_code(128 + sig),
    }
}
