//! The library used exactly as a harness would (T4: real VMs): upload → exec → capture, two VMs
//! at once (one started from a short-lived thread), 20 concurrent execs on one VM, a stopped VM
//! named as such, Drop leaving nothing behind, and a VM whose init fails returning the init's
//! error rather than a timeout.

use std::time::Instant;

use vmrun::api::vm::{Overlay, Vm, VmError};
use vmrun_protocol::agent::ExitStatus;
use vmrun_tests::{read_tar, t4_images, t4_rootfs, Budget};

/// What `start` may take: boot to the agent's first answer.
fn boot_budget() -> std::time::Duration {
    Budget::new("a VM to boot to its agent", 60, 240).limit()
}

/// Processes named `comm`.
fn processes(comm: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == comm))
        .count()
}

/// VMM processes (a jail's supervisor has a name of its own).
fn vmrun_processes() -> usize {
    processes("vmrun")
}

fn supervisors() -> usize {
    processes(&vmrun::jail::SUPERVISOR_NAME.to_string_lossy())
}

fn vmrun_temp_dirs() -> Vec<String> {
    vmrun_tests::host_leftovers()
}

#[test]
fn two_vms_concurrent_execs_capture_and_a_clean_drop() {
    let name = "two_vms_concurrent_execs_capture_and_a_clean_drop";
    let (Some((_, _, pvm)), Some(_)) = (t4_images(name), t4_rootfs(name)) else {
        return;
    };
    let procs_before = vmrun_processes();
    let supervisors_before = supervisors();
    let temps_before = vmrun_temp_dirs();
    let t0 = Instant::now();
    // Booted one after the other (two booting guests on two host cores starve each other where
    // ring 0 is emulated), then both run at once.
    let a = Vm::builder()
        .overlay(Overlay::Tmpfs {
            size: Some("128M".into()),
        })
        .boot_timeout(boot_budget())
        .start()
        .unwrap();
    // Started from a thread that ends at once: the VM must outlive it (it belongs to the
    // process, not to the thread).
    let b = std::thread::spawn(|| {
        Vm::builder()
            .overlay(Overlay::Tmpfs { size: None })
            .boot_timeout(boot_budget())
            .start()
            .unwrap()
    })
    .join()
    .unwrap();
    let booted = t0.elapsed();
    assert_eq!(
        vmrun_processes(),
        procs_before + 2,
        "one VMM process per VM"
    );

    // Upload → exec sees it → capture contains it.
    a.upload_bytes("/work/in.txt", b"from the harness\n", 0o644)
        .unwrap_or_else(|e| panic!("{e}\n--- console of VM a ---\n{}", a.console_tail(40)));
    let out = a.exec(["cat", "/work/in.txt"]).unwrap();
    assert_eq!(
        (out.status, out.stdout.as_slice()),
        (ExitStatus::Exited(0), &b"from the harness\n"[..])
    );
    let mut tar = Vec::new();
    a.capture_overlay(&mut tar).unwrap();
    let found = read_tar(&tar)
        .get("work/in.txt")
        .is_some_and(|e| e.data == b"from the harness\n");
    assert!(found, "the upload is in the capture");
    // The two VMs are separate machines.
    assert!(b.exec(["cat", "/work/in.txt"]).unwrap().status != ExitStatus::Exited(0));

    // Twenty commands at once on one VM.
    let t = Instant::now();
    let outs: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..20)
            .map(|i| {
                let a = &a;
                s.spawn(move || {
                    a.exec(["/bin/sh", "-c", &format!("echo {i}")])
                        .unwrap_or_else(|e| {
                            panic!(
                                "exec {i}: {e}\n--- console of VM a ---\n{}",
                                a.console_tail(40)
                            )
                        })
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, o) in outs.iter().enumerate() {
        assert_eq!(
            (o.status, o.stdout.clone()),
            (ExitStatus::Exited(0), format!("{i}\n").into_bytes())
        );
    }
    eprintln!(
        "T4 library ({}): two VMs booted one after the other in {:.1}s; 20 concurrent execs in {:.1}s",
        vmrun::host::compat::kvm_label(pvm),
        booted.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );

    // Another handle on VM a, taken by name: it works beside the owner's, and dropping it
    // leaves the VM running (only the owner's Drop stops it).
    let attached = Vm::attach(a.name()).unwrap();
    let out = attached.exec(["cat", "/work/in.txt"]).unwrap();
    assert_eq!(out.stdout, b"from the harness\n");
    drop(attached);
    assert!(
        a.is_running(),
        "an attached handle's drop does not stop the VM"
    );
    assert!(a.exec(["true"]).is_ok());
    assert!(matches!(
        Vm::attach("no-such-vm-here"),
        Err(VmError::Runtime(_))
    ));

    // A call on a VM that has stopped says so, rather than a bare connection error.
    b.agent().shutdown().unwrap();
    let off = Budget::new("VM b to stop after its agent's shutdown", 30, 120);
    while b.is_running() {
        off.check(|| b.console_tail(20));
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    match b.exec(["true"]) {
        Err(VmError::Stopped { .. }) => {}
        other => panic!("expected VmError::Stopped, got {other:?}"),
    }

    // Drop kills the VMM and removes every host file it made.
    drop(a);
    drop(b);
    assert_eq!(vmrun_processes(), procs_before, "no VMM process left");
    assert_eq!(supervisors(), supervisors_before, "no jail supervisor left");
    assert_eq!(
        vmrun_temp_dirs(),
        temps_before,
        "no socket, log or temp dir left"
    );
}

#[test]
fn a_failing_init_is_an_error_with_its_reason() {
    let name = "a_failing_init_is_an_error_with_its_reason";
    let (Some(_), Some(_)) = (t4_images(name), t4_rootfs(name)) else {
        return;
    };
    let temps_before = vmrun_temp_dirs();
    let t = Instant::now();
    let e = Vm::builder()
        .cmdline("root.overlay=tmpfs root.overlaysize=12q")
        .boot_timeout(boot_budget())
        .start()
        .err()
        .expect("boot fails");
    match &e {
        VmError::BootFailed {
            init_error: Some(line),
            ..
        } => {
            assert!(
                line.contains("vmrun-init: error: root.overlaysize=12q"),
                "{line}"
            );
        }
        other => panic!("expected the init's error, got: {other}"),
    }
    eprintln!(
        "T4 library: init failure reported after {:.1}s: {e}",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(vmrun_temp_dirs(), temps_before);
}
