//! `vmrun doctor`: what this host can do — KVM, whether guest ring 0 runs at hardware speed, the
//! images, and which test tiers can run here.

use std::fmt::Write as _;

use vmrun::host::compat::{self, RingProbe};
use vmrun::launch::images;
use vmrun::vstate::vm;

pub struct Report {
    pub kvm_kind: String,
    pub kvm: Result<(), String>,
    pub probe: Option<Result<RingProbe, String>>,
    pub images: Vec<(&'static str, std::path::PathBuf, bool)>,
    pub root: bool,
    pub overlayfs: bool,
    pub loop_devices: bool,
    /// Whether the VMM's seccomp filters build and install here (tried on a throwaway thread).
    pub seccomp: Result<usize, String>,
    /// Whether VMMs can be jailed here, and with which cgroup limits.
    pub jail: Result<String, String>,
}

/// Builds the VMM's filters and installs the strictest on a thread of its own.
fn try_seccomp() -> Result<usize, String> {
    let f = vmrun::seccomp::Filters::build().map_err(|e| e.to_string())?;
    let len = f.vcpu.len();
    std::thread::spawn(move || vmrun::seccomp::apply("vCPU", &f.vcpu).map_err(|e| e.to_string()))
        .join()
        .map_err(|_| "the probe thread panicked".to_string())??;
    Ok(len)
}

impl Report {
    pub fn gather() -> Report {
        let kvm = vm::open_kvm()
            .and_then(|k| vm::create_vm(&k).map(drop))
            .map_err(|e| e.to_string());
        let probe = kvm
            .is_ok()
            .then(|| compat::probe().map_err(|e| e.to_string()));
        let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
        Report {
            kvm_kind: compat::kvm_kind(),
            kvm,
            probe,
            images: images::inventory(),
            // SAFETY: geteuid has no preconditions and cannot fail.
            root: unsafe { libc::geteuid() } == 0,
            overlayfs: filesystems
                .lines()
                .any(|l| l.trim_end().ends_with("overlay")),
            loop_devices: std::path::Path::new("/dev/loop-control").exists(),
            seccomp: try_seccomp(),
            jail: vmrun::jail::probe().map(|()| vmrun::jail::cgroup_report()),
        }
    }

    fn emulated(&self) -> Option<bool> {
        match &self.probe {
            Some(Ok(p)) => Some(p.ring0_emulated()),
            _ => None,
        }
    }

    fn has(&self, name: &str) -> bool {
        self.images.iter().any(|(n, _, ok)| *n == name && *ok)
    }

    pub fn render(&self) -> String {
        let mut o = String::new();
        let ok = |b: bool| if b { "ok " } else { "-- " };
        match &self.kvm {
            Ok(()) => {
                let _ = writeln!(
                    o,
                    "ok  /dev/kvm: usable (VM with IRQ chip and PIT created); KVM: {}",
                    self.kvm_kind
                );
            }
            Err(e) => {
                let _ = writeln!(o, "--  /dev/kvm: {e}");
            }
        }
        match &self.probe {
            Some(Ok(p)) => {
                let _ = writeln!(
                    o,
                    "{}  guest ring 0: {:.1} ns/iteration vs ring 3 {:.2} ns/iteration: {}",
                    ok(true),
                    p.ring0_ns_per_iter,
                    p.ring3_ns_per_iter,
                    if p.ring0_emulated() {
                        "EMULATED (nested PVM or similar): the PVM compatibility kernel variant is used"
                    } else {
                        "hardware speed: the hardware kernel is used"
                    }
                );
                let _ = writeln!(
                    o,
                    "    expect here, from that measure: a VM start (boot to agent ready) of about {:.0} s, an `exec true` of about {}",
                    p.expected_start().as_secs_f64(),
                    fmt_duration(p.expected_exec())
                );
            }
            Some(Err(e)) => {
                let _ = writeln!(o, "--  guest ring-0 probe failed: {e}");
            }
            None => o.push_str("--  guest ring-0 probe: skipped (no KVM)\n"),
        }
        match &self.seccomp {
            Ok(n) => {
                let _ = writeln!(
                    o,
                    "ok  seccomp: on; every VMM thread installs its allow-list (vCPU: {n} BPF instructions; event loop, control, main), a call outside it stops the VMM with the thread and call named; --no-seccomp turns it off"
                );
            }
            Err(e) => {
                let _ = writeln!(o, "--  seccomp: {e}; VMs need --no-seccomp here");
            }
        }
        match &self.jail {
            Ok(report) => {
                let _ = writeln!(
                    o,
                    "ok  jail: on; each VMM runs in its own PID, mount, network, IPC and UTS namespaces, in an empty root holding only /dev/kvm, its images and its runtime directory, as a fresh unprivileged uid with no capabilities and no_new_privs ({report}); --no-jail turns it off"
                );
            }
            Err(e) => {
                let consequence = if self.root {
                    "VMs start here only with --no-jail"
                } else {
                    "VMs run without it"
                };
                let _ = writeln!(o, "--  jail: {e}; {consequence}");
            }
        }
        o.push_str("images (");
        o.push_str(&images::cache_dir().display().to_string());
        o.push_str("):\n");
        for (name, path, present) in &self.images {
            let _ = writeln!(
                o,
                "  {}{name:<16} {}",
                ok(*present),
                if *present {
                    path.display().to_string()
                } else {
                    "not built (run `vmrun images build`)".into()
                }
            );
        }
        let kvm = self.kvm.is_ok();
        let kernel = match self.emulated() {
            Some(true) => images::KERNEL_PVM,
            _ => images::KERNEL,
        };
        let t4 = kvm && self.has(kernel) && self.has(images::INITRAMFS);
        o.push_str("test tiers:\n");
        let _ = writeln!(o, "  ok T1 unit: always");
        let t2 = self.root && self.overlayfs && self.loop_devices;
        let _ = writeln!(o, "  {}T2 guest code on the host (root, overlayfs, loop devices): root={} overlayfs={} loop={}", ok(t2), self.root, self.overlayfs, self.loop_devices);
        let _ = writeln!(o, "  {}T3 KVM with small test guests", ok(kvm));
        let _ = writeln!(
            o,
            "  {}T4 full Linux guest (needs {kernel} and {})",
            ok(t4),
            images::INITRAMFS
        );
        o
    }
}

fn fmt_duration(d: std::time::Duration) -> String {
    if d.as_secs() >= 1 {
        format!("{:.1} s", d.as_secs_f64())
    } else {
        format!("{} ms", d.as_millis())
    }
}
