//! T3: snapshots of a running test guest under real KVM: the VM pauses, is saved, resumes,
//! and VMs restored from the file carry on from the saved point (memory, registers, RIP),
//! independently of each other. Without a usable /dev/kvm each test prints why and is
//! skipped, unless VMRUN_REQUIRE_KVM=1 (CI), where that is a failure.

mod common;
use common::kvm_or_skip;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use vmrun::builder::{StartError, Vmm};
use vmrun::config::{Payload, VmConfig};
use vmrun::devices::legacy::serial::ConsoleSink;
use vmrun::host::testguest::{self, TestGuest};
use vmrun::snapshot::{Snapshot, SnapshotInfo, MEMORY_FILE, STATE_FILE};

const MEM_MIB: u64 = 32;

fn config(g: &TestGuest) -> VmConfig {
    VmConfig {
        payload: Payload::Program {
            code: g.code.clone(),
            mode: g.mode,
        },
        mem_mib: MEM_MIB,
        vcpus: 1,
        console: ConsoleSink::None,
        disks: vec![],
        vsock: None,
        probes: true,
        hide_pv_hypercalls: false,
        seccomp: None,
        run_as: None,
    }
}

fn samples(vmm: &Vmm) -> Vec<u32> {
    vmm.probe_samples().iter().map(|s| s.1).collect()
}

/// Waits until the VM has sent at least `n` samples (more than it had before).
fn wait_samples(vmm: &Vmm, n: usize) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = samples(vmm);
        if s.len() >= n {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "the guest sent {} samples in 30 s, wanted {n}; reason: {:?}",
            s.len(),
            vmm.wait(Some(Duration::ZERO))
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn info() -> SnapshotInfo {
    SnapshotInfo {
        vmrun_version: env!("CARGO_PKG_VERSION").into(),
        vcpus: 0,
        mem_mib: 0,
        images: vec![],
        launch: vec![],
    }
}

#[test]
fn a_restored_vm_carries_on_where_the_snapshot_was_taken() {
    if !kvm_or_skip("a_restored_vm_carries_on_where_the_snapshot_was_taken") {
        return;
    }
    let g = testguest::counter(1 << 16);
    let mut vmm = Vmm::start(config(&g)).expect("test guest starts");
    wait_samples(&vmm, 20);
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let bytes = vmm.snapshot(dir.path(), &info()).expect("snapshot");
    let took = t.elapsed();
    // Paused: nothing more arrives, and the count so far is where every copy resumes.
    let at_pause = samples(&vmm);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(samples(&vmm), at_pause, "a paused VM sent samples");
    let last = *at_pause.last().unwrap();
    assert_eq!(
        at_pause,
        (1..=last).collect::<Vec<u32>>(),
        "counts before the pause"
    );

    let mem = std::fs::metadata(dir.path().join(MEMORY_FILE)).unwrap();
    assert_eq!(mem.len(), MEM_MIB << 20);
    assert_eq!(bytes, MEM_MIB << 20);
    // Sparse: the guest touched its program, page tables and counter, not 32 MiB.
    assert!(
        mem.blocks() * 512 < 4 << 20,
        "{} bytes on disk",
        mem.blocks() * 512
    );
    let state = std::fs::metadata(dir.path().join(STATE_FILE))
        .unwrap()
        .len();

    // The original runs on from its own count.
    vmm.resume().unwrap();
    let after = wait_samples(&vmm, at_pause.len() + 3);
    assert_eq!(after[at_pause.len()], last + 1);

    // Two VMs from the one snapshot, side by side: each starts at last + 1 and counts alone.
    let snap = Snapshot::load(dir.path()).expect("snapshot loads");
    let t = Instant::now();
    let a = Vmm::restore(config(&g), &snap).expect("first restore");
    let restore_time = t.elapsed();
    let b = Vmm::restore(config(&g), &snap).expect("second restore");
    let sa = wait_samples(&a, 5);
    let sb = wait_samples(&b, 5);
    assert_eq!(
        &sa[..5],
        &[last + 1, last + 2, last + 3, last + 4, last + 5]
    );
    assert_eq!(
        &sb[..5],
        &[last + 1, last + 2, last + 3, last + 4, last + 5]
    );
    assert_eq!(a.wait(Some(Duration::ZERO)), None, "the restored VM ended");
    eprintln!(
        "T3 snapshot ({}): taken in {took:?} ({state} bytes of state, {} KiB of memory on disk); restore {restore_time:?}",
        vmrun::host::compat::kvm_kind(),
        mem.blocks() / 2
    );
}

#[test]
fn damaged_or_mismatched_snapshots_are_refused() {
    if !kvm_or_skip("damaged_or_mismatched_snapshots_are_refused") {
        return;
    }
    let g = testguest::counter(1 << 16);
    let mut vmm = Vmm::start(config(&g)).expect("test guest starts");
    wait_samples(&vmm, 3);
    let dir = tempfile::tempdir().unwrap();
    vmm.snapshot(dir.path(), &info()).expect("snapshot");
    drop(vmm);
    let snap = Snapshot::load(dir.path()).unwrap();

    let err = |r: Result<Vmm, StartError>| r.err().expect("refused").to_string();
    let mut bigger = config(&g);
    bigger.mem_mib = 64;
    assert!(err(Vmm::restore(bigger, &snap)).contains("32 MiB"));
    let mut two = config(&g);
    two.vcpus = 2;
    assert!(err(Vmm::restore(two, &snap)).contains("1 vCPUs"));

    // A memory file cut short is refused before any VM runs.
    let mem = dir.path().join(MEMORY_FILE);
    let f = std::fs::OpenOptions::new().write(true).open(&mem).unwrap();
    f.set_len((MEM_MIB << 20) - 4096).unwrap();
    let e = err(Vmm::restore(config(&g), &snap));
    assert!(e.contains("truncated"), "{e}");

    // A state file cut short cannot even be loaded.
    let state = dir.path().join(STATE_FILE);
    let bytes = std::fs::read(&state).unwrap();
    std::fs::write(&state, &bytes[..bytes.len() / 2]).unwrap();
    let e = Snapshot::load(dir.path()).err().unwrap().to_string();
    assert!(e.contains("truncated"), "{e}");
}
