//! `vmrun exec` and `vmrun run`: a fresh VM per invocation through the library's `Vm`, with
//! docker's exit-code conventions (125 launcher error, 126 cannot execute, 127 not found,
//! 128+N killed by signal N).

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use vmrun::api::agent::Event;
use vmrun::api::vm::{Vm, VmError};
use vmrun::api::Overlay;
use vmrun::api::VmBuilder;
use vmrun::launch::overlay::ENV_TOGGLE;
use vmrun::launch::Resolved;
use vmrun_protocol::agent::Exec;

use super::args::VmArgs;
use super::exit::{exit_code, launcher_error, spawn_failure, status_code, EXIT_LAUNCHER};

/// What a launch resolved to, as `--dry-run` prints it.
pub fn print_resolved(r: &Resolved) {
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
}

/// `--dry-run`: what the options resolve to.
pub fn dry_run(b: &VmBuilder) -> ExitCode {
    match b.resolve() {
        Ok(r) => {
            print_resolved(&r);
            ExitCode::SUCCESS
        }
        Err(e) => launcher_error(e),
    }
}

/// The library's builder for these flags.
pub fn builder(args: &VmArgs) -> Result<VmBuilder, ExitCode> {
    let b = args
        .options()
        .map(|o| Vm::builder().options(o))
        .map_err(launcher_error)?;
    match &args.from {
        None => Ok(b),
        Some(name) => find_snapshot(name).map(|dir| b.from_snapshot(dir)),
    }
}

/// A snapshot's directory, by name or path.
pub fn find_snapshot(name: &str) -> Result<PathBuf, ExitCode> {
    vmrun::launch::snapshot::find(name).map_err(launcher_error)
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
    /// Run as this user in the guest, UID[:GID] (GID defaults to UID; default: the image's
    /// user, else root).
    #[arg(long, short = 'u', value_name = "UID[:GID]")]
    user: Option<String>,
    /// The command and its arguments (after `--`); without one, the command of the VM's
    /// image (`--image`) runs.
    #[arg(last = true)]
    command: Vec<String>,
}

impl CmdArgs {
    pub fn exec(&self, stdin: bool) -> Result<Exec, String> {
        let env = self
            .env
            .iter()
            .map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .ok_or_else(|| format!("--env {kv}: use K=V"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (uid, gid) = match &self.user {
            None => (None, None),
            Some(u) => {
                let num = |t: &str| {
                    t.parse::<u32>()
                        .map_err(|_| format!("--user {u}: give UID[:GID] as numbers"))
                };
                let (a, b) = u.split_once(':').unwrap_or((u, u));
                (Some(num(a)?), Some(num(b)?))
            }
        };
        Ok(Exec {
            argv: self.command.clone(),
            env,
            cwd: self.workdir.clone(),
            uid,
            gid,
            timeout_ms: self.timeout.map(|t| t * 1000),
            stdin,
            ..Default::default()
        })
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

/// A command's exit code, or what its failure to start means (127, 126, else 125).
pub fn command_code(vm: &Vm, exec: Exec) -> ExitCode {
    match stream(vm, exec) {
        Ok(c) => exit_code(c),
        Err(e) => match spawn_failure(&e) {
            Some(c) => {
                eprintln!("vmrun: {e}");
                exit_code(c)
            }
            None => launcher_error(e),
        },
    }
}

/// `vmrun exec` and `vmrun run`: a fresh VM for one command.
pub fn run(
    vm_args: &VmArgs,
    cmd: &CmdArgs,
    uploads: &[String],
    capture: Option<&PathBuf>,
) -> ExitCode {
    let stdin = !std::io::stdin().is_terminal();
    let exec = match cmd.exec(stdin) {
        Ok(e) => e,
        Err(e) => return launcher_error(e),
    };
    let mut pairs = Vec::new();
    for u in uploads {
        match u.rsplit_once(':') {
            Some((src, dst)) if !src.is_empty() && dst.starts_with('/') => {
                pairs.push((PathBuf::from(src), dst.to_string()))
            }
            _ => return launcher_error(format!("--upload {u}: use HOST_PATH:/GUEST/PATH")),
        }
    }
    for (src, _) in &pairs {
        if !src.is_file() {
            return launcher_error(format!("--upload {}: no such file", src.display()));
        }
    }
    let mut builder = match builder(vm_args) {
        Ok(b) => b,
        Err(code) => return code,
    };
    if vm_args.dry_run {
        return dry_run(&builder);
    }
    // Uploading or capturing needs somewhere to write: without an explicit choice (flags or
    // GONDOLIN_ROOT_OVERLAY), `run` then uses a tmpfs overlay rather than a read-only root.
    let chosen = builder.options_ref().overlay.is_some() || std::env::var_os(ENV_TOGGLE).is_some();
    if !chosen && (!pairs.is_empty() || capture.is_some()) {
        builder = builder.overlay(Overlay::Tmpfs { size: None });
    }
    let (builder, _owned) = super::signals::own_on_start(builder);
    let (builder, bar) = super::progress::attach(builder, "a VM");
    let started = builder.start();
    super::progress::done(bar);
    let vm = match started {
        Ok(vm) => vm,
        Err(e) => return launcher_error(e),
    };
    for (src, dst) in &pairs {
        if let Err(e) = vm.upload_file(src, dst) {
            return launcher_error(format!("--upload {} → {dst}: {e}", src.display()));
        }
    }
    let code = command_code(&vm, exec);
    if let Some(path) = capture {
        if let Err(e) = vm.capture_overlay_to(path) {
            return launcher_error(format!("--capture {}: {e}", path.display()));
        }
    }
    let _ = vm.shutdown();
    code
}
