//! VMs started once and used many times, Docker-style: `vmrun start` boots one in the
//! background and names it; `exec NAME`, `bash NAME`, `cp`, `capture` use it; `ls` lists every
//! VM of the runtime directory; `stop` ends them and removes what they left.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use vmrun::api::vm::{Vm, VmError};
use vmrun::runtime;

use super::args::VmArgs;
use super::exit::{exit_code, launcher_error};
use super::vm::{command_code, CmdArgs};
use super::{progress, signals, vm};

/// `vmrun start`: boots `count` VMs (or restores them from `--from SNAPSHOT`) in the
/// background and prints each name once its agent answers. With a name and a count above one
/// they are NAME-1 … NAME-N. A failure stops there: VMs already started keep running (their
/// names were printed).
pub fn start(name: Option<&str>, count: usize, args: &VmArgs) -> ExitCode {
    let builder = match vm::builder(args) {
        Ok(b) => b,
        Err(code) => return code,
    };
    if args.dry_run {
        return vm::dry_run(&builder);
    }
    if count == 0 {
        return launcher_error("--count 0: start at least one VM");
    }
    for i in 1..=count {
        let this = match (name, count) {
            (Some(n), 1) => Some(n.to_string()),
            (Some(n), _) => Some(format!("{n}-{i}")),
            (None, _) => None,
        };
        let b = match &this {
            Some(n) => builder.clone().name(n),
            None => builder.clone(),
        };
        let (b, guard) = signals::own_on_start(b);
        let (b, bar) = progress::attach(b, this.as_deref().unwrap_or("a VM"));
        let started = b.start();
        progress::done(bar);
        let vm = match started {
            Ok(vm) => vm,
            Err(e) => return launcher_error(e),
        };
        let name = match vm.detach() {
            Ok(n) => n,
            Err(e) => return launcher_error(e),
        };
        // Detached: a signal from now on leaves it running.
        drop(guard);
        println!("{name}");
    }
    ExitCode::SUCCESS
}

/// A running VM by name, or the error that says why not.
pub fn attach(name: &str) -> Result<Vm, ExitCode> {
    Vm::attach(name).map_err(launcher_error)
}

