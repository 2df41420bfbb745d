//! The VMM process: spawn → first KVM_RUN, and its resident memory beside the guest's.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::table::{BenchError, Goal, Row, Scale};
use vmrun::vstate::vcpu::monotonic_ns;

/// Guest memory of the probe VM: large enough that the RSS row would show it if it leaked in.
const PROBE_MEM_MIB: u64 = 128;

pub fn rows(scale: Scale) -> Vec<Row> {
    let spawn = Row::new("VMM spawn → first KVM_RUN", "ms", Goal::AtMost(5.0));
    let rss = Row::new("VMM RSS without guest memory", "MiB", Goal::AtMost(4.0));
    let n = scale.reps(40, 10);
    let mut starts = Vec::with_capacity(n);
    let mut rsses = Vec::with_capacity(n);
    for _ in 0..n {
        match probe_once() {
            Ok((ms, mib)) => {
                starts.push(ms);
                rsses.push(mib);
            }
            Err(e) => {
                let why = format!("{e}");
                return vec![spawn.absent(why.clone()), rss.absent(why)];
            }
        }
    }
    vec![spawn.samples(&starts), rss.samples(&rsses)]
}

/// Kills the probe VM however the measurement ends.
struct Probe(Child);

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One VMM start (the `park` test guest with a vsock device): milliseconds from spawn to the
/// first KVM_RUN, and MiB resident outside guest memory once it runs.
fn probe_once() -> Result<(f64, f64), BenchError> {
    let dir = tempfile::Builder::new()
        .prefix("vmrun-bench-")
        .tempdir()
        .map_err(BenchError::io("temporary directory"))?;
    let exe = std::env::current_exe().map_err(BenchError::io("the vmrun binary"))?;
    let t0 = monotonic_ns();
    let child = Command::new(exe)
        .args(["test-guest", "park", "--timing", "--memory"])
        .arg(PROBE_MEM_MIB.to_string())
        .arg("--vsock")
        .arg(dir.path().join("v.sock"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(BenchError::io("spawn the VMM"))?;
    let mut probe = Probe(child);
    let stderr = probe
        .0
        .stderr
        .take()
        .ok_or_else(|| BenchError::Setup("no stderr pipe".into()))?;
    let mut line = String::new();
    BufReader::new(stderr)
        .read_line(&mut line)
        .map_err(BenchError::io("read the VMM's timing line"))?;
    let at: u64 = line
        .strip_prefix("vmrun: timing: first KVM_RUN at ")
        .and_then(|r| r.trim().strip_suffix(" ns"))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| BenchError::Setup(format!("the VMM said {line:?}, not its timing")))?;
    let ms = at.saturating_sub(t0) as f64 / 1e6;
    // Let the device thread and the vCPU settle into their loops.
    std::thread::sleep(Duration::from_millis(100));
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", probe.0.id()))
        .map_err(BenchError::io("read the VMM's /proc/PID/smaps"))?;
    let kib = rss_without(&smaps, PROBE_MEM_MIB << 10)?;
    Ok((ms, kib as f64 / 1024.0))
}

/// Resident KiB of every mapping except guest memory: the mappings the VMM names
/// `[anon:vmrun-guest-ram]`, or, on a kernel that cannot name mappings, the one mapping of
/// `guest_kib` (a little more where the kernel merged a neighbouring heap into it).
fn rss_without(smaps: &str, guest_kib: u64) -> Result<u64, BenchError> {
    let named = format!(
        "[anon:{}]",
        vmrun::vstate::memory::ANON_NAME.to_string_lossy()
    );
    let by_name = smaps.contains(&named);
    // Without names: the smallest mapping of at least the guest's size, within 1 MiB of it.
    let guest_size = smaps
        .lines()
        .filter_map(|l| {
            l.strip_prefix("Size:")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .filter(|&s: &u64| s >= guest_kib && s < guest_kib + 1024)
        .min();
    let (mut total, mut size, mut guest, mut excluded) = (0u64, 0u64, false, false);
    for l in smaps.lines() {
        let mut f = l.split_whitespace();
        match (f.next(), f.next()) {
            // A mapping's first line: its address range, then perms, offset, dev, inode, name.
            (Some(range), Some(_)) if range.contains('-') && !range.ends_with(':') => {
                guest = by_name && l.trim_end().ends_with(&named);
            }
            (Some("Size:"), Some(v)) => size = v.parse().unwrap_or(0),
            (Some("Rss:"), Some(v)) => {
                let v: u64 = v.parse().unwrap_or(0);
                if guest || (!by_name && Some(size) == guest_size && !excluded) {
                    excluded = true;
                } else {
                    total += v;
                }
            }
            _ => {}
        }
    }
    if !excluded {
        return Err(BenchError::Setup(format!(
            "no {guest_kib} KiB guest-memory mapping in the VMM's smaps"
        )));
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_memory_is_left_out_once() {
        let smaps = "\
55d0-55e0 r-xp 00000000 08:01 1 /usr/bin/vmrun
Size:                 64 kB
Rss:                  60 kB
7f00-7f08 rw-p 00000000 00:00 0
Size:             131072 kB
Rss:                9000 kB
7f10-7f20 rw-p 00000000 00:00 0
Size:               2048 kB
Rss:                  12 kB
";
        assert_eq!(rss_without(smaps, 131072).unwrap(), 72);
        assert!(rss_without(smaps, 300_000).is_err());
        // Named guest RAM is left out whatever its size (a neighbour merged into it, say).
        let named = "\
55d0-55e0 r-xp 00000000 08:01 1 /usr/bin/vmrun
Size:                 64 kB
Rss:                  60 kB
7f00-7f08 rw-p 00000000 00:00 0 [anon:vmrun-guest-ram]
Size:             131204 kB
Rss:                9000 kB
7f10-7f20 rw-p 00000000 00:00 0
Size:             131072 kB
Rss:                  12 kB
";
        assert_eq!(rss_without(named, 131072).unwrap(), 72);
    }
}
