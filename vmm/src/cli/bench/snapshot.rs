//! Snapshots: one cold boot, its snapshot (time and size on disk), then VMs restored from it
//! side by side with that boot: restore → agent ready, restore → first exec output, the VMM's
//! own restore time, and the memory of 10 idle forks against 10 cold-booted VMs. Measured
//! where guest ring 0 runs at speed, or with `--guest` (then labelled as emulator figures).

use std::path::Path;
use std::time::{Duration, Instant};

use super::table::{Goal, Row, Scale};
use vmrun::api::vm::{Overlay, Vm};
use vmrun::control::Then;

/// The line the VMM logs after a restore (`vmrun boot --restore`).
pub const RESTORE_TIMING: &str = "vmrun-timing: restore ";

/// Rss and Pss of a process, in MiB (`/proc/PID/smaps_rollup`).
fn rss_pss(pid: u32) -> Option<(f64, f64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map(|kib| kib / 1024.0)
    };
    Some((field("Rss:")?, field("Pss:")?))
}

/// The VMM's own restore time, from its log.
fn vmm_restore_ms(log: &Path) -> Option<f64> {
    std::fs::read_to_string(log)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(RESTORE_TIMING))
        .and_then(|v| v.trim_end_matches(" ms").parse().ok())
}

pub fn rows(scale: Scale, at_speed: bool, forced: bool) -> Vec<Row> {
    let label = if at_speed { "" } else { " [ring 0 emulated]" };
    let rows = vec![
        Row::new(format!("cold boot → agent ready{label}"), "ms", Goal::None),
        Row::new(format!("snapshot create{label}"), "ms", Goal::None),
        Row::new(
            "snapshot on disk (sparse memory + state)",
            "MiB",
            Goal::None,
        ),
        Row::new(
            format!("restore → agent ready{label}"),
            "ms",
            Goal::AtMost(1000.0),
        ),
        Row::new(
            format!("restore → first exec output{label}"),
            "ms",
            Goal::None,
        ),
        Row::new("restore in the VMM (host side)", "ms", Goal::AtMost(10.0)),
        Row::new("10 idle forks: PSS summed", "MiB", Goal::None),
        Row::new("10 idle forks: RSS summed", "MiB", Goal::None),
        Row::new("10 cold-booted VMs: RSS (one × 10)", "MiB", Goal::None),
    ];
    if !at_speed && !forced {
        let why = "guest ring 0 is emulated on this host (nested PVM): --guest measures anyway";
        return rows.into_iter().map(|r| r.absent(why)).collect();
    }
    match measure(scale) {
        Ok(m) => {
            let values = [
                vec![m.cold_ms],
                vec![m.create_ms],
                vec![m.size_mib],
                m.ready_ms,
                m.first_ms,
                m.host_ms,
                vec![m.forks_pss],
                vec![m.forks_rss],
                vec![m.cold_rss * 10.0],
            ];
            rows.into_iter()
                .zip(values)
                .map(|(r, v)| r.samples(&v))
                .collect()
        }
        Err(e) => rows.into_iter().map(|r| r.absent(e.clone())).collect(),
    }
}

struct Measured {
    cold_ms: f64,
    create_ms: f64,
    size_mib: f64,
    ready_ms: Vec<f64>,
    first_ms: Vec<f64>,
    host_ms: Vec<f64>,
    forks_pss: f64,
    forks_rss: f64,
    cold_rss: f64,
}

fn measure(scale: Scale) -> Result<Measured, String> {
    let dir = tempfile::Builder::new()
        .prefix("vmrun-bench-snap-")
        .tempdir()
        .map_err(|e| format!("temporary directory: {e}"))?;
    let snap = dir.path().join("snap");
    std::fs::create_dir(&snap).map_err(|e| format!("{}: {e}", snap.display()))?;
    let t = Instant::now();
    let vm = Vm::builder()
        .overlay(Overlay::Tmpfs { size: None })
        .start()
        .map_err(|e| format!("cannot boot the VM to snapshot: {e}"))?;
    let cold_ms = t.elapsed().as_secs_f64() * 1e3;
    // Settled, as the forks will be when measured.
    vm.exec(["/bin/true"]).map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_secs(1));
    let cold_rss = vm.vmm_pid().and_then(rss_pss).map_or(0.0, |(rss, _)| rss);
    let t = Instant::now();
    vm.snapshot(&snap, Then::Stop)
        .map_err(|e| format!("snapshot: {e}"))?;
    let create_ms = t.elapsed().as_secs_f64() * 1e3;
    drop(vm);
    let size_mib = vmrun::launch::snapshot::disk_bytes(&snap) as f64 / (1 << 20) as f64;

    let (mut ready_ms, mut first_ms, mut host_ms) = (Vec::new(), Vec::new(), Vec::new());
    let mut forks = Vec::new();
    for _ in 0..scale.reps(10, 3) {
        let t = Instant::now();
        let vm = Vm::builder()
            .from_snapshot(&snap)
            .start()
            .map_err(|e| format!("restore: {e}"))?;
        ready_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        vm.exec(["echo", "hi"]).map_err(|e| e.to_string())?;
        first_ms.push(t.elapsed().as_secs_f64() * 1e3);
        if let Some(ms) = vmm_restore_ms(&vm.paths().vmm_log()) {
            host_ms.push(ms);
        }
        forks.push(vm);
    }
    // Ten forks alive at once, idle.
    while forks.len() < 10 {
        forks.push(
            Vm::builder()
                .from_snapshot(&snap)
                .start()
                .map_err(|e| format!("restore: {e}"))?,
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    let (mut forks_rss, mut forks_pss) = (0.0, 0.0);
    for f in &forks {
        let (rss, pss) = f
            .vmm_pid()
            .and_then(rss_pss)
            .ok_or("cannot read a fork's smaps_rollup")?;
        forks_rss += rss;
        forks_pss += pss;
    }
    Ok(Measured {
        cold_ms,
        create_ms,
        size_mib,
        ready_ms,
        first_ms,
        host_ms,
        forks_pss,
        forks_rss,
        cold_rss,
    })
}
