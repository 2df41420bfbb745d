//! Hosts whose KVM emulates guest ring 0 (nested PVM): how vmrun finds out, and what it adds
//! for them. Detection times a ring-0 loop against a ring-3 loop in test guests; the guest
//! kernel variant and command line in `images/kernel/pvm/` are chosen from the result.

use serde::{Deserialize, Serialize};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use thiserror::Error;

use super::testguest;
use crate::arch::x86_64::gdt::CpuMode;
use crate::builder::{StartError, Vmm};
use crate::config::{Payload, VmConfig};
use crate::devices::legacy::serial::ConsoleSink;
use crate::vstate::exit::ExitReason;

/// Kernel command line the PVM variant needs (each entry explained in the file's comments).
const PVM_CMDLINE_FILE: &str = include_str!("../../../images/kernel/pvm/cmdline");

#[derive(Debug, Error)]
pub enum ProbeError {
    #[error("the timing probe VM: {0}")]
    Start(#[from] StartError),
    #[error("the timing probe guest ended with {0:?} before it wrote two timestamps")]
    NoSamples(Option<ExitReason>),
}

/// The PVM command line with comments and line breaks removed.
pub fn pvm_cmdline() -> String {
    PVM_CMDLINE_FILE
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Ring-0 loop iterations: a few ms where ring 0 is emulated, microseconds where it is not.
const RING0_ITERS: u32 = 2_000;
/// The second, longer ring-0 loop that settles a slow first one: the difference of the two
/// is the loop alone, without the cost of the exits around it (which dominate the short
/// loop where exits are slow, as under an emulated SVM).
const RING0_LONG_ITERS: u32 = 100_000;
/// Ring-3 loop iterations: a few ms natively.
const RING3_ITERS: u32 = 10_000_000;
/// A ring-0 loop iteration slower than this is emulated (native: ~0.3 ns; emulated: ~4 µs).
const EMULATED_NS: f64 = 100.0;

#[derive(Clone, Copy, Debug)]
pub struct RingProbe {
    pub ring0_ns_per_iter: f64,
    pub ring3_ns_per_iter: f64,
}

/// Guest ring-0 work of a start (boot to agent ready) and of one `exec true` round trip, in
/// ring-0 loop steps of the probe: `vmrun profile` medians on a PVM host (agent ready after
/// 33.2 s, exec 1.25 s, at 1576 ns per step), where they are what a start and an exec cost.
const START_STEPS: f64 = 2.1e7;
const EXEC_STEPS: f64 = 8.0e5;
/// On hardware-speed KVM a start is dominated by the guest kernel's own pace.
const HW_START: Duration = Duration::from_secs(2);
const HW_EXEC: Duration = Duration::from_millis(5);

impl RingProbe {
    pub fn ring0_emulated(&self) -> bool {
        self.ring0_ns_per_iter > EMULATED_NS
    }

    /// About how long a VM takes from start to its agent answering on this host.
    pub fn expected_start(&self) -> Duration {
        if self.ring0_emulated() {
            Duration::from_secs_f64(self.ring0_ns_per_iter * START_STEPS / 1e9)
        } else {
            HW_START
        }
    }

    /// About how long one `exec true` round trip takes in a running VM on this host.
    pub fn expected_exec(&self) -> Duration {
        if self.ring0_emulated() {
            Duration::from_secs_f64(self.ring0_ns_per_iter * EXEC_STEPS / 1e9)
        } else {
            HW_EXEC
        }
    }
}

/// Nanoseconds between the probe writes before and after `iterations` of the loop.
fn time_loop(iterations: u32, mode: CpuMode) -> Result<f64, ProbeError> {
    let g = testguest::spin(iterations, mode);
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
        probes: true,
        hide_pv_hypercalls: false,
        seccomp: None,
        run_as: None,
    })?;
    let reason = vmm.wait(Some(Duration::from_secs(20)));
    let s = vmm.probe_samples();
    match (reason, s.as_slice()) {
        (Some(_), [(t0, _), (t1, _), ..]) => Ok(t1.duration_since(*t0).as_nanos() as f64),
        (r, _) => Err(ProbeError::NoSamples(r)),
    }
}

