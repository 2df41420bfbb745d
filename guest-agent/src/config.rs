//! Where the agent works: the root guest paths resolve in, the upper layer it captures, and
//! whether commands are chrooted (host tests) and a shutdown ends the process (in a VM).

use std::cell::Cell;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use vmrun_protocol::agent::{ErrorInfo, ErrorKind};

/// Where the agent works.
#[derive(Clone, Debug)]
pub struct Config {
    /// The root the guest's paths are resolved in: `/` in a VM.
    pub root: PathBuf,
    /// The overlay upper directory, as a guest path.
    pub upper: PathBuf,
    /// Rooted mode (`root` is not `/`: `--root DIR`, host tests, a host-side agent): every
    /// thread that serves a request first makes `root` its own root (`confine_thread`), so the
    /// kernel resolves every path, symlinks and all, inside it, and commands inherit that root.
    /// Off with another root (unprivileged unit tests only) paths are joined to `root` and a
    /// symlink inside can lead out: never a mode to serve peers in.
    pub chroot: bool,
    /// End the process once a shutdown is answered (in a VM: the init then reports and the VM
    /// stops). Otherwise `serve` returns.
    pub exit_on_shutdown: bool,
    /// The root directory, opened before any thread is confined (`serve` opens it): a thread
    /// that inherited a confined context can still reach it.
    pub root_fd: Option<Arc<OwnedFd>>,
}

impl Config {
    pub fn guest() -> Self {
        Config {
            root: "/".into(),
            upper: "/.overlayfs/upperfs/upper".into(),
            chroot: false,
            exit_on_shutdown: true,
            root_fd: None,
        }
    }

    /// Opens the root for [`Config::confine_thread`] (rooted mode; before any confinement).
    pub fn open_root(&mut self) -> std::io::Result<()> {
        if self.chroot && self.root_fd.is_none() {
            let dir = std::fs::File::open(&self.root)?;
            self.root_fd = Some(Arc::new(OwnedFd::from(dir)));
        }
        Ok(())
    }

    /// In rooted mode, gives the calling thread a filesystem context of its own
    /// (`unshare(CLONE_FS)`) whose root is `root`: a symlink in the tree that points at `/tmp`
    /// then means the tree's `/tmp`, as it would for the guest. Once per thread.
    pub fn confine_thread(&self) -> Result<(), ErrorInfo> {
        thread_local! {
            static CONFINED: Cell<bool> = const { Cell::new(false) };
        }
        if !self.chroot || CONFINED.get() {
            return Ok(());
        }
        let fail = |what: &str| ErrorInfo {
            kind: ErrorKind::Io,
            errno: std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
            message: format!(
                "cannot confine the agent to {}: {what}: {} (rooted mode needs CAP_SYS_CHROOT)",
                self.root.display(),
                std::io::Error::last_os_error()
            ),
        };
        let opened;
        let root = match &self.root_fd {
            Some(fd) => fd.as_raw_fd(),
            None => {
                opened = std::fs::File::open(&self.root).map_err(|_| fail("open"))?;
                opened.as_raw_fd()
            }
        };
        // SAFETY: unshare(CLONE_FS) only copies this thread's root/cwd/umask context (which it
        // may share with the thread that spawned it); fchdir takes an open directory fd, chroot
        // and chdir valid NUL-terminated paths. Other threads keep their own context.
        unsafe {
            if libc::unshare(libc::CLONE_FS) < 0 {
                return Err(fail("unshare(CLONE_FS)"));
            }
            if libc::fchdir(root) < 0 {
                return Err(fail("fchdir"));
            }
            if libc::chroot(c".".as_ptr()) < 0 {
                return Err(fail("chroot"));
            }
            if libc::chdir(c"/".as_ptr()) < 0 {
                return Err(fail("chdir /"));
            }
        }
        CONFINED.set(true);
        Ok(())
    }

    /// Maps a guest path (absolute, no `..`) into the agent's view: itself in a VM and, in
    /// rooted mode, on a thread confined to the root (done here first).
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
        if self.chroot {
            self.confine_thread()?;
            return Ok(p.to_path_buf());
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
            chroot: false,
            exit_on_shutdown: false,
            root_fd: None,
        };
        assert_eq!(c.resolve("/etc/x").unwrap(), PathBuf::from("/srv/r/etc/x"));
        assert_eq!(c.resolve("/").unwrap(), PathBuf::from("/srv/r"));
        assert!(c.resolve("etc/x").is_err());
        assert!(c.resolve("/a/../../x").is_err());
        assert_eq!(Config::guest().resolve("/a").unwrap(), PathBuf::from("/a"));
    }

    /// A confined thread sees the root as `/`: an absolute symlink inside it stays inside.
    /// (Root only: chroot needs CAP_SYS_CHROOT.)
    #[test]
    fn a_confined_thread_resolves_symlinks_inside_the_root() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: chroot needs root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("tmp")).unwrap();
        std::os::unix::fs::symlink("/tmp", d.path().join("lnk")).unwrap();
        let mut c = Config {
            root: d.path().into(),
            upper: "/u".into(),
            chroot: true,
            exit_on_shutdown: false,
            root_fd: None,
        };
        c.open_root().unwrap();
        let marker = format!("vmrun-confine-{}", std::process::id());
        let m = marker.clone();
        std::thread::spawn(move || {
            let p = c.resolve(&format!("/lnk/{m}")).unwrap();
            std::fs::write(p, b"x").unwrap();
            // A thread spawned by a confined one shares its context, and confines itself
            // just the same.
            let c2 = c.clone();
            std::thread::spawn(move || {
                std::fs::write(c2.resolve("/tmp/second").unwrap(), b"y").unwrap();
            })
            .join()
            .unwrap();
        })
        .join()
        .unwrap();
        assert!(d.path().join("tmp/second").exists());
        assert!(d.path().join("tmp").join(&marker).exists());
        assert!(
            !Path::new("/tmp").join(&marker).exists(),
            "escaped the root"
        );
        // This thread was not confined.
        assert!(d.path().join("tmp").exists());
    }
}
