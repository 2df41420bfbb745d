//! T3: the VMM under real KVM with tiny test guests (ring-3 code, native even where guest
//! ring 0 is emulated). Without a usable /dev/kvm each test prints why and is skipped, unless
//! VMRUN_REQUIRE_KVM=1 (CI), where that is a failure.

mod common;
use common::kvm_or_skip;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use vmrun::builder::{StartError, Vmm};
use vmrun::config::{BootProtocol, Payload, VmConfig};
use vmrun::devices::legacy::serial::ConsoleSink;
use vmrun::host::testguest::{self, TestGuest};
use vmrun::vstate::ExitReason;
use vmrun_protocol::status::Status;

const WAIT: Option<Duration> = Some(Duration::from_secs(30));

fn start(g: TestGuest, vcpus: u8) -> Vmm {
    Vmm::start(VmConfig {
        payload: Payload::Program {
            code: g.code,
            mode: g.mode,
        },
        mem_mib: 32,
        vcpus,
        console: ConsoleSink::None,
        disks: vec![],
        vsock: None,
        probes: true,
        hide_pv_hypercalls: false,
        seccomp: None,
        run_as: None,
    })
    .expect("test guest starts")
}

#[test]
fn serial_output_reaches_the_host() {
    if !kvm_or_skip("serial_output_reaches_the_host") {
        return;
    }
    let vmm = start(testguest::hello(), 1);
    assert_eq!(vmm.wait(WAIT), Some(ExitReason::Status(Status::Exited(0))));
    assert_eq!(vmm.console().text(), "hello from a vmrun test guest\n");
}

#[test]
fn pio_and_mmio_exits_reach_their_devices() {
    if !kvm_or_skip("pio_and_mmio_exits_reach_their_devices") {
        return;
    }
    let vmm = start(testguest::mmio(), 1);
    assert_eq!(vmm.wait(WAIT), Some(ExitReason::Status(Status::Exited(0))));
    let mmio: Vec<u32> = vmm.mmio_probe_samples().iter().map(|s| s.1).collect();
    let pio: Vec<u32> = vmm.probe_samples().iter().map(|s| s.1).collect();
    // The guest stored 7 by MMIO, read back the probe's sample count (1) by MMIO and sent that
    // through the PIO probe.
    assert_eq!(mmio, vec![7]);
    assert_eq!(pio, vec![1]);

    // Without probes (as for every Linux guest) the same accesses reach no device: the MMIO
    // read sees all-ones, so the PIO write sends 0xffffffff to an empty port.
    let g = testguest::mmio();
    let vmm = Vmm::start(VmConfig {
        payload: Payload::Program {
            code: g.code,
            mode: g.mode,
        },
        mem_mib: 32,
        vcpus: 1,
        console: ConsoleSink::None,
        disks: vec![],
        vsock: None,
        probes: false,
        hide_pv_hypercalls: false,
        seccomp: None,
        run_as: None,
    })
    .unwrap();
    assert_eq!(vmm.wait(WAIT), Some(ExitReason::Status(Status::Exited(0))));
    assert!(vmm.mmio_probe_samples().is_empty() && vmm.probe_samples().is_empty());
}

fn vmrun_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vmrun"))
}

