//! VMs started once and used many times, Docker-style: `vmrun start` boots one in the
//! background and names it; `exec NAME`, `bash NAME`, `cp`, `capture` use it; `ls` lists every
//! VM of the runtime directory; `stop` ends them and removes what they left.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use vmrun::api::vm::{Vm, VmError};
use vmrun::launch::ExecDefaults;
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

/// What lies below a capture tar or a running VM's upper layer.
pub struct Below<'a> {
    pub rootfs: Option<&'a Path>,
    pub layers: &'a [PathBuf],
    pub image: Option<&'a str>,
}

/// An upper layer as a tar: the user's file, or a temporary one captured from a VM (gone
/// when dropped).
enum Upper {
    Tar(PathBuf),
    Captured(tempfile::NamedTempFile),
}

impl Upper {
    fn path(&self) -> &Path {
        match self {
            Upper::Tar(p) => p,
            Upper::Captured(t) => t.path(),
        }
    }
}

/// The upper layer of `target` (a capture tar, or the running VM of that name), the stack
/// below it (root image first), and the defaults commands had there. `what` names the
/// command in errors.
fn upper_and_stack(
    what: &str,
    target: &str,
    below: &Below,
) -> Result<(Upper, Vec<PathBuf>, Option<ExecDefaults>), ExitCode> {
    use vmrun::launch::{images, layers as layer, store};
    let fail = |e: String| launcher_error(format!("{what} {target}: {e}"));
    let tar = Path::new(target);
    if tar.is_file() {
        let (root, mut wanted, defaults) = match below.image {
            Some(name) => {
                let i = store::load(name).map_err(|e| fail(e.to_string()))?;
                (i.root, i.layers, Some(i.defaults))
            }
            None => (
                below
                    .rootfs
                    .map_or_else(images::default_rootfs, Path::to_path_buf),
                vec![],
                None,
            ),
        };
        if !root.is_file() {
            return Err(fail(format!(
                "rootfs {}: not found; give the image the capture was taken over with --rootfs PATH or --image NAME",
                root.display()
            )));
        }
        wanted.extend(below.layers.iter().cloned());
        let mut stack = vec![root];
        stack.extend(layer::images_for(&wanted).map_err(|e| fail(e.to_string()))?);
        return Ok((Upper::Tar(tar.to_path_buf()), stack, defaults));
    }
    if below.rootfs.is_some() || below.image.is_some() || !below.layers.is_empty() {
        return Err(fail(format!(
            "--rootfs, --image and --layer describe what a capture tar was taken over; a running VM's stack is its own (or no file {target} exists)"
        )));
    }
    let vm = attach(target)?;
    let stack = runtime::find(target)
        .ok()
        .and_then(|p| p.record())
        .map(|r| r.lower)
        .unwrap_or_default();
    if stack.is_empty() {
        return Err(fail(
            "the VM has no overlay (or was started by an older vmrun), so nothing it wrote is kept apart".into(),
        ));
    }
    // Removed when dropped, whatever happens.
    let mut t = tempfile::Builder::new()
        .prefix(".vmrun-capture-")
        .suffix(".tar")
        .tempfile()
        .map_err(|e| fail(format!("a temporary file: {e}")))?;
    vm.capture_overlay(t.as_file_mut())
        .map_err(|e| fail(format!("capture: {e}")))?;
    Ok((Upper::Captured(t), stack, vm.exec_defaults().cloned()))
}

/// `vmrun diff NAME|TAR`: what a running VM's upper layer, or a capture tar, changed against
/// the stack below it (for a tar: `--image`, `--rootfs` or the default image, and the
/// `--layer`s).
pub fn diff(target: &str, below: &Below, json: bool) -> ExitCode {
    use std::io::BufReader;
    use vmrun::launch::diff;
    let (upper, stack, _) = match upper_and_stack("diff", target, below) {
        Ok(u) => u,
        Err(code) => return code,
    };
    let upper = match std::fs::File::open(upper.path()) {
        Ok(f) => f,
        Err(e) => return launcher_error(format!("diff {target}: {e}")),
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

/// `vmrun commit NAME|TAR IMAGE`: the stack below a running VM's upper layer (or below a
/// capture tar) with that upper as its top layer, kept as the named image IMAGE.
pub fn commit(target: &str, image: &str, below: &Below) -> ExitCode {
    use vmrun::launch::store;
    if !store::valid_name(image) {
        return launcher_error(store::StoreError::BadName(image.into()));
    }
    let (upper, stack, defaults) = match upper_and_stack("commit", target, below) {
        Ok(u) => u,
        Err(code) => return code,
    };
    let source = match &upper {
        Upper::Tar(p) => format!("commit {}", p.display()),
        Upper::Captured(_) => format!("commit VM {target}"),
    };
    match store::commit_in(
        &store::images_dir(),
        image,
        source,
        &stack[0],
        &stack[1..],
        Some(upper.path()),
        defaults.unwrap_or_default(),
    ) {
        Ok(i) => {
            println!(
                "{}: {} layers over {}; boot it with --image {}",
                i.name,
                i.layers.len(),
                stack[0].display(),
                i.name
            );
            ExitCode::SUCCESS
        }
        Err(e) => launcher_error(format!("commit {target}: {e}")),
    }
}

/// The named images, after the built ones in `vmrun images ls`.
pub fn images_ls() {
    use vmrun::launch::store;
    let dir = store::images_dir();
    let all = store::list_in(&dir);
    println!();
    if all.is_empty() {
        println!(
            "no named images in {} (`vmrun images import ARCHIVE` makes one)",
            dir.display()
        );
        return;
    }
    println!(
        "{:<24} {:>9} {:>6} {:>6}  SOURCE",
        "NAME", "SIZE", "LAYERS", "AGE"
    );
    for i in all {
        match i {
            Ok(i) => println!(
                "{:<24} {:>8}M {:>6} {:>6}  {}",
                i.name,
                i.size().div_ceil(1 << 20),
                i.layers.len(),
                age(i.created),
                i.source
            ),
            Err((name, e)) => println!("{name:<24} broken: {e}"),
        }
    }
}

/// `vmrun images import`.
pub fn images_import(archive: &Path, name: Option<&str>, reference: Option<&str>) -> ExitCode {
    let t0 = std::time::Instant::now();
    match vmrun::launch::store::import(archive, name, reference) {
        Ok(r) => {
            let i = &r.image;
            let skipped = match r.skipped_devices {
                0 => String::new(),
                n => format!(" ({n} device nodes left out: the guest's /dev is its own)"),
            };
            println!(
                "{}: {} layers, {} MiB, imported in {:.1}s{skipped}; boot it with --image {}",
                i.name,
                r.layers,
                i.size().div_ceil(1 << 20),
                t0.elapsed().as_secs_f64(),
                i.name
            );
            ExitCode::SUCCESS
        }
        Err(e) => launcher_error(format!("images import: {e}")),
    }
}

/// `vmrun images rm`.
pub fn images_rm(names: &[String]) -> ExitCode {
    let dir = vmrun::launch::store::images_dir();
    let mut code = ExitCode::SUCCESS;
    for n in names {
        if let Err(e) = vmrun::launch::store::remove_in(&dir, n) {
            code = launcher_error(e);
        }
    }
    code
}
