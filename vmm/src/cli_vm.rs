//! `vmrun exec`, `vmrun run` and `vmrun bash`: a fresh VM per invocation through the library's
//! `Vm`, with docker's exit-code conventions (125 launcher error, 126 cannot execute, 127 not
//! found, 128+N killed by signal N).

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use vmrun_protocol::agent::{ErrorKind, Exec, ExitStatus};

use crate::api::agent::{AgentError, Event};
use crate::api::vm::{Overlay, Vm, VmBuilder, VmError};
use crate::builder::EXIT_LAUNCHER;
use crate::compat::Compat;

/// Options every VM-running command shares.
#[derive(clap::Args, Clone, Debug)]
pub struct VmArgs {
    /// Kernel image. Default: VMRUN_KERNEL, else the built image for this host.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs. Default: VMRUN_INITRAMFS, else the built one.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Root filesystem image (read-only /dev/vda). Default: VMRUN_ROOTFS, else the built one.
    #[arg(long)]
    rootfs: Option<PathBuf>,
    /// Overlay root: `tmpfs` or an upper disk image. Without it, GONDOLIN_ROOT_OVERLAY=1 gives
    /// a tmpfs overlay; with neither, the root is read-only.
    #[arg(long)]
    overlay: Option<String>,
    /// Size of a tmpfs upper, e.g. 256M or 50% (implies --overlay tmpfs).
    #[arg(long)]
    overlay_size: Option<String>,
    /// Filesystem of a disk upper (default ext4).
    #[arg(long)]
    overlay_fstype: Option<String>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    memory: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// Extra kernel command-line parameters.
    #[arg(long)]
    cmdline: Option<String>,
    /// Keep the guest console in this file.
    #[arg(long)]
    console_log: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Compat::Auto)]
    compat: Compat,
    /// Print the kernel, disks and kernel command line the VM would get, and exit.
    #[arg(long)]
    dry_run: bool,
}

/// `--dry-run`: what the options resolve to.
fn dry_run(b: &VmBuilder) -> ExitCode {
    match b.resolve(None) {
        Ok((_, r)) => {
            println!("kernel: {}", r.kernel.display());
            println!("initrd: {}", r.initrd.display());
            for (i, d) in r.disks.iter().enumerate() {
                println!(
                    "disk /dev/vd{}: {}{}",
                    (b'a' + i as u8) as char,
                    d.path.display(),
                    if d.read_only { " (read-only)" } else { "" }
                );
            }
            println!("cmdline: {}", r.cmdline);
            ExitCode::SUCCESS
        }
        Err(e) => launcher(e),
    }
}

impl VmArgs {
    fn builder(&self) -> VmBuilder {
        let mut b = Vm::builder()
            .memory_mib(self.memory)
            .vcpus(self.cpus)
            .compat(self.compat);
        if let Some(k) = &self.kernel {
            b = b.kernel(k);
        }
        if let Some(i) = &self.initrd {
            b = b.initrd(i);
        }
        if let Some(r) = &self.rootfs {
            b = b.rootfs(r);
        }
        let overlay = match (self.overlay.as_deref(), &self.overlay_size) {
            (Some(o), size) if o.eq_ignore_ascii_case("tmpfs") => {
                Some(Overlay::Tmpfs { size: size.clone() })
            }
            (Some(path), _) => Some(Overlay::Disk {
                path: path.into(),
                fstype: self.overlay_fstype.clone().unwrap_or_else(|| "ext4".into()),
            }),
            (None, Some(size)) => Some(Overlay::Tmpfs {
                size: Some(size.clone()),
            }),
            (None, None) => None,
        };
        if let Some(o) = overlay {
            b = b.overlay(o);
        }
        if let Some(c) = &self.cmdline {
            b = b.cmdline(c.clone());
        }
        if let Some(l) = &self.console_log {
            b = b.console_log(l);
        }
        b
    }
}

/// How to run the command.
#[derive(clap::Args, Clone, Debug)]
pub struct CmdArgs {
    /// Environment variable for the command (repeatable).
    #[arg(long = "env", short = 'e', value_name = "K=V")]
    env: Vec<String>,
    /// Working directory in the guest.
    #[arg(long, short = 'w')]
    workdir: Option<String>,
    /// Kill the command's process group after this many seconds.
    #[arg(long)]
    timeout: Option<u64>,
    /// The command and its arguments (after `--`).
    #[arg(required = true, last = true)]
    command: Vec<String>,
}

impl CmdArgs {
    fn exec(&self, stdin: bool) -> Result<Exec, String> {
        let env = self
            .env
            .iter()
            .map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .ok_or_else(|| format!("--env {kv}: use K=V"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Exec {
            argv: self.command.clone(),
            env,
            cwd: self.workdir.clone(),
            timeout_ms: self.timeout.map(|t| t * 1000),
            stdin,
            ..Default::default()
        })
    }
}

fn code(c: i32) -> ExitCode {
    ExitCode::from(u8::try_from(c).unwrap_or(1))
}

fn launcher(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("vmrun: {e}");
    code(EXIT_LAUNCHER)
}

/// docker's conventions for a command that could not run.
fn spawn_failure(e: &VmError) -> Option<i32> {
    match e {
        VmError::Agent(AgentError::Remote(r)) if r.kind == ErrorKind::Spawn => {
            Some(if r.errno == libc::ENOENT { 127 } else { 126 })
        }
        _ => None,
    }
}

fn status_code(s: ExitStatus) -> i32 {
    match s {
        ExitStatus::Exited(c) => c,
        ExitStatus::Signaled(sig) => 128 + sig,
        // SIGKILL after the timeout, as `timeout --signal=KILL` reports it.
        ExitStatus::TimedOut => 137,
    }
}

/// Streams a command: our stdin (when it is not a terminal) to it, its stdout and stderr to
/// ours, kept apart. Returns its exit code.
fn stream(vm: &Vm, exec: Exec) -> Result<i32, VmError> {
    let with_stdin = exec.stdin;
    let mut p = vm.spawn(exec)?;
    if with_stdin {
        let input = p.input();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            let mut stdin = std::io::stdin().lock();
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if input.write_stdin(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = input.close_stdin();
        });
    }
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    while let Some(ev) = p.next_event()? {
        match ev {
            Event::Stdout(b) => {
                let _ = out.write_all(&b);
                let _ = out.flush();
            }
            Event::Stderr(b) => {
                let _ = err.write_all(&b);
                let _ = err.flush();
            }
            Event::Exit(s) => return Ok(status_code(s)),
        }
    }
    Ok(EXIT_LAUNCHER)
}