/// A system call outside the vCPU thread's seccomp allow-list (the test program makes the
/// probe device call `uname`) stops the VMM with 128 + SIGSYS and names the thread and call.
#[test]
fn a_forbidden_system_call_stops_the_vmm_and_says_why() {
    if !kvm_or_skip("a_forbidden_system_call_stops_the_vmm_and_says_why") {
        return;
    }
    let out = vmrun_bin()
        .args(["test-guest", "forbidden-call"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(vmrun::seccomp::EXIT_SECCOMP),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{}vcpu0 made a system call outside its seccomp allow-list (number {})",
            vmrun::seccomp::REPORT,
            libc::SYS_uname
        )),
        "{err}"
    );
    // The same guest's other paths run under the filters: serial, status port, teardown.
    let out = vmrun_bin().args(["test-guest", "hello"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(out.stdout, b"hello from a vmrun test guest\n");
}

#[test]
fn status_port_value_becomes_the_exit_code() {
    if !kvm_or_skip("status_port_value_becomes_the_exit_code") {
        return;
    }
    for code in [0, 3, 42, 255] {
        let out = vmrun_bin()
            .args(["test-guest", &format!("status-{code}")])
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(code),
            "stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn i8042_reset_stops_the_vm() {
    if !kvm_or_skip("i8042_reset_stops_the_vm") {
        return;
    }
    let vmm = start(testguest::reset(), 1);
    assert_eq!(vmm.wait(WAIT), Some(ExitReason::Reset));
    let out = vmrun_bin().args(["test-guest", "reset"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
}

fn all_vcpus_start(n: u8) {
    let vmm = start(testguest::cpus(), n);
    let deadline = Instant::now() + Duration::from_secs(30);
    let want: BTreeSet<char> = (0..n).map(|i| char::from(b'0' + i)).collect();
    loop {
        let seen: BTreeSet<char> = vmm.console().text().chars().collect();
        if seen == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{n} vCPUs: saw {seen:?}, want {want:?}"
        );
        assert!(
            vmm.wait(Some(Duration::from_millis(20))).is_none(),
            "VM ended early"
        );
    }
}

#[test]
fn two_and_four_vcpus_all_start() {
    if !kvm_or_skip("two_and_four_vcpus_all_start") {
        return;
    }
    all_vcpus_start(2);
    all_vcpus_start(4);
}

#[test]
fn garbage_guest_ends_with_a_clear_error() {
    if !kvm_or_skip("garbage_guest_ends_with_a_clear_error") {
        return;
    }
    let vmm = start(testguest::garbage(), 1);
    let r = vmm.wait(WAIT).expect("garbage guest must end, not hang");
    assert!(
        matches!(
            r,
            ExitReason::TripleFault { .. } | ExitReason::InternalError { .. }
        ),
        "{r:?}"
    );
    let out = vmrun_bin()
        .args(["test-guest", "garbage"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("crashed") || err.contains("could not run guest code"),
        "{err}"
    );
}

#[test]
fn stopping_a_running_vm_joins_its_vcpus() {
    if !kvm_or_skip("stopping_a_running_vm_joins_its_vcpus") {
        return;
    }
    let mut vmm = start(testguest::cpus(), 2);
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    vmm.stop();
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(vmm.wait(Some(Duration::ZERO)), Some(ExitReason::Stopped));
}

fn linux(
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    cmdline: &str,
    mem_mib: u64,
) -> Result<Vmm, StartError> {
    Vmm::start(VmConfig {
        payload: Payload::Linux {
            kernel,
            initrd,
            cmdline: cmdline.into(),
            protocol: BootProtocol::Auto,
        },
        mem_mib,
        vcpus: 1,
        console: ConsoleSink::None,
        disks: vec![],
        vsock: None,
        probes: true,
        hide_pv_hypercalls: false,
        seccomp: None,
        run_as: None,
    })
}

fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let p = std::env::temp_dir().join(format!("vmrun-t3-{}-{name}", std::process::id()));
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn hostile_kernel_and_initrd_inputs_are_clear_errors() {
    if !kvm_or_skip("hostile_kernel_and_initrd_inputs_are_clear_errors") {
        return;
    }
    let missing = PathBuf::from("/nonexistent/vmlinux");
    let e = linux(missing, None, "", 64).err().unwrap().to_string();
    assert!(
        e.contains("/nonexistent/vmlinux") && e.contains("vmrun images build"),
        "{e}"
    );

    let short = temp_file("short", b"\x7fE");
    let e = linux(short.clone(), None, "", 64)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("truncated"), "{e}");

    let truncated_elf = temp_file("trunc-elf", &std::fs::read("/bin/true").unwrap()[..80]);
    let e = linux(truncated_elf.clone(), None, "", 64)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not a loadable vmlinux"), "{e}");

    let garbage = temp_file("garbage", &[0x5a; 8192]);
    let e = linux(garbage.clone(), None, "", 64)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("neither an ELF vmlinux nor a bzImage"), "{e}");

    // A minimal loadable ELF: one PT_LOAD segment at 16 MiB.
    let kernel = temp_file("mini-elf", &mini_elf());
    let big_initrd = temp_file("big-initrd", &[]);
    std::fs::File::options()
        .write(true)
        .open(&big_initrd)
        .unwrap()
        .set_len(200 << 20)
        .unwrap();
    let e = linux(kernel.clone(), Some(big_initrd.clone()), "", 64)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("does not fit in guest memory") && e.contains("more memory"),
        "{e}"
    );

    let e = linux(kernel.clone(), None, &"x".repeat(3000), 64)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("command line") && e.contains("2047"), "{e}");

    let e = linux(kernel.clone(), None, "", 8)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("too small"), "{e}");

    for p in [short, truncated_elf, garbage, kernel, big_initrd] {
        std::fs::remove_file(p).unwrap();
    }
}

/// A loadable ELF whose code parks the vCPU.
fn mini_elf() -> Vec<u8> {
    vmrun::host::testguest::images::elf(&[0xeb, 0xfe], false)
}

