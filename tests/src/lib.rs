//! Helpers shared by every test suite of the workspace: finding the images, skipping honestly,
//! time budgets derived from the host, timing the stages of a boot from what the console
//! shows, booting a VM to its end, and reading captured tars; `host` has the host-side tools
//! (loop devices, private mount namespaces, checksums, GNU tar).

pub mod cli;
pub mod host;
pub mod oci;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use vmrun::devices::legacy::serial::ConsoleTail;
use vmrun::launch::images;

/// The kernel and initramfs for this host, or why they cannot be used. With VMRUN_REQUIRE_T4=1
/// (CI) a missing piece is a failure instead of a skip.
pub fn t4_images(test: &str) -> Option<(PathBuf, PathBuf, bool)> {
    let skip = |why: String| {
        assert!(
            std::env::var_os("VMRUN_REQUIRE_T4").is_none(),
            "{test}: T4 required but {why}"
        );
        eprintln!("SKIPPED {test}: {why}");
        None
    };
    let pvm = match vmrun::host::compat::ring0_emulated() {
        Ok(p) => p,
        Err(e) => return skip(format!("no usable KVM ({e})")),
    };
    let kernel = images::default_kernel(pvm);
    let initrd = images::default_initramfs();
    for p in [&kernel, &initrd] {
        if !p.exists() {
            return skip(format!(
                "{} is not built (run `vmrun images build`)",
                p.display()
            ));
        }
    }
    Some((kernel, initrd, pvm))
}

/// How fast this host runs guests, measured once per test process: the budgets of T4 waits
/// are derived from it instead of being constants that a slower machine or a busy one overruns.
#[derive(Clone, Debug)]
pub struct HostPace {
    /// What kind of KVM the figures come from (for labels).
    pub kind: &'static str,
    /// One ring-0 loop iteration in a test guest, in ns (~1 natively, 500–4000 emulated).
    pub ring0_ns: f64,
    /// Runnable load per host core over the last minute, at least 1.
    pub load: f64,
}

/// Ring-0 speed the PVM budgets below are stated for (a mid-range machine of this kind).
const PVM_REFERENCE_NS: f64 = 1000.0;

impl HostPace {
    /// Scale of a PVM budget on this host: the measured ring-0 cost against the reference.
    fn pvm_scale(&self) -> f64 {
        (self.ring0_ns / PVM_REFERENCE_NS).clamp(0.5, 4.0)
    }

    fn emulated(&self) -> bool {
        self.kind.starts_with("PVM")
    }

    /// Scale of a hardware budget where the host's own CPU is QEMU's emulator (the hardware
    /// tier): everything, host side included, runs at the emulator's pace, which follows the
    /// machine QEMU runs on (seen here: the same probe at 4 ns and, on a busier day, 58 ns).
    fn tcg_scale(&self) -> f64 {
        if self.kind == "TCG-emulated SVM" {
            (self.ring0_ns / TCG_REFERENCE_NS).clamp(1.0, 4.0)
        } else {
            1.0
        }
    }
}

/// The ring-0 probe under TCG-emulated SVM on a machine at its usual pace.
const TCG_REFERENCE_NS: f64 = 8.0;

fn load_per_core() -> f64 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let one_min = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    (one_min / cores).clamp(1.0, 4.0)
}

/// The host's pace (probed once; the load is read again at each call).
pub fn host_pace() -> HostPace {
    static PROBE: OnceLock<Option<f64>> = OnceLock::new();
    let ring0 = *PROBE.get_or_init(|| {
        vmrun::host::compat::probe()
            .ok()
            .map(|p| p.ring0_ns_per_iter)
    });
    let ring0_ns = ring0.unwrap_or(PVM_REFERENCE_NS);
    let emulated = ring0.is_none_or(|ns| ns > 100.0);
    HostPace {
        kind: vmrun::host::compat::kvm_label(emulated),
        ring0_ns,
        load: load_per_core(),
    }
}

/// A time budget for one thing a T4 test waits for. Stated as what the wait should take at
/// most on hardware-speed KVM and on a PVM host at the reference pace; the PVM figure is
/// scaled by the measured ring-0 cost, and either by the host's load. An overrun names what
/// was awaited and how the budget was derived.
pub struct Budget {
    what: String,
    start: Instant,
    limit: Duration,
    pace: HostPace,
}

impl Budget {
    pub fn new(what: impl Into<String>, hw_secs: u64, pvm_secs: u64) -> Budget {
        let pace = host_pace();
        let base = if pace.emulated() {
            pvm_secs as f64 * pace.pvm_scale()
        } else {
            hw_secs as f64 * pace.tcg_scale()
        };
        Budget {
            what: what.into(),
            start: Instant::now(),
            limit: Duration::from_secs_f64(base * pace.load),
            pace,
        }
    }

    pub fn limit(&self) -> Duration {
        self.limit
    }

    pub fn deadline(&self) -> Instant {
        self.start + self.limit
    }

    pub fn left(&self) -> Duration {
        self.deadline().saturating_duration_since(Instant::now())
    }

    pub fn expired(&self) -> bool {
        self.left().is_zero()
    }

    /// What the budget was and where it came from.
    pub fn explain(&self) -> String {
        format!(
            "{:.0}s budget for {} ({}, ring 0 at {:.0} ns/iteration, load {:.1} per core)",
            self.limit.as_secs_f64(),
            self.what,
            self.pace.kind,
            self.pace.ring0_ns,
            self.pace.load
        )
    }