fn age(created: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let s = now.saturating_sub(created);
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// `vmrun exec NAME -- …`: a command in a running VM.
pub fn exec_in(name: &str, vm_args: &VmArgs, cmd: &CmdArgs) -> ExitCode {
    if let Err(code) = no_vm_options(name, vm_args) {
        return code;
    }
    let exec = match cmd.exec(!std::io::stdin().is_terminal()) {
        Ok(e) => e,
        Err(e) => return launcher_error(e),
    };
    match attach(name) {
        Ok(vm) => command_code(&vm, exec),
        Err(code) => code,
    }
}

/// `vmrun ls`.
pub fn ls() -> ExitCode {
    runtime::sweep();
    println!(
        "{:<24} {:<8} {:>8} {:>5} {:>7} {:>4}  {:<9} OVERLAY",
        "NAME", "STATE", "PID", "AGE", "MEMORY", "CPUS", "KIND"
    );
    for (paths, rec, alive) in runtime::list() {
        let r = rec.unwrap_or_default();
        println!(
            "{:<24} {:<8} {:>8} {:>5} {:>6}M {:>4}  {:<9} {}",
            paths.name,
            if alive { "running" } else { "dead" },
            if r.pid > 0 {
                r.pid.to_string()
            } else {
                "-".into()
            },
            age(r.created),
            r.memory_mib,
            r.vcpus,
            if r.named { "named" } else { "one-shot" },
            r.overlay
        );
    }
    ExitCode::SUCCESS
}

/// `vmrun stop`: a clean shutdown through the agent, the VMM killed after `grace`, and the
/// VM's files removed. A dead VM's leftovers are removed too.
pub fn stop(names: &[String], all: bool, grace: Duration) -> ExitCode {
    let names: Vec<String> = if all {
        runtime::list()
            .into_iter()
            .map(|(p, _, _)| p.name)
            .collect()
    } else {
        names.to_vec()
    };
    if names.is_empty() && !all {
        return launcher_error("name the VMs to stop, or use --all");
    }
    let mut failed = false;
    for name in &names {
        match runtime::find(name) {
            Err(e) => {
                eprintln!("vmrun: {e}");
                failed = true;
            }
            Ok(paths) if !paths.alive() => {
                paths.remove();
                eprintln!("vmrun: {name} was not running; removed what it left");
            }
            Ok(_) => match Vm::attach(name).map(|vm| vm.stop(grace)) {
                Ok(Ok(())) => println!("{name}"),
                Ok(Err(e)) | Err(e) => {
                    eprintln!("vmrun: stop {name}: {e}");
                    failed = true;
                }
            },
        }
    }
    if failed {
        exit_code(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// `vmrun capture NAME OUT.tar`.
pub fn capture(name: &str, out: &Path) -> ExitCode {
    let vm = match attach(name) {
        Ok(v) => v,
        Err(code) => return code,
    };
    match vm.capture_overlay_to(out) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => launcher_error(format!("capture {name} → {}: {e}", out.display())),
    }
}

/// `vmrun diff NAME|TAR`: what a running VM's upper layer, or a capture tar, changed against
/// the stack below it (for a tar: `--rootfs` or the default image, and the `--layer`s).
pub fn diff(target: &str, rootfs: Option<&Path>, layers: &[PathBuf], json: bool) -> ExitCode {
    use std::io::{BufReader, Seek};
    use vmrun::launch::{diff, images, layers as layer};
    let tar = Path::new(target);
    let (upper, stack) = if tar.is_file() {
        let root = rootfs.map_or_else(images::default_rootfs, Path::to_path_buf);
        if !root.is_file() {
            return launcher_error(format!(
                "rootfs {}: not found; give the image the capture was taken over with --rootfs PATH",
                root.display()
            ));
        }
        let mut stack = vec![root];
        match layer::images_for(layers) {
            Ok(l) => stack.extend(l),
            Err(e) => return launcher_error(e),
        }
        match std::fs::File::open(tar) {
            Ok(f) => (f, stack),
            Err(e) => return launcher_error(format!("diff {target}: {e}")),
        }
    } else {
        if rootfs.is_some() || !layers.is_empty() {
            return launcher_error(format!(
                "diff {target}: --rootfs and --layer describe what a capture tar was taken over; a running VM's stack is its own (or no file {target} exists)"
            ));
        }
        let vm = match attach(target) {
            Ok(v) => v,
            Err(code) => return code,
        };
        let stack = runtime::find(target)
            .ok()
            .and_then(|p| p.record())
            .map(|r| r.lower)
            .unwrap_or_default();
        if stack.is_empty() {
            return launcher_error(format!(
                "diff {target}: the VM has no overlay (or was started by an older vmrun), so nothing it wrote is kept apart"
            ));
        }
        // An unnamed file: nothing is left behind whatever happens.
        let mut f = match tempfile::tempfile() {
            Ok(f) => f,
            Err(e) => return launcher_error(format!("diff {target}: a temporary file: {e}")),
        };
        if let Err(e) = vm.capture_overlay(&mut f) {
            return launcher_error(format!("diff {target}: capture: {e}"));
        }
        if let Err(e) = f.rewind() {
            return launcher_error(format!("diff {target}: {e}"));
        }
        (f, stack)
    };
    match diff::with_lower(&stack, |lower| diff::changes(BufReader::new(upper), lower)) {
        Ok(Ok(c)) => {
            print!("{}", diff::render(&c, json));
            ExitCode::SUCCESS
        }
        Ok(Err(e)) | Err(e) => launcher_error(format!("diff {target}: {e}")),
    }
}

/// One side of `vmrun cp`: a host path, or `NAME:/guest/path`.
enum Side {
    Host(PathBuf),
    Guest(String, String),
}

fn side(s: &str) -> Side {
    match s.split_once(':') {
        Some((name, path)) if runtime::valid_name(name) && path.starts_with('/') => {
            Side::Guest(name.into(), path.into())
        }
        _ => Side::Host(PathBuf::from(s)),
    }
}

/// `vmrun cp SRC DST`: files and directories, either way, as `docker cp` does.
pub fn cp(src: &str, dst: &str) -> ExitCode {
    let run = |vm: &str, f: &dyn Fn(&Vm) -> Result<u64, VmError>| match attach(vm) {
        Ok(v) => match f(&v) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => launcher_error(format!("cp {src} {dst}: {e}")),
        },
        Err(code) => code,
    };
    match (side(src), side(dst)) {
        (Side::Host(h), Side::Guest(name, g)) => run(&name, &|vm| vm.copy_in(&h, &g)),
        (Side::Guest(name, g), Side::Host(h)) => run(&name, &|vm| vm.copy_out(&g, &h)),
        (Side::Host(_), Side::Host(_)) => launcher_error(
            "cp: one side must be in a VM, as NAME:/path (e.g. `vmrun cp ./src box:/work`)",
        ),
        (Side::Guest(..), Side::Guest(..)) => {
            launcher_error("cp: copy between two VMs through the host, one side at a time")
        }
    }
}

/// Refuses VM options given along with a running VM's name.
pub fn no_vm_options(name: &str, args: &VmArgs) -> Result<(), ExitCode> {
    if args.is_default() {
        Ok(())
    } else {
        Err(launcher_error(format!(
            "{name} is already running: VM options apply only when a command starts a VM; drop them (or `vmrun stop {name}` and start it again with them)"
        )))
    }
}
