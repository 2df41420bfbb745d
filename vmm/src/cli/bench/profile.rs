//! `vmrun profile`: where a VM's start and one `exec` spend their time, for one build or for
//! several side by side (a build is a `vmrun` binary with its kernel and initramfs). Boots
//! alternate between builds so drift on the machine falls on all of them alike.
//!
//! Per boot it records the host's view (the start phases), the guest kernel's own clock (its
//! log: the moment it runs /init, the longest silences, and with `--initcalls` every initcall),
//! and KVM's counters for the VM (exits by reason, page faults, emulated instructions), read
//! from outside the VMM so that any build can be profiled. Per exec it records the round trip,
//! KVM's counters and the guest's page faults (the whole guest's and the agent's own).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use vmrun::api::builder::Phase;
use vmrun::api::vm::{Overlay, Vm};
use vmrun::host::kvmstats::{delta, KvmStats, Reading};

/// One build under test.
#[derive(Clone, Debug)]
pub struct Build {
    pub name: String,
    /// Holds `vmrun`, `vmlinux` and `initramfs.cpio`; `None`: this binary, default images.
    pub dir: Option<PathBuf>,
    pub memory_mib: Option<u64>,
    pub cmdline: Option<String>,
}

impl std::str::FromStr for Build {
    type Err = String;

