//! What a person sees while a VM starts: on a terminal, one line with the phase reached and
//! the time so far, cleared when the VM is ready; where this host emulates guest ring 0, a
//! note once with the wait to expect. Quiet when stderr is not a terminal, unless `-v`.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use vmrun::api::{Phase, VmBuilder};
use vmrun::host::compat;

/// Shows the start of `builder`'s VM; returns the builder with the progress callback set, and
/// the bar to clear once the VM is up (or failed).
pub fn attach(builder: VmBuilder, what: &str) -> (VmBuilder, Option<ProgressBar>) {
    let terminal = std::io::stderr().is_terminal();
    let verbose = super::verbose() > 0;
    if !terminal && !verbose {
        return (builder, None);
    }
    if let Ok(p) = compat::probe_cached() {
        if p.ring0_emulated() {
            eprintln!(
                "vmrun: this host's KVM emulates guest ring 0 (nested PVM, {:.0} ns per ring-0 \
                 step); a VM takes about {}s to start here. Start one with `vmrun start` and \
                 run commands in it with `vmrun exec NAME` to pay that once.",
                p.ring0_ns_per_iter,
                p.expected_start().as_secs()
            );
        }
    }
    if !terminal {
        let what = what.to_string();
        let b = builder.on_progress(move |phase, t| {
            eprintln!(
                "vmrun: {what}: {} after {:.1}s",
                phase.describe(),
                t.as_secs_f64()
            );
        });
        return (b, None);
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {prefix}: {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_prefix(format!("vmrun: starting {what}"));
    bar.set_message("launching the VMM");
    bar.enable_steady_tick(Duration::from_millis(120));
    let b2 = bar.clone();
    let b = builder.on_progress(move |phase: Phase, _| {
        b2.set_message(phase.describe());
    });
    (b, Some(bar))
}

/// Clears the progress line (the prompt or the output takes its place).
pub fn done(bar: Option<ProgressBar>) {
    if let Some(b) = bar {
        b.finish_and_clear();
    }
}
