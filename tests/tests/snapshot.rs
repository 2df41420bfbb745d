//! T4: memory snapshots of a real guest through the library: a 2-vCPU VM whose agent is ready
//! writes a file and is snapshotted, then runs on; a VM restored from the snapshot has the file
//! (and nothing written after it) and runs commands; three
//! forks of one snapshot each write their own file, and their captures differ by exactly that
//! file; forks do not share random streams and their clocks are the host's; a snapshot taken
//! with another rootfs, and a truncated one, are refused with a clear error.

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vmrun::api::vm::{Overlay, Vm, VmError};
use vmrun::control::Then;
use vmrun::launch::snapshot::SnapshotUseError;
use vmrun::snapshot::{SnapshotError, STATE_FILE};
use vmrun_protocol::agent::ExitStatus;
use vmrun_tests::{read_tar, t4_images, t4_rootfs, Budget};

fn boot_budget() -> Duration {
    Budget::new("a VM to boot to its agent", 60, 240).limit()
}

fn run(vm: &Vm, argv: &[&str]) -> String {
    let out = vm
        .exec(argv)
        .unwrap_or_else(|e| panic!("{argv:?}: {e}\n--- console ---\n{}", vm.console_tail(30)));
    assert_eq!(
        out.status,
        ExitStatus::Exited(0),
        "{argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn capture_paths(vm: &Vm) -> BTreeSet<String> {
    let mut tar = Vec::new();
    vm.capture_overlay(&mut tar).unwrap();
    read_tar(&tar).into_keys().collect()
}

#[test]
fn snapshot_restore_fork_and_refusals() {
    let name = "snapshot_restore_fork_and_refusals";
    let (Some((_, _, pvm)), Some(rootfs)) = (t4_images(name), t4_rootfs(name)) else {
        return;
    };
    let kind = vmrun::host::compat::kvm_label(pvm);
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    std::fs::create_dir(&snap).unwrap();

    let t = Instant::now();
    let vm = Vm::builder()
        .rootfs(&rootfs)
        .overlay(Overlay::Tmpfs { size: None })
        .vcpus(2)
        .boot_timeout(boot_budget())
        .start()
        .unwrap();
    let cold = t.elapsed();
    run(&vm, &["sh", "-c", "echo before-snapshot > /work-file"]);
    let t = Instant::now();
    let bytes = vm.snapshot(&snap, Then::Resume).unwrap();
    let took = t.elapsed();
    assert!(bytes > 0);
    // The VM runs on after its snapshot; what it does now is not in the snapshot.
    run(&vm, &["sh", "-c", "echo after > /after-snapshot"]);
    drop(vm);

    // Restore: the file is there, exec works, on both vCPUs.
    let t = Instant::now();
    let r = Vm::builder()
        .from_snapshot(&snap)
        .boot_timeout(boot_budget())
        .start()
        .unwrap_or_else(|e| panic!("restore: {e}"));
    let ready = t.elapsed();
    let t = Instant::now();
    assert_eq!(run(&r, &["cat", "/work-file"]), "before-snapshot\n");
    let first_exec = t.elapsed();
    assert_eq!(run(&r, &["nproc"]), "2\n");
    assert_eq!(
        run(
            &r,
            &[
                "sh",
                "-c",
                "test -e /after-snapshot && echo there || echo absent"
            ]
        ),
        "absent\n"
    );
    drop(r);

    // Three forks at once, each writing its own file; their captures differ by that file.
    let forks: Vec<Vm> = (0..3)
        .map(|_| {
            Vm::builder()
                .from_snapshot(&snap)
                .boot_timeout(boot_budget())
                .start()
                .unwrap()
        })
        .collect();
    let mut uuids = BTreeSet::new();
    let mut captures = Vec::new();
    for (i, f) in forks.iter().enumerate() {
        run(f, &["sh", "-c", &format!("echo {i} > /fork-{i}")]);
        uuids.insert(run(f, &["cat", "/proc/sys/kernel/random/uuid"]));
        let guest: f64 = run(f, &["date", "+%s.%N"]).trim().parse().unwrap();
        let host = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            (host - guest).abs() < 30.0,
            "fork {i}: guest clock {guest}, host {host}"
        );
        captures.push(capture_paths(f));
    }
    assert_eq!(uuids.len(), 3, "forks share a random stream: {uuids:?}");
    let common: BTreeSet<String> = captures[0]
        .intersection(&captures[1])
        .cloned()
        .collect::<BTreeSet<_>>()
        .intersection(&captures[2])
        .cloned()
        .collect();
    for (i, c) in captures.iter().enumerate() {
        let own: Vec<&String> = c.difference(&common).collect();
        assert_eq!(own, vec![&format!("fork-{i}")], "fork {i}'s own files");
    }
    assert!(common.contains("work-file"));
    drop(forks);

    // A snapshot taken with another rootfs: refused, naming it.
    let other = dir.path().join("other.ext4");
    std::fs::copy(&rootfs, &other).unwrap();
    let f = std::fs::OpenOptions::new()
        .append(true)
        .open(&other)
        .unwrap();
    f.set_len(f.metadata().unwrap().len() + 4096).unwrap();
    let e = Vm::builder()
        .from_snapshot(&snap)
        .rootfs(&other)
        .start()
        .err()
        .expect("another rootfs is refused");
    assert!(
        matches!(e, VmError::Snapshot(SnapshotUseError::OtherImage { .. })),
        "{e}"
    );
    assert!(e.to_string().contains("--rootfs"), "{e}");

    // A truncated snapshot: refused before any VM starts.
    let state = snap.join(STATE_FILE);
    let b = std::fs::read(&state).unwrap();
    std::fs::write(&state, &b[..b.len() - 100]).unwrap();
    let e = Vm::builder()
        .from_snapshot(&snap)
        .start()
        .err()
        .expect("a truncated snapshot is refused");
    assert!(
        matches!(
            e,
            VmError::Snapshot(SnapshotUseError::Snapshot(SnapshotError::Truncated { .. }))
        ),
        "{e}"
    );
    eprintln!(
        "T4 snapshot ({kind}): cold boot to agent {:.1}s; snapshot {:.2}s ({} MiB of RAM); restore to agent ready {:.3}s; first exec {:.3}s",
        cold.as_secs_f64(),
        took.as_secs_f64(),
        bytes >> 20,
        ready.as_secs_f64(),
        first_exec.as_secs_f64()
    );
}