    /// `NAME=DIR[,memory=MIB][,cmdline=PARAMS]` (`cmdline=` takes the rest of the text), or
    /// `NAME` alone for this binary and the default images.
    fn from_str(s: &str) -> Result<Build, String> {
        let (name, rest) = s.split_once('=').unwrap_or((s, ""));
        if name.is_empty() || name.contains(',') {
            return Err(format!(
                "build '{s}': give it as NAME=DIR[,memory=MIB][,cmdline=…]"
            ));
        }
        let mut b = Build {
            name: name.into(),
            dir: None,
            memory_mib: None,
            cmdline: None,
        };
        let mut rest = rest;
        while !rest.is_empty() {
            if let Some(c) = rest.strip_prefix("cmdline=") {
                b.cmdline = Some(c.into());
                break;
            }
            let (item, tail) = rest.split_once(',').unwrap_or((rest, ""));
            rest = tail;
            if item.is_empty() {
                continue;
            }
            if let Some(m) = item.strip_prefix("memory=") {
                b.memory_mib =
                    Some(m.parse().map_err(|_| {
                        format!("build '{name}': memory={m} is not a number of MiB")
                    })?);
            } else if b.dir.is_none() && !item.contains('=') {
                let dir = PathBuf::from(item);
                for f in ["vmrun", "vmlinux", "initramfs.cpio"] {
                    if !dir.join(f).is_file() {
                        return Err(format!(
                            "build '{name}': {} has no {f} (scripts/profile-build.sh DIR makes one from this checkout)",
                            dir.display()
                        ));
                    }
                }
                b.dir = Some(dir);
            } else {
                return Err(format!("build '{name}': unknown item '{item}'"));
            }
        }
        Ok(b)
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub runs: usize,
    pub execs: usize,
    pub initcalls: bool,
}

/// What one boot of one build showed.
#[derive(Default)]
struct Sample {
    /// Seconds since the start began, per phase (host view).
    phases: BTreeMap<usize, f64>,
    /// Guest kernel clock at `Run /init`.
    run_init: Option<f64>,
    /// Kernel log silences: normalised line → seconds before it.
    gaps: BTreeMap<String, f64>,
    /// Initcall → seconds (with --initcalls).
    initcalls: BTreeMap<String, f64>,
    /// KVM counters for the whole boot.
    boot: BTreeMap<String, f64>,
    exec_ms: Vec<f64>,
    /// KVM counters per exec.
    per_exec: BTreeMap<String, f64>,
    agent_faults: f64,
    command_faults: f64,
}

const PHASES: [Phase; 5] = [
    Phase::VmmStarted,
    Phase::KernelRunning,
    Phase::InitStarted,
    Phase::RootMounted,
    Phase::AgentReady,
];

/// Runs the profile and returns the report.
pub fn run(builds: &[Build], o: Options) -> Result<String, String> {
    let (kind, _) = super::kvm_kind();
    // A build's kernel lives outside the image cache, which would draw the foreign-kernel
    // warning at every boot.
    log::set_max_level(log::LevelFilter::Error);
    let mut samples: Vec<Vec<Sample>> = builds.iter().map(|_| Vec::new()).collect();
    for r in 0..o.runs {
        // Alternate the order so neither build always boots on a machine the other warmed.
        let order: Vec<usize> = if r % 2 == 0 {
            (0..builds.len()).collect()
        } else {
            (0..builds.len()).rev().collect()
        };
        for i in order {
            eprintln!(
                "vmrun profile: run {}/{} of '{}'…",
                r + 1,
                o.runs,
                builds[i].name
            );
            let s =
                sample(&builds[i], o).map_err(|e| format!("build '{}': {e}", builds[i].name))?;
            samples[i].push(s);
        }
    }
    Ok(render(&kind, builds, &samples, o))
}

fn sample(b: &Build, o: Options) -> Result<Sample, String> {
    let seen: Arc<Mutex<BTreeMap<usize, f64>>> = Arc::default();
    let mut builder = Vm::builder().overlay(Overlay::Tmpfs { size: None });
    if let Some(dir) = &b.dir {
        builder = builder
            .binary(dir.join("vmrun"))
            .kernel(dir.join("vmlinux"))
            .initrd(dir.join("initramfs.cpio"));
    }
    if let Some(m) = b.memory_mib {
        builder = builder.memory_mib(m);
    }
    let mut cmdline = b.cmdline.clone().unwrap_or_default();
    if o.initcalls {
        cmdline.push_str(" initcall_debug");
    }
    if !cmdline.trim().is_empty() {
        builder = builder.cmdline(cmdline.trim().to_string());
    }
    let rec = seen.clone();
    let vm = builder
        .on_progress(move |p, t| {
            let i = PHASES.iter().position(|q| *q == p).unwrap_or(PHASES.len());
            rec.lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(i, t.as_secs_f64());
        })
        .start()
        .map_err(|e| e.to_string())?;
    let pid = vm.vmm_pid().ok_or("the VMM's pid is unknown")?;
    let stats = KvmStats::attach(pid).map_err(|e| e.to_string())?;
    let mut s = Sample {
        phases: seen.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        boot: per(&stats.read().map_err(|e| e.to_string())?, 1.0),

        ..Default::default()
    };
    let run = |argv: &[&str]| -> Result<String, String> {
        let out = vm.exec(argv).map_err(|e| e.to_string())?;
        if out.status != vmrun::api::ExitStatus::Exited(0) {
            return Err(format!(
                "{argv:?} in the guest: {:?}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    kernel_log(&run(&["dmesg"])?, &mut s);
    // The agent is the parent of the shell this starts.
    let agent = run(&["sh", "-c", "echo $PPID"])?.trim().to_string();
    let stat = format!("/proc/{agent}/stat");
    let faults = || -> Result<(f64, f64), String> {
        let text = run(&["cat", &stat])?;
        parse_faults(&text).ok_or_else(|| format!("no page-fault counts in {stat}: {text}"))
    };
    run(&["/bin/true"])?;
    let f0 = faults()?;
    let k0 = stats.read().map_err(|e| e.to_string())?;
    for _ in 0..o.execs {
        let t = Instant::now();
        run(&["/bin/true"])?;
        s.exec_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let k1 = stats.read().map_err(|e| e.to_string())?;
    let f1 = faults()?;
    let f2 = faults()?;
    let n = o.execs.max(1) as f64;
    s.per_exec = per(&delta(&k0, &k1), n);
    // f1 - f0 holds the execs and one reading (a child counts once reaped); f2 - f1 one
    // reading alone.
    s.agent_faults = ((f1.0 - f0.0) - (f2.0 - f1.0)).max(0.0) / n;
    s.command_faults = ((f1.1 - f0.1) - (f2.1 - f1.1)).max(0.0) / n;
    drop(vm);
    Ok(s)
}

/// Counters as figures, each divided by `n` (the number of execs they cover).
fn per(r: &Reading, n: f64) -> BTreeMap<String, f64> {
    r.iter().map(|(k, v)| (k.clone(), *v as f64 / n)).collect()
}

/// Page faults from a /proc/PID/stat: the process's own (minflt + majflt, fields 10 and 12)
/// and its reaped children's (cminflt + cmajflt, 11 and 13). The guest kernel keeps no
/// system-wide count (no VM_EVENT_COUNTERS), and the agent reaps every command it runs.
fn parse_faults(stat: &str) -> Option<(f64, f64)> {
    // Fields after the command name (which may hold spaces) start at field 3.
    let after = &stat[stat.rfind(") ")? + 2..];
    let f: Vec<f64> = after
        .split_whitespace()
        .skip(7)
        .take(4)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    (f.len() == 4).then(|| (f[0] + f[2], f[1] + f[3]))
}

/// Reads the kernel log: when /init ran, the silences before lines, initcall times.
fn kernel_log(dmesg: &str, s: &mut Sample) {
    let mut last: Option<f64> = None;
    for line in dmesg.lines() {
        let Some((t, msg)) = line
            .strip_prefix('[')
            .and_then(|l| l.split_once(']'))
            .and_then(|(t, m)| Some((t.trim().parse::<f64>().ok()?, m.trim())))
        else {
            continue;
        };
        if msg.starts_with("Run /init") {
            s.run_init = Some(t);
        }
        if let Some(rest) = msg.strip_prefix("initcall ") {
            // "initcall NAME+0x../0x.. returned 0 after N usecs"
            if let (Some(name), Some(us)) = (
                rest.split(['+', ' ']).next(),
                rest.split_once(" after ")
                    .and_then(|(_, u)| u.split_whitespace().next())
                    .and_then(|u| u.parse::<f64>().ok()),
            ) {
                *s.initcalls.entry(name.to_string()).or_default() += us / 1e6;
            }
        }
        if let Some(prev) = last {
            let key = normalise(msg);
            *s.gaps.entry(key).or_default() += (t - prev).max(0.0);
        }
        last = Some(t);
    }
}

/// A log line with numbers blanked, so the same line matches across boots and builds.
fn normalise(msg: &str) -> String {
    let mut out = String::new();
    let mut in_num = false;
    for c in msg.chars().take(72) {
        if c.is_ascii_hexdigit() && (in_num || c.is_ascii_digit()) {
            if !in_num {
                out.push('#');
            }
            in_num = true;
        } else {
            in_num = false;
            out.push(c);
        }
    }
    out
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

/// Adds a row: its label, what it takes from each sample, its decimals.
type AddRow<'a> = dyn FnMut(String, &dyn Fn(&Sample) -> Option<f64>, usize) + 'a;

/// A table cell: its text and the median it shows (for the ratio column).
type Cell = (String, Option<f64>);

/// `median (min–max)` of what `f` picks from each sample.
fn cell(
    samples: &[Sample],
    f: impl Fn(&Sample) -> Option<f64>,
    prec: usize,
) -> (String, Option<f64>) {
    let mut v: Vec<f64> = samples.iter().filter_map(f).collect();
    let Some(m) = median(&mut v) else {
        return ("—".into(), None);
    };
    let (lo, hi) = (v[0], v[v.len() - 1]);
    (format!("{m:.prec$} ({lo:.prec$}–{hi:.prec$})"), Some(m))
}

fn render(kind: &str, builds: &[Build], samples: &[Vec<Sample>], o: Options) -> String {
    let mut rows: Vec<(String, Vec<Cell>)> = Vec::new();
    let mut add = |label: String, f: &dyn Fn(&Sample) -> Option<f64>, prec: usize| {
        let cells: Vec<_> = samples.iter().map(|s| cell(s, f, prec)).collect();
        if cells.iter().any(|c| c.1.is_some()) {
            rows.push((label, cells));
        }
    };
    add("— start, host view (s since start) —".into(), &|_| None, 0);
    for (i, p) in PHASES.iter().enumerate() {
        add(
            p.describe().to_string(),
            &|s: &Sample| s.phases.get(&i).copied(),
            2,
        );
    }
    add(
        "guest kernel clock at `Run /init` (s)".into(),
        &|s: &Sample| s.run_init,
        2,
    );
    // One row per KVM counter that any sample saw move.
    let counter_rows = |add: &mut AddRow,
                        label: &str,
                        pick: &dyn Fn(&Sample) -> &BTreeMap<String, f64>,
                        prec: usize| {
        let mut names: Vec<&String> = samples
            .iter()
            .flatten()
            .flat_map(|s| pick(s).iter().filter(|(k, v)| **v > 0.0 && !skip(k)))
            .map(|(k, _)| k)
            .collect();
        names.sort();
        names.dedup();
        for k in names {
            add(
                format!("{label}: KVM {k}"),
                &|s: &Sample| pick(s).get(k).copied(),
                prec,
            );
        }
    };
    counter_rows(&mut add, "boot", &|s: &Sample| &s.boot, 0);
    add(
        format!("exec `/bin/true` round trip (ms), {} per boot", o.execs),
        &|s: &Sample| {
            let mut v = s.exec_ms.clone();
            median(&mut v)
        },
        1,
    );
    add(
        "exec: guest page faults in the agent".into(),
        &|s: &Sample| Some(s.agent_faults),
        1,
    );
    add(
        "exec: guest page faults in the command".into(),
        &|s: &Sample| Some(s.command_faults),
        1,
    );
    counter_rows(&mut add, "exec", &|s: &Sample| &s.per_exec, 1);
    // The longest kernel-log silences and initcalls, by the largest median in any build.
    let top = |pick: &dyn Fn(&Sample) -> &BTreeMap<String, f64>, n: usize| -> Vec<String> {
        let mut best: BTreeMap<String, f64> = BTreeMap::new();
        for bs in samples {
            let mut keys: Vec<&String> = bs.iter().flat_map(|s| pick(s).keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let mut v: Vec<f64> = bs
                    .iter()
                    .map(|s| pick(s).get(k).copied().unwrap_or(0.0))
                    .collect();
                let m = median(&mut v).unwrap_or(0.0);
                let e = best.entry(k.clone()).or_default();
                *e = e.max(m);
            }
        }
        let mut v: Vec<(String, f64)> = best.into_iter().collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v.into_iter().take(n).map(|(k, _)| k).collect()
    };
    for k in top(&|s: &Sample| &s.gaps, 12) {
        add(
            format!("kernel log: silence before `{k}` (s)"),
            &|s: &Sample| Some(s.gaps.get(&k).copied().unwrap_or(0.0)),
            2,
        );
    }
    if o.initcalls {
        for k in top(&|s: &Sample| &s.initcalls, 15) {
            add(
                format!("initcall {k} (s)"),
                &|s: &Sample| Some(s.initcalls.get(&k).copied().unwrap_or(0.0)),
                2,
            );
        }
    }

    let mut head = vec!["".to_string()];
    head.extend(builds.iter().map(|b| b.name.clone()));
    // Each later build against the first, as a ratio of medians.
    for b in builds.iter().skip(1) {
        head.push(format!("{} ÷ {}", b.name, builds[0].name));
    }
    let mut table: Vec<Vec<String>> = vec![head];
    for (label, cells) in rows {
        let mut line = vec![label];
        let vals: Vec<Option<f64>> = cells.iter().map(|c| c.1).collect();
        line.extend(cells.into_iter().map(|c| c.0));
        for v in vals.iter().skip(1) {
            line.push(match (vals[0], v) {
                (Some(a), Some(b)) if a > 0.0 => format!("{:.2}", b / a),
                _ => String::new(),
            });
        }
        table.push(line);
    }
    let widths: Vec<usize> = (0..table[0].len())
        .map(|c| {
            table
                .iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = format!(
        "vmrun profile — host KVM: {kind}\n{} boot(s) per build, builds alternating; each cell: median (min–max)\n",
        o.runs
    );
    for b in builds {
        out.push_str(&format!(
            "  {}: {}{}{}\n",
            b.name,
            b.dir
                .as_deref()
                .map_or("this vmrun, default images".into(), |d: &Path| d
                    .display()
                    .to_string()),
            b.memory_mib.map_or(String::new(), |m| format!(", {m} MiB")),
            b.cmdline
                .as_deref()
                .map_or(String::new(), |c| format!(", cmdline +`{c}`")),
        ));
    }
    for r in table {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            let pad = widths[i] - c.chars().count();
            if i == 0 {
                line.push_str(c);
                line.push_str(&" ".repeat(pad));
            } else {
                line.push_str("  ");
                line.push_str(&" ".repeat(pad));
                line.push_str(c);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Counters that say nothing about cost (gauges and halt-polling bookkeeping). VM-level
/// counters (`vm.`) stay: with shadow paging (as under PVM) `vm.mmu_pte_write` counts the
/// emulated guest writes KVM checks against the page tables it shadows.
fn skip(name: &str) -> bool {
    let name = name.strip_prefix("vm.").unwrap_or(name);
    name.starts_with("halt_poll")
        || name.starts_with("max_")
        || name.starts_with("pages_")
        || name == "guest_mode"
        || name == "blocking"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_parse_and_bad_ones_are_named() {
        let b: Build = "now".parse().unwrap();
        assert_eq!((b.name.as_str(), b.dir.is_none()), ("now", true));
        let b: Build = "small=,memory=128,cmdline=quiet a=b,c".parse().unwrap();
        assert_eq!(b.memory_mib, Some(128));
        assert_eq!(b.cmdline.as_deref(), Some("quiet a=b,c"));
        let e = "x=/nonexistent".parse::<Build>().unwrap_err();
        assert!(
            e.contains("has no vmrun") && e.contains("profile-build.sh"),
            "{e}"
        );
        let e = "x=,memory=lots".parse::<Build>().unwrap_err();
        assert!(e.contains("memory=lots"), "{e}");
    }

    #[test]
    fn the_kernel_log_gives_init_time_silences_and_initcalls() {
        let log = "[    0.000000] Linux version 6.12\n\
                   [    2.500000] initcall kswapd_init+0x0/0x50 returned 0 after 2000000 usecs\n\
                   garbage line\n\
                   [    3.000000] Run /init as init process\n";
        let mut s = Sample::default();
        kernel_log(log, &mut s);
        assert_eq!(s.run_init, Some(3.0));
        assert!((s.initcalls["kswapd_init"] - 2.0).abs() < 1e-9);
        assert!(
            (s.gaps["initcall kswapd_init+#x#/#x# returned # after # usecs"] - 2.5).abs() < 1e-9,
            "{:?}",
            s.gaps
        );
        assert!((s.gaps["Run /init as init process"] - 0.5).abs() < 1e-9);
    }

    #[test]
    fn page_faults_come_from_the_agents_stat() {
        let text = "77 (vmrun agent) S 1 77 77 0 -1 4194560 999 50 1 2 5 6\n";
        assert_eq!(parse_faults(text), Some((1000.0, 52.0)));
        assert_eq!(parse_faults("77 (x) S 1 2\n"), None);
        assert_eq!(parse_faults("no stat here"), None);
    }
}