/// Runs both loops (a few tens of ms in all).
pub fn probe() -> Result<RingProbe, ProbeError> {
    let short = time_loop(RING0_ITERS, CpuMode::Long64)?;
    let mut ring0 = short / f64::from(RING0_ITERS);
    if ring0 > EMULATED_NS {
        // Slow, or only slow exits around a fast loop: the longer loop tells them apart.
        let long = time_loop(RING0_LONG_ITERS, CpuMode::Long64)?;
        ring0 = ((long - short) / f64::from(RING0_LONG_ITERS - RING0_ITERS)).max(0.0);
    }
    Ok(RingProbe {
        ring0_ns_per_iter: ring0,
        ring3_ns_per_iter: time_loop(RING3_ITERS, CpuMode::User64)? / f64::from(RING3_ITERS),
    })
}

/// The probe, run once per process.
pub fn probe_cached() -> Result<RingProbe, Arc<ProbeError>> {
    static CACHE: OnceLock<Result<RingProbe, Arc<ProbeError>>> = OnceLock::new();
    CACHE.get_or_init(|| probe().map_err(Arc::new)).clone()
}

/// Whether this host emulates guest ring 0 (the probe's answer, computed once per process).
pub fn ring0_emulated() -> Result<bool, Arc<ProbeError>> {
    probe_cached().map(|p| p.ring0_emulated())
}

/// Which guest kernel variant and command line to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compat {
    /// Probe the host: PVM variant when ring 0 is emulated.
    #[default]
    Auto,
    /// Always the PVM compatibility variant.
    Pvm,
    /// Never: the hardware kernel and command line.
    Off,
}

impl Compat {
    pub fn as_str(self) -> &'static str {
        match self {
            Compat::Auto => "auto",
            Compat::Pvm => "pvm",
            Compat::Off => "off",
        }
    }

    pub fn resolve(self) -> Result<bool, Arc<ProbeError>> {
        match self {
            Compat::Auto => ring0_emulated(),
            Compat::Pvm => Ok(true),
            Compat::Off => Ok(false),
        }
    }
}

impl std::str::FromStr for Compat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Compat::Auto),
            "pvm" => Ok(Compat::Pvm),
            "off" => Ok(Compat::Off),
            _ => Err(format!("{s:?}: use auto, pvm or off")),
        }
    }
}

impl std::fmt::Display for Compat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which KVM this is: its module, and what this machine itself runs on.
pub fn kvm_kind() -> String {
    let module = ["kvm_intel", "kvm_amd", "kvm_pvm"]
        .into_iter()
        .find(|m| std::path::Path::new("/sys/module").join(m).exists())
        .unwrap_or("an unknown KVM module");
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_default();
    let virtualised = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .is_some_and(|l| l.split_whitespace().any(|f| f == "hypervisor"));
    let under = if model.contains("QEMU TCG") {
        ", nested under QEMU's software emulator (TCG-emulated SVM/VMX: timings say nothing about real hardware)"
    } else if module == "kvm_pvm" {
        ", nested (PVM: guest ring 0 is emulated)"
    } else if virtualised {
        ", nested in a VM"
    } else {
        ""
    };
    format!("{module}{under}")
}

/// A short label for figures and test results: which kind of KVM they were taken on.
pub fn kvm_label(ring0_emulated: bool) -> &'static str {
    let tcg = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("model name") && l.contains("QEMU TCG"));
    match (ring0_emulated, tcg) {
        (true, _) => "PVM-emulated ring 0",
        (false, true) => "TCG-emulated SVM",
        (false, false) => "hardware KVM",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_cmdline_drops_comments() {
        let c = pvm_cmdline();
        assert!(c.contains("clearcpuid="));
        assert!(!c.contains('#'));
        assert!(!c.contains('\n'));
        // The kernel truncates a clearcpuid= value of 128 characters or more.
        for word in c.split_whitespace() {
            if let Some(v) = word.strip_prefix("clearcpuid=") {
                assert!(v.len() < 128, "clearcpuid value is {} chars", v.len());
            }
        }
    }

    #[test]
    fn threshold_separates_the_two_regimes() {
        let native = RingProbe {
            ring0_ns_per_iter: 2.5,
            ring3_ns_per_iter: 0.4,
        };
        let pvm = RingProbe {
            ring0_ns_per_iter: 4300.0,
            ring3_ns_per_iter: 0.4,
        };
        assert!(!native.ring0_emulated());
        assert!(pvm.ring0_emulated());
    }
}
