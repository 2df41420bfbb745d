//! Host-side helpers for the tests that run guest code on the host (T2) and inspect what a VM
//! produced: commands that must succeed, loop devices, private mount namespaces, checksums,
//! extended attributes and extracting captures with GNU tar.

use std::path::Path;
use std::process::Command;

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};

/// Runs `cmd` and returns its trimmed stdout; a failure fails the test with its stderr.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Whether a command is on PATH.
pub fn has_tool(name: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A T2 test runs when `ok`; otherwise it prints SKIPPED with `why`, or fails when
/// VMRUN_REQUIRE_T2 is set (CI).
pub fn t2_can_run(test: &str, ok: bool, why: impl FnOnce() -> String) -> bool {
    if ok {
        return true;
    }
    let why = why();
    assert!(
        std::env::var_os("VMRUN_REQUIRE_T2").is_none(),
        "{test}: T2 required but {why}"
    );
    eprintln!("SKIPPED {test}: {why}");
    false
}

/// A loop device, detached on drop.
pub struct Loop(pub String);

impl Loop {
    pub fn attach(img: &Path, read_only: bool) -> Loop {
        let mut args = vec!["--find", "--show"];
        if read_only {
            args.push("--read-only");
        }
        let p = img.to_str().expect("image path is UTF-8");
        args.push(p);
        Loop(run("losetup", &args))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// Runs `f` on a thread of its own in a private mount namespace; the namespace and all its
/// mounts go away when the thread ends. A panic in `f` is the caller's.
pub fn in_private_ns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let r = std::thread::spawn(move || {
        unshare(CloneFlags::CLONE_NEWNS).expect("unshare mount namespace");
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .expect("make / private");
        f()
    })
    .join();
    match r {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    }
}

/// sha256 of a file, via the system tool.
pub fn sha256(p: &Path) -> String {
    run("sha256sum", &[p.to_str().expect("path is UTF-8")])
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// One extended attribute of `path` (not following symlinks).
pub fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let c = std::ffi::CString::new(path.to_str()?).ok()?;
    let n = std::ffi::CString::new(name).ok()?;
    let mut buf = [0u8; 256];
    // SAFETY: valid NUL-terminated strings and a buffer of the size passed.
    let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (r >= 0).then(|| buf[..r as usize].to_vec())
}

/// The entry names of a tar archive as three independent readers list them: GNU tar, BusyBox
/// tar (as in Debian and Alpine) and Python's `tarfile`. A reader that refuses the archive
/// fails the test with its message.
pub fn tar_listings(tar: &Path) -> [(&'static str, Vec<String>); 3] {
    let list = |reader: &'static str, cmd: &str, args: &[&str]| {
        let out = Command::new(cmd)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{reader}: {e}"));
        assert!(
            out.status.success(),
            "{reader} refuses the archive: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let names = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim_start_matches("./").trim_end_matches('/').to_string())
            .filter(|l| !l.is_empty() && l != ".")
            .collect::<Vec<_>>();
        (reader, names)
    };
    let t = tar.to_str().expect("path is UTF-8");
    [
        list("GNU tar", "tar", &["-tf", t]),
        list("BusyBox tar", "busybox", &["tar", "-tf", t]),
        list(
            "Python tarfile",
            "python3",
            &[
                "-c",
                "import sys, tarfile; print('\\n'.join(tarfile.open(sys.argv[1]).getnames()))",
                t,
            ],
        ),
    ]
}

/// Extracts a tar archive into `dir` with GNU tar, xattrs included (whiteouts and opaque
/// markers come out as they were).
pub fn gnu_tar_extract(tar: &Path, dir: &Path) {
    let st = Command::new("tar")
        .args(["--xattrs", "--xattrs-include=*", "-xpf"])
        .arg(tar)
        .arg("-C")
        .arg(dir)
        .status()
        .expect("GNU tar runs");
    assert!(st.success(), "GNU tar could not extract {}", tar.display());
}

/// Everything a user sees of a tree, path by path, without following symlinks or crossing into
/// `skip` (top-level names such as `proc`): type, mode, owner, mtime, and a file's size and
/// content hash or a symlink's target. Two views are equal when the trees look the same.
pub fn tree_view(root: &Path, skip: &[&str]) -> std::collections::BTreeMap<String, String> {
    use std::hash::{Hash, Hasher};
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        if skip.iter().any(|s| rel == *s) {
            continue;
        }
        let m = std::fs::symlink_metadata(&p).unwrap();
        let t = m.file_type();
        let what = if t.is_dir() {
            let mut kids: Vec<_> = std::fs::read_dir(&p)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            kids.sort();
            stack.extend(kids);
            "dir".to_string()
        } else if t.is_symlink() {
            format!("link -> {}", std::fs::read_link(&p).unwrap().display())
        } else if t.is_file() {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            std::fs::read(&p).unwrap().hash(&mut h);
            format!("file {} {:016x}", m.len(), h.finish())
        } else if t.is_fifo() {
            "fifo".to_string()
        } else if t.is_char_device() || t.is_block_device() {
            format!("dev {:x}", m.rdev())
        } else {
            "socket".to_string()
        };
        out.insert(
            rel,
            format!(
                "{what} mode {:o} owner {}:{} mtime {}",
                m.mode() & 0o7777,
                m.uid(),
                m.gid(),
                m.mtime()
            ),
        );
    }
    out
}
