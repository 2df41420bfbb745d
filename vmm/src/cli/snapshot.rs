//! `vmrun snapshot create|ls|rm`: named memory snapshots. `create NAME` boots a VM with the
//! given options, waits for its agent, syncs the guest and snapshots it (the VM then ends);
//! `create --from VM NAME` snapshots a running VM, which runs on. `vmrun start|exec|bash|run
//! --from NAME` restore one.

use std::path::Path;
use std::process::ExitCode;

use vmrun::control::Then;
use vmrun::launch::snapshot;

use super::args::VmArgs;
use super::exit::launcher_error;
use super::{named, progress, signals, vm};

/// Removes a snapshot directory that was made for a snapshot that failed.
fn discard(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}

/// `vmrun snapshot create NAME [--from VM | VM options]`: here `--from` names a running VM.
pub fn create(name: &str, args: &VmArgs) -> ExitCode {
    let from = args.from.as_deref();
    if from.is_some() && !args.without_from().is_default() {
        return launcher_error(
            "--from VM snapshots that running VM as it is; VM options apply only when a new VM is booted for the snapshot",
        );
    }
    let dir = match snapshot::create_dir(name) {
        Ok(d) => d,
        Err(e) => return launcher_error(e),
    };
    let taken = match from {
        Some(vm_name) => match named::attach(vm_name) {
            Ok(vm) => vm.snapshot(&dir, Then::Resume),
            Err(code) => {
                discard(&dir);
                return code;
            }
        },
        None => {
            let builder = match vm::builder(args) {
                Ok(b) => b,
                Err(code) => {
                    discard(&dir);
                    return code;
                }
            };
            let (builder, _owned) = signals::own_on_start(builder);
            let (builder, bar) = progress::attach(builder, "a VM to snapshot");
            let started = builder.start();
            progress::done(bar);
            match started {
                Ok(vm) => vm.snapshot(&dir, Then::Stop),
                Err(e) => Err(e),
            }
        }
    };
    match taken {
        Ok(bytes) => {
            println!(
                "{name}: {} MiB of guest memory in {}; start VMs from it with `vmrun start --from {name}`",
                bytes >> 20,
                dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            discard(&dir);
            launcher_error(e)
        }
    }
}

/// `vmrun snapshot ls`.
pub fn ls() -> ExitCode {
    println!(
        "{:<24} {:>6} {:>5} {:>9}  IMAGES",
        "NAME", "MEMORY", "CPUS", "ON DISK"
    );
    for (name, info, disk) in snapshot::list() {
        match info {
            Ok(i) => println!(
                "{:<24} {:>5}M {:>5} {:>8}M  {}",
                name,
                i.mem_mib,
                i.vcpus,
                disk >> 20,
                i.images
                    .iter()
                    .map(|im| format!("{}={}", im.role, im.path.display()))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            Err(e) => println!("{name:<24} unreadable: {e}"),
        }
    }
    ExitCode::SUCCESS
}

/// `vmrun snapshot rm NAME...`.
pub fn rm(names: &[String]) -> ExitCode {
    let mut code = ExitCode::SUCCESS;
    for n in names {
        match snapshot::remove(n) {
            Ok(p) => println!("removed {n} ({})", p.display()),
            Err(e) => code = launcher_error(e),
        }
    }
    code
}
