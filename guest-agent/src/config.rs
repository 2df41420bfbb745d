//! Where the agent works: the root guest paths resolve in, the upper layer it captures, and
//! whether commands are chrooted (host tests) and a shutdown ends the process (in a VM).

use std::path::{Component, Path, PathBuf};

use vmrun_protocol::agent::{ErrorInfo, ErrorKind};

/// Where the agent works.
#[derive(Clone, Debug)]
pub struct Config {
    /// The root the guest's paths are resolved in: `/` in a VM.
    pub root: PathBuf,
    /// The overlay upper directory, as a guest path.
    pub upper: PathBuf,
    /// Run commands chrooted into `root` (needed when `root` is not `/`).
    pub chroot: bool,
    /// End the process once a shutdown is answered (in a VM: the init then reports and the VM
    /// stops). Otherwise `serve` returns.
    pub exit_on_shutdown: bool,
}

impl Config {
    pub fn guest() -> Self {
        Config {
            root: "/".into(),
            upper: "/.overlayfs/upperfs/upper".into(),
            chroot: false,
            exit_on_shutdown: true,
        }
    }

    /// Maps a guest path (absolute, no `..`) into the agent's view.
    pub fn resolve(&self, guest_path: &str) -> Result<PathBuf, ErrorInfo> {
        let p = Path::new(guest_path);
        let bad = |why: &str| ErrorInfo {
            kind: ErrorKind::InvalidInput,
            errno: 0,
            message: format!("path {guest_path:?}: {why}"),
        };
        if !p.is_absolute() {
            return Err(bad("must be absolute"));
        }
        if p.components().any(|c| c == Component::ParentDir) {
            return Err(bad("must not contain '..'"));
        }
        Ok(self.root.join(p.strip_prefix("/").unwrap_or(p)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_under_the_root() {
        let c = Config {
            root: "/srv/r".into(),
            upper: "/u".into(),
            chroot: true,
            exit_on_shutdown: false,
        };
        assert_eq!(c.resolve("/etc/x").unwrap(), PathBuf::from("/srv/r/etc/x"));
        assert_eq!(c.resolve("/").unwrap(), PathBuf::from("/srv/r"));
        assert!(c.resolve("etc/x").is_err());
        assert!(c.resolve("/a/../../x").is_err());
        assert_eq!(Config::guest().resolve("/a").unwrap(), PathBuf::from("/a"));
    }
}
