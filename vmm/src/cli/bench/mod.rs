//! `vmrun bench`: what vmrun costs, as median and p99 over repeated runs. Host-side figures
//! (VMM start, the agent over its host transport, the vsock device model) are measured on any
//! host; guest figures only where the host runs guest ring 0 at speed, since elsewhere they
//! would measure KVM's instruction emulator.

mod agent;
mod guest;
mod layers;
pub mod profile;
pub mod snapshot;
mod table;
mod vmm;
mod vsock;

use table::render;
pub use table::Scale;

/// The bench's groups of rows (`vmrun bench --only`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Group {
    /// VMM spawn and RSS.
    Vmm,
    /// The agent over its host transport.
    Agent,
    /// The vsock device model.
    Vsock,
    /// Boot, exec and upload inside a VM.
    Guest,
    /// Snapshot create, restore, forks.
    Snapshot,
    /// Capture tar → layer image; boots with stacked layers.
    Layers,
}

/// The host's KVM, for the header: what the guest figures (if any) measure.
fn kvm_kind() -> (String, bool) {
    let module = vmrun::host::compat::kvm_kind();
    let kind = match vmrun::host::compat::probe() {
        Ok(p) if p.ring0_emulated() => (
            format!(
                "guest ring 0 emulated ({:.0} ns per ring-0 loop iteration, {:.2} ns in ring 3)",
                p.ring0_ns_per_iter, p.ring3_ns_per_iter
            ),
            false,
        ),
        Ok(p) => (
            format!(
                "guest ring 0 at speed ({:.2} ns per ring-0 loop iteration)",
                p.ring0_ns_per_iter
            ),
            true,
        ),
        Err(e) => (format!("KVM unavailable ({e})"), false),
    };
    (format!("{module}; {}", kind.0), kind.1)
}

/// Whether this machine's own CPU is QEMU's software emulator: then every row, host-side
/// ones included, times the emulator and no target can be judged.
fn cpu_emulated() -> bool {
    vmrun::host::compat::kvm_label(false) == "TCG-emulated SVM"
}

/// Runs every row and prints the table; `guest` forces the in-VM rows on a host that
/// emulates ring 0 (they are then labelled as emulator figures).
pub fn run(scale: Scale, guest: bool, only: &[Group]) -> String {
    let (kind, at_speed) = kvm_kind();
    let judged = !cpu_emulated();
    let header = format!(
        "vmrun bench{} — host KVM: {kind}\n(median and p99 over n runs; throughput p99 is the slow tail){}",
        if scale.quick { " --quick" } else { "" },
        if judged {
            ""
        } else {
            "\nthis CPU is QEMU's software emulator: every figure times it, so targets are not judged"
        }
    );
    // The table (header included) goes to stdout once, at the end; stderr only says that
    // measuring has begun.
    eprintln!(
        "vmrun bench: measuring ({})…",
        if scale.quick {
            "a few seconds"
        } else {
            "about a minute"
        }
    );
    let mut rows = Vec::new();
    let on = |g: Group| only.is_empty() || only.contains(&g);
    if on(Group::Vmm) {
        rows.extend(vmm::rows(scale));
    }
    if on(Group::Agent) {
        rows.extend(agent::rows(scale));
    }
    if on(Group::Vsock) {
        rows.extend(vsock::rows(scale));
    }
    if on(Group::Guest) {
        rows.extend(guest::rows(scale, at_speed, guest));
    }
    if on(Group::Snapshot) {
        rows.extend(snapshot::rows(scale, at_speed, guest));
    }
    if on(Group::Layers) {
        rows.extend(layers::rows(scale, at_speed, guest));
    }
    render(&header, &rows, judged)
}