/// `vmrun exec` and `vmrun run`.
pub fn run(
    vm_args: &VmArgs,
    cmd: &CmdArgs,
    uploads: &[String],
    capture: Option<&PathBuf>,
) -> ExitCode {
    let stdin = !std::io::stdin().is_terminal();
    let exec = match cmd.exec(stdin) {
        Ok(e) => e,
        Err(e) => return launcher(e),
    };
    let mut pairs = Vec::new();
    for u in uploads {
        match u.rsplit_once(':') {
            Some((src, dst)) if !src.is_empty() && dst.starts_with('/') => {
                pairs.push((PathBuf::from(src), dst.to_string()))
            }
            _ => return launcher(format!("--upload {u}: use HOST_PATH:/GUEST/PATH")),
        }
    }
    for (src, _) in &pairs {
        if !src.is_file() {
            return launcher(format!("--upload {}: no such file", src.display()));
        }
    }
    let mut builder = vm_args.builder();
    if vm_args.dry_run {
        return dry_run(&builder);
    }
    // Uploading or capturing needs somewhere to write: without an explicit choice (flags or
    // GONDOLIN_ROOT_OVERLAY), `run` then uses a tmpfs overlay rather than a read-only root.
    let chosen = vm_args.overlay.is_some()
        || vm_args.overlay_size.is_some()
        || std::env::var_os(crate::overlay::ENV_TOGGLE).is_some();
    if !chosen && (!pairs.is_empty() || capture.is_some()) {
        builder = builder.overlay(Overlay::Tmpfs { size: None });
    }
    let vm = match builder.start() {
        Ok(vm) => vm,
        Err(e) => return launcher(e),
    };
    for (src, dst) in &pairs {
        if let Err(e) = vm.upload_file(src, dst) {
            return launcher(format!("--upload {} → {dst}: {e}", src.display()));
        }
    }
    let result = match stream(&vm, exec) {
        Ok(c) => c,
        Err(e) => match spawn_failure(&e) {
            Some(c) => {
                eprintln!("vmrun: {e}");
                c
            }
            None => return launcher(e),
        },
    };
    if let Some(path) = capture {
        if let Err(e) = vm.capture_overlay_to(path) {
            return launcher(format!("--capture {}: {e}", path.display()));
        }
    }
    let _ = vm.shutdown();
    code(result)
}

static WINCH: AtomicBool = AtomicBool::new(false);

extern "C" fn on_winch(_: libc::c_int) {
    WINCH.store(true, Ordering::SeqCst);
}

/// The terminal as it was before raw mode, for the termination handler to put back at once.
static SAVED_TERMIOS: std::sync::OnceLock<libc::termios> = std::sync::OnceLock::new();
/// SIGTERM, SIGHUP or SIGQUIT received: the shell is hung up and the VM shut down in order.
static TERM_SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn on_term(sig: libc::c_int) {
    TERM_SIGNAL.store(sig, Ordering::SeqCst);
    if let Some(t) = SAVED_TERMIOS.get() {
        // SAFETY: tcsetattr is async-signal-safe; `t` was fully written before the handler
        // was installed.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, t) };
    }
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

/// `vmrun bash`: an interactive shell on a PTY in a fresh VM.
pub fn bash(vm_args: &VmArgs) -> ExitCode {
    if vm_args.dry_run {
        return dry_run(&vm_args.builder());
    }
    if !std::io::stdin().is_terminal() {
        return launcher("vmrun bash needs a terminal; use `vmrun exec -- bash -c '…'` otherwise");
    }
    eprintln!("vmrun: starting a VM…");
    let vm = match vm_args.builder().start() {
        Ok(vm) => vm,
        Err(e) => return launcher(e),
    };
    let (rows, cols) = window_size();
    let term = std::env::var("TERM").unwrap_or_else(|_| "xterm-256color".into());
    let exec = Exec {
        argv: vec!["/bin/bash".into(), "-l".into()],
        env: vec![("TERM".into(), term)],
        pty: Some((rows, cols)),
        stdin: true,
        cwd: Some("/root".into()),
        ..Default::default()
    };
    let mut p = match vm.spawn(exec) {
        Ok(p) => p,
        Err(e) => return launcher(e),
    };
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe { libc::signal(libc::SIGWINCH, on_winch as *const () as libc::sighandler_t) };
    let raw = RawTerminal::enter();
    for sig in [libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
        // SAFETY: the handler only stores to an atomic and calls tcsetattr.
        unsafe { libc::signal(sig, on_term as *const () as libc::sighandler_t) };
    }
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
                return launcher(e);
            }
        }
    }
    drop(raw);
    let _ = vm.shutdown();
    std::thread::sleep(Duration::from_millis(10));
    match TERM_SIGNAL.load(Ordering::SeqCst) {
        0 => code(status),
        sig => code(128 + sig),
    }
}
