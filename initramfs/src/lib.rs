//! vmrun-init: PID 1 of the vmrun initramfs.
//!
//! This first cut mounts the kernel filesystems, says it is ready on the console and reports
//! status 0 through the status port. The overlay root (`root.overlay=`) builds on it.

pub mod cmdline;
pub mod echo;
pub mod entropy;
pub mod plan;
pub mod report;

use std::fmt;

use vmrun_protocol::cmdline::console::INIT_ERROR;
use vmrun_protocol::status::InitError;

/// A failure of the init: what it was doing, why it failed, and its class for the host.
#[derive(Debug)]
pub struct Failure {
    pub what: String,
    pub why: String,
    pub class: InitError,
}

impl Failure {
    pub fn new(class: InitError, what: impl Into<String>, why: impl fmt::Display) -> Self {
        Failure {
            what: what.into(),
            why: why.to_string(),
            class,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{INIT_ERROR} {}: {}", self.what, self.why)
    }
}

/// The kernel filesystems every later step needs.
pub const KERNEL_MOUNTS: &[(&str, &str, &str)] = &[
    ("proc", "/proc", "proc"),
    ("sysfs", "/sys", "sysfs"),
    ("devtmpfs", "/dev", "devtmpfs"),
    // PTYs for the agent's terminals (moves with /dev into the new root).
    ("devpts", "/dev/pts", "devpts"),
    ("tmpfs", "/run", "tmpfs"),
];

/// Mounts `KERNEL_MOUNTS` under `root`, creating the mountpoints.
pub fn mount_kernel_filesystems(root: &std::path::Path) -> Result<(), Failure> {
    use nix::mount::{mount, MsFlags};
    for (source, target, fstype) in KERNEL_MOUNTS {
        let path = root.join(target.trim_start_matches('/'));
        std::fs::create_dir_all(&path)
            .map_err(|e| Failure::new(InitError::Mount, format!("mkdir {}", path.display()), e))?;
        // Device nodes must open on /dev and /dev/pts (the agent opens a terminal's slave by
        // path when it starts a command on it); everything else is nodev.
        let flags = MsFlags::MS_NOSUID
            | match *fstype {
                "devtmpfs" => MsFlags::empty(),
                "devpts" => MsFlags::MS_NOEXEC,
                _ => MsFlags::MS_NODEV,
            };
        let data = (*fstype == "devpts").then_some("mode=0620,ptmxmode=0666");
        mount(Some(*source), &path, Some(*fstype), flags, data).map_err(|e| {
            Failure::new(
                InitError::Mount,
                format!("mount {fstype} on {}", path.display()),
                e,
            )
        })?;
    }
    Ok(())
}

/// Seconds since boot, from /proc/uptime.
pub fn uptime() -> Option<f64> {
    std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_line_names_what_and_why() {
        let f = Failure::new(
            InitError::Mount,
            "mount proc on /proc",
            "EPERM: Operation not permitted",
        );
        assert_eq!(
            f.to_string(),
            "vmrun-init: error: mount proc on /proc: EPERM: Operation not permitted"
        );
        assert_eq!(f.class, InitError::Mount);
    }
}