    /// Fails the test: the wait ran out. `detail` says what was seen meanwhile.
    pub fn overrun(&self, detail: &str) -> ! {
        panic!(
            "waited {:.0}s for {}: over the {}\n{detail}",
            self.start.elapsed().as_secs_f64(),
            self.what,
            self.explain()
        )
    }

    /// Fails the test when the budget has run out; `detail` is only computed then.
    pub fn check(&self, detail: impl FnOnce() -> String) {
        if self.expired() {
            self.overrun(&detail());
        }
    }
}

/// What vmrun may leave on the host: `vmrun-*` entries of the temporary directory and the
/// VM directories of the runtime directory. A test compares it before and after.
pub fn host_leftovers() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(std::env::temp_dir())
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("vmrun-"))
                .collect()
        })
        .unwrap_or_default();
    if let Ok(rd) = std::fs::read_dir(vmrun::runtime::runtime_dir().join("vms")) {
        v.extend(
            rd.filter_map(|e| e.ok())
                .map(|e| format!("runtime:{}", e.file_name().to_string_lossy())),
        );
    }
    v.sort();
    v
}

/// Watches the console for marker strings and records when each first appeared.
pub struct StageClock {
    start: Instant,
    marks: Vec<(&'static str, Option<Duration>)>,
}

impl StageClock {
    pub fn new(start: Instant, markers: &[&'static str]) -> Self {
        StageClock {
            start,
            marks: markers.iter().map(|m| (*m, None)).collect(),
        }
    }

    pub fn poll(&mut self, tail: &ConsoleTail) {
        let text = tail.text();
        for (m, at) in self.marks.iter_mut() {
            if at.is_none() && text.contains(*m) {
                *at = Some(self.start.elapsed());
            }
        }
    }

    pub fn report(&self) -> String {
        self.marks
            .iter()
            .map(|(m, at)| match at {
                Some(d) => format!("  {:>8.1}s  {m}", d.as_secs_f64()),
                None => format!("  {:>9}  {m}", "never"),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The built ext4 rootfs, or a skip (a failure with VMRUN_REQUIRE_T4=1).
pub fn t4_rootfs(test: &str) -> Option<PathBuf> {
    let p = images::default_rootfs();
    if p.exists() {
        return Some(p);
    }
    let why = format!(
        "{} is not built (run `vmrun images build rootfs`)",
        p.display()
    );
    assert!(
        std::env::var_os("VMRUN_REQUIRE_T4").is_none(),
        "{test}: T4 required but {why}"
    );
    eprintln!("SKIPPED {test}: {why}");
    None
}

/// How a boot went: its outcome, the console text and how long it took.
pub struct Booted {
    pub outcome: vmrun::outcome::Outcome,
    pub console: String,
    pub secs: f64,
}

/// Boots with `opts` (the `GONDOLIN_ROOT_OVERLAY` value passed as `env`) and waits for the end,
/// within `budget`.
pub fn boot(opts: &vmrun::launch::VmOptions, env: Option<&str>, budget: &Budget) -> Booted {
    use vmrun::builder::Vmm;
    use vmrun::devices::legacy::serial::ConsoleSink;
    use vmrun::outcome::Outcome;
    let t0 = Instant::now();
    let resolved = vmrun::launch::resolve(opts, env).expect("launch options resolve");
    let vmm = Vmm::start(resolved.into_config(opts, ConsoleSink::None)).expect("VM starts");
    let reason = vmm.wait(Some(budget.left()));
    if reason.is_none() {
        budget.overrun(&format!("console tail:\n{}", vmm.console().last_lines(30)));
    }
    let outcome = Outcome::new(reason, vmm.console(), Some(budget.limit()));
    Booted {
        outcome,
        console: vmm.console().text(),
        secs: t0.elapsed().as_secs_f64(),
    }
}

/// One entry of a captured tar, as the tests look at it.
#[derive(Debug, Default)]
pub struct TarEntry {
    pub kind: u8,
    pub mode: u32,
    pub dev: (u32, u32),
    pub link: Option<String>,
    pub data: Vec<u8>,
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

/// A tar archive by path (trailing `/` dropped), with contents and PAX xattrs.
pub fn read_tar(bytes: &[u8]) -> BTreeMap<String, TarEntry> {
    let mut a = tar::Archive::new(bytes);
    let mut out = BTreeMap::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e
            .path()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches('/')
            .to_string();
        let h = e.header().clone();
        let mut t = TarEntry {
            kind: h.entry_type().as_byte(),
            mode: h.mode().unwrap(),
            dev: (
                h.device_major().ok().flatten().unwrap_or(0),
                h.device_minor().ok().flatten().unwrap_or(0),
            ),
            link: e
                .link_name()
                .unwrap()
                .map(|l| l.to_string_lossy().into_owned()),
            ..Default::default()
        };
        // The tar crate's PAX reader splits records at newlines, so it cannot read binary
        // xattr values (overlayfs writes some); such records are skipped here, and GNU tar
        // (which reads them) checks the whole archive where it matters.
        if let Ok(Some(pax)) = e.pax_extensions() {
            for x in pax.flatten() {
                if let Some(k) = x.key().ok().and_then(|k| k.strip_prefix("SCHILY.xattr.")) {
                    t.xattrs.insert(k.to_string(), x.value_bytes().to_vec());
                }
            }
        }
        e.read_to_end(&mut t.data).unwrap();
        out.insert(path, t);
    }
    out
}

/// The paths of a [`read_tar`] archive but its root (`.`), in order.
pub fn entry_names(t: &BTreeMap<String, TarEntry>) -> Vec<&str> {
    t.keys()
        .map(String::as_str)
        .filter(|n| !n.is_empty() && *n != ".")
        .collect()
}
