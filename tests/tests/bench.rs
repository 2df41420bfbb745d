//! `vmrun bench --quick` as a user runs it (T1 for the VMM rows, T2 for the agent rows): every
//! host-side row is measured, none is absent. The figures themselves are the bench's business
//! (debug builds make them meaningless here); this only keeps the bench from rotting.

use std::process::Command;

#[test]
fn quick_bench_measures_every_host_row() {
    if !std::path::Path::new("/dev/kvm").exists() {
        assert!(
            std::env::var_os("VMRUN_REQUIRE_KVM").is_none(),
            "VMRUN_REQUIRE_KVM is set but /dev/kvm is missing"
        );
        eprintln!("skipped: no /dev/kvm (the VMM rows need it)");
        return;
    }
    let bin = vmrun::api::builder::vmm_binary().expect("the vmrun binary is built");
    let out = Command::new(bin)
        .args(["bench", "--quick"])
        .output()
        .expect("run vmrun bench");
    let table = String::from_utf8_lossy(&out.stdout);
    eprintln!("{table}");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        table.starts_with("vmrun bench --quick — host KVM: "),
        "{table}"
    );
    // What a person sees on a terminal (stdout and stderr together) has the header once.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let headers = table
        .lines()
        .chain(stderr.lines())
        .filter(|l| l.contains("— host KVM: "))
        .count();
    assert_eq!(headers, 1, "stdout:\n{table}\nstderr:\n{stderr}");
    for row in [
        "VMM spawn → first KVM_RUN",
        "VMM RSS without guest memory",
        "agent exec `true` round trip",
        "floor: posix_spawn `true` + wait",
        "agent upload 1 MiB",
        "agent download 1 MiB",
        "agent upload 128 MiB",
        "agent download 128 MiB",
        "capture 10 000 × 1 KiB",
        "GNU tar 10 000 × 1 KiB",
        "capture ÷ GNU tar, 10 000 × 1 KiB",
        "capture one 128 MiB file",
        "capture ÷ GNU tar, one 128 MiB file",
        "vsock device host→guest, 4 KiB buffers",
        "vsock device guest→host, 64 KiB packets",
        "vsock device guest→host, 64 B packets",
    ] {
        let line = table
            .lines()
            .find(|l| l.starts_with(row))
            .unwrap_or_else(|| panic!("no row {row:?} in\n{table}"));
        assert!(!line.contains("absent:"), "{line}");
        // median, p99, unit, n: numbers where numbers belong.
        let median = line[row.len()..].split_whitespace().next().unwrap_or("");
        assert!(median.parse::<f64>().is_ok_and(|m| m > 0.0), "{line}");
    }
    // Guest rows are there either way: measured, or saying why not.
    assert!(table.contains("guest boot → agent ready"), "{table}");
}
