//! Helpers shared by the end-to-end tests: finding the images, skipping honestly, timing the
//! stages of a boot from what the console shows, and reading captured tars.

use std::collections::BTreeMap;
use std::io::Read;
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

/// The built ext4 rootfs, or a skip (a failure with VMRUN_REQUIRE_T4=1).
pub fn t4_rootfs(test: &str) -> Option<PathBuf> {
    let p = std::env::var_os("VMRUN_ROOTFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| vmrun::images::cache_dir().join(vmrun::images::ROOTFS_EXT4));
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
    pub outcome: vmrun::builder::Outcome,
    pub console: String,
    pub secs: f64,
}

/// Boots with `opts` (the `GONDOLIN_ROOT_OVERLAY` value passed as `env`) and waits for the end,
/// at most `limit`.
pub fn boot(opts: &vmrun::launch::LaunchOptions, env: Option<&str>, limit: Duration) -> Booted {
    use vmrun::builder::{Outcome, Vmm};
    use vmrun::devices::legacy::serial::ConsoleSink;
    let t0 = Instant::now();
    let resolved = vmrun::launch::resolve(opts, env).expect("launch options resolve");
    let vmm = Vmm::start(resolved.into_config(opts, ConsoleSink::None)).expect("VM starts");
    let reason = vmm.wait(Some(limit));
    let outcome = Outcome::new(reason, vmm.console(), Some(limit));
    Booted {
        outcome,
        console: vmm.console().text(),
        secs: t0.elapsed().as_secs_f64(),
    }
}

/// sha256 of a file, via the system tool.
pub fn sha256(p: &std::path::Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(p)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
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
