//! Helpers shared by the end-to-end tests: finding the images, skipping honestly, and timing the
//! stages of a boot from what the console shows.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vmrun::devices::legacy::ConsoleTail;

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
    let pvm = match vmrun::compat::ring0_emulated() {
        Ok(p) => p,
        Err(e) => return skip(format!("no usable KVM ({e})")),
    };
    let kernel = vmrun::images::default_kernel(pvm);
    let initrd = vmrun::images::default_initramfs();
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
