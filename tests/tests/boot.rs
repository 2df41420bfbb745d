//! T4: vmrun's own kernel and initramfs booted by vmrun's own VMM to the init's ready line and
//! its status. Where guest ring 0 is emulated (nested PVM) this takes a minute or two and uses
//! the PVM compatibility kernel; elsewhere well under a second.

use std::time::{Duration, Instant};

use vmrun::builder::Vmm;
use vmrun::config::{BootProtocol, Payload, VmConfig};
use vmrun::devices::legacy::serial::ConsoleSink;
use vmrun::outcome::Outcome;
use vmrun::vstate::ExitReason;
use vmrun_protocol::status::Status;
use vmrun_tests::{t4_images, Budget, StageClock};

#[test]
fn real_kernel_boots_to_the_init_ready_line() {
    let Some((kernel, initrd, pvm)) = t4_images("real_kernel_boots_to_the_init_ready_line") else {
        return;
    };
    let budget = Budget::new(
        "the kernel to boot to the init's ready line and power off",
        60,
        300,
    );
    // No disks yet: the init stays in the initramfs (root=none).
    let cmdline = vmrun::launch::cmdline::assemble(&[], Some("root=none"), pvm).unwrap();
    let log_path = std::env::temp_dir().join(format!("t4-boot-console-{}.log", std::process::id()));
    let t0 = Instant::now();
    let vmm = Vmm::start(VmConfig {
        payload: Payload::Linux {
            kernel,
            initrd: Some(initrd),
            cmdline,
            protocol: BootProtocol::Auto,
        },
        mem_mib: 256,
        vcpus: 1,
        console: ConsoleSink::File(std::fs::File::create(&log_path).unwrap()),
        disks: vec![],
        vsock: None,
        probes: false,
        hide_pv_hypercalls: pvm,
        seccomp: None,
        run_as: None,
    })
    .expect("VM starts");
    let started = t0.elapsed();
    let mut clock = StageClock::new(t0, &["Linux version", "Run /init", "vmrun-init: ready"]);
    let reason = loop {
        clock.poll(vmm.console());
        if let Some(r) = vmm.wait(Some(Duration::from_millis(200))) {
            break Some(r);
        }
        budget.check(|| {
            format!(
                "stages:\n{}\nconsole tail:\n{}",
                clock.report(),
                vmm.console().last_lines(30)
            )
        });
    };
    clock.poll(vmm.console());
    let total = t0.elapsed();
    let outcome = Outcome::new(reason.clone(), vmm.console(), Some(budget.limit()));
    eprintln!(
        "T4 boot ({} kernel, {}):\n  {:>8.3}s  VMM started\n{}\n  {:>8.1}s  status reported: {}\n(console: {})",
        if pvm { "PVM-variant" } else { "hardware" },
        vmrun::host::compat::kvm_label(pvm),
        started.as_secs_f64(),
        clock.report(),
        total.as_secs_f64(),
        outcome.summary,
        log_path.display()
    );
    assert_eq!(
        reason,
        Some(ExitReason::Status(Status::Exited(0))),
        "{}\n--- console tail ---\n{}",
        outcome.summary,
        vmm.console().last_lines(40)
    );
    assert!(vmm.console().text().contains("vmrun-init: ready"));
}