/// Boots `image` as a kernel and returns how it ended, what it printed and (EBX, ESI) at entry.
fn boot_image(
    image: &[u8],
    tag: &str,
    protocol: BootProtocol,
) -> (Option<ExitReason>, String, (u32, u32)) {
    let path = temp_file(tag, image);
    let vmm = Vmm::start(VmConfig {
        payload: Payload::Linux {
            kernel: path.clone(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
            protocol,
        },
        mem_mib: 64,
        vcpus: 1,
        console: ConsoleSink::None,
        disks: vec![],
        vsock: None,
        probes: true,
        hide_pv_hypercalls: false,
        seccomp: None,
        run_as: None,
    })
    .unwrap();
    let r = vmm.wait(WAIT);
    let text = vmm.console().text();
    let p: Vec<u32> = vmm.probe_samples().iter().map(|s| s.1).collect();
    std::fs::remove_file(path).unwrap();
    (
        r,
        text,
        (
            p.first().copied().unwrap_or(u32::MAX),
            p.get(1).copied().unwrap_or(u32::MAX),
        ),
    )
}

#[test]
fn every_kernel_entry_path_boots() {
    if !kvm_or_skip("every_kernel_entry_path_boots") {
        return;
    }
    use vmrun::host::testguest::images::{bzimage, elf, program};
    let ok = Some(ExitReason::Status(Status::Exited(0)));
    use vmrun::arch::x86_64::layout::{PVH_INFO_START, ZERO_PAGE_START};
    let zp = (0, ZERO_PAGE_START as u32);
    let pvh = (PVH_INFO_START as u32, 0);
    let cases = [
        // bzImage: 64-bit entry at load + 0x200, zero page in RSI.
        (
            "bz",
            bzimage(&program("bz\n", Status::Exited(0))),
            BootProtocol::Auto,
            zp,
        ),
        // ELF without a PVH note: the 64-bit Linux boot protocol at e_entry.
        (
            "elf64",
            elf(&program("elf64\n", Status::Exited(0)), false),
            BootProtocol::Auto,
            zp,
        ),
        // ELF with a PVH note: 32-bit protected mode at the note's entry, start info in EBX.
        (
            "pvh",
            elf(&program("pvh\n", Status::Exited(0)), true),
            BootProtocol::Auto,
            pvh,
        ),
        // The same ELF forced onto the 64-bit protocol.
        (
            "forced",
            elf(&program("forced\n", Status::Exited(0)), true),
            BootProtocol::Linux64,
            zp,
        ),
    ];
    for (tag, image, protocol, regs) in cases {
        let (r, out, got) = boot_image(&image, tag, protocol);
        assert_eq!(
            (r, out, got),
            (ok.clone(), format!("{tag}\n"), regs),
            "{tag}"
        );
    }
    // Asking for PVH from a kernel without the note is a clear error.
    let path = temp_file("nopvh", &elf(&program("x", Status::Exited(0)), false));
    let e = linux(path.clone(), None, "", 64).map(|_| ()).and_then(|_| {
        Vmm::start(VmConfig {
            payload: Payload::Linux {
                kernel: path.clone(),
                initrd: None,
                cmdline: String::new(),
                protocol: BootProtocol::Pvh,
            },
            mem_mib: 64,
            vcpus: 1,
            console: ConsoleSink::None,
            disks: vec![],
            vsock: None,
            probes: true,
            hide_pv_hypercalls: false,
            seccomp: None,
            run_as: None,
        })
        .map(|_| ())
    });
    assert!(e.unwrap_err().to_string().contains("no PVH entry note"));
    std::fs::remove_file(path).unwrap();
}

/// An instruction the host's emulator lacks, met in guest ring 0: where ring 0 is emulated the
/// VM stops with a message that names the instruction and the fix; where it runs at speed the
/// instruction just runs.
#[test]
fn an_instruction_the_emulator_lacks_is_named() {
    if !kvm_or_skip("an_instruction_the_emulator_lacks_is_named") {
        return;
    }
    let out = vmrun_bin()
        .args(["test-guest", "ring0-fwait"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if vmrun::host::compat::ring0_emulated().unwrap() {
        assert_eq!(out.status.code(), Some(125), "{err}");
        assert!(err.contains("cannot run `fwait` (9b"), "{err}");
        assert!(err.contains("PVM kernel variant"), "{err}");
    } else {
        assert_eq!(out.status.code(), Some(0), "{err}");
    }
}

/// KVM's counters for a VM are readable from outside its VMM (what `vmrun profile` does):
/// the VM's and each vCPU's stats files, with the exit counters KVM keeps for every VM.
#[test]
fn kvm_counters_are_read_from_outside_the_vmm() {
    if !kvm_or_skip("kvm_counters_are_read_from_outside_the_vmm") {
        return;
    }
    let mut child = vmrun_bin()
        .args(["test-guest", "park"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let stats = loop {
        match vmrun::host::kvmstats::KvmStats::attach(child.id()) {
            Ok(s) if s.vcpus() == 1 => break s,
            // The VMM has not opened its stats files yet.
            r if Instant::now() < deadline => {
                drop(r);
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(s) => panic!("{} vCPU stats files, want 1", s.vcpus()),
            Err(e) => panic!("{e}"),
        }
    };
    let a = stats.read().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let b = stats.read().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    for name in ["exits", "halt_exits", "pf_taken", "insn_emulation"] {
        assert!(a.contains_key(name), "no `{name}` among {:?}", a.keys());
        assert!(b[name] >= a[name], "{name} went backwards");
    }
    assert!(
        a.keys().any(|k| k.starts_with("vm.")),
        "no VM-level counters"
    );
}
