//! The agent's capture (the tar writer over an overlay upper layer) fed hostile trees: the
//! input is a list of operations that build a real tree on the host (directories, files of
//! any size up to 64 KiB, symlinks with any target (loops, `..`, absolute), hard links,
//! FIFOs, whiteouts, xattrs including the overlay's opaque mark, names of any bytes). The
//! capture must succeed and its tar must hold exactly the tree: every name relative, no
//! `..`, each file's size and each symlink's target as built. Runs as root (mknod, trusted.*).
#![no_main]

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Component, Path, PathBuf};

use libfuzzer_sys::fuzz_target;
use vmrun_agent::Config;
use vmrun_protocol::agent::DataReader;

/// What the capture must show for a path.
#[derive(Debug, PartialEq)]
enum Want {
    Dir,
    File(u64),
    Link(Vec<u8>),
    Other,
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = usize::from(self.byte().unwrap_or(0))
            .min(max)
            .min(self.0.len());
        let (a, rest) = self.0.split_at(n);
        self.0 = rest;
        a.to_vec()
    }
}

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn build(data: &[u8], upper: &Path) -> BTreeMap<PathBuf, Want> {
    let mut want = BTreeMap::new();
    let mut dirs = vec![PathBuf::new()];
    let mut files: Vec<PathBuf> = Vec::new();
    let mut all: Vec<PathBuf> = Vec::new();
    let mut inp = Input(data);
    for _ in 0..48 {
        let Some(op) = inp.byte() else { break };
        let parent = dirs[usize::from(inp.byte().unwrap_or(0)) % dirs.len()].clone();
        let mut name = inp.bytes(255);
        name.retain(|&b| b != b'/' && b != 0);
        if name.is_empty() || name == b"." || name == b".." {
            name = format!("n{}", all.len()).into_bytes();
        }
        let rel = parent.join(OsStr::from_bytes(&name));
        if want.contains_key(&rel) || rel.components().count() > 12 {
            continue;
        }
        let abs = upper.join(&rel);
        let made = match op % 8 {
            0 => std::fs::create_dir(&abs).is_ok().then(|| {
                dirs.push(rel.clone());
                Want::Dir
            }),
            1 => {
                let len = u64::from(inp.byte().unwrap_or(0)) * 257;
                std::fs::write(&abs, vec![0x5a; len as usize])
                    .is_ok()
                    .then(|| {
                        files.push(rel.clone());
                        Want::File(len)
                    })
            }
            2 => {
                let target = inp.bytes(64);
                let target: Vec<u8> = target.into_iter().filter(|&b| b != 0).collect();
                let target = if target.is_empty() {
                    b"..".to_vec()
                } else {
                    target
                };
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &abs)
                    .is_ok()
                    .then(|| Want::Link(target))
            }
            3 if !files.is_empty() => {
                let first = &files[usize::from(inp.byte().unwrap_or(0)) % files.len()];
                let len = std::fs::metadata(upper.join(first)).map(|m| m.len());
                match (std::fs::hard_link(upper.join(first), &abs), len) {
                    (Ok(()), Ok(len)) => Some(Want::File(len)),
                    _ => None,
                }
            }
            4 => {
                // SAFETY: mkfifo with a NUL-terminated path.
                (unsafe { libc::mkfifo(c(&abs).as_ptr(), 0o644) } == 0).then_some(Want::Other)
            }
            5 => {
                // A whiteout: char device 0/0.
                // SAFETY: mknod with a NUL-terminated path.
                (unsafe { libc::mknod(c(&abs).as_ptr(), libc::S_IFCHR | 0o600, 0) } == 0)
                    .then_some(Want::Other)
            }
            _ if !all.is_empty() => {
                // An xattr on something made earlier: user.*, or the overlay's opaque mark.
                let on = upper.join(&all[usize::from(inp.byte().unwrap_or(0)) % all.len()]);
                let (key, value) = if op % 8 == 6 {
                    let mut k = b"user.".to_vec();
                    k.extend(inp.bytes(32).into_iter().filter(|&b| b != 0));
                    (k, inp.bytes(255))
                } else {
                    (b"trusted.overlay.opaque".to_vec(), b"y".to_vec())
                };
                let k = CString::new(key).unwrap();
                // SAFETY: lsetxattr with NUL-terminated strings and a value of its length.
                unsafe {
                    libc::lsetxattr(
                        c(&on).as_ptr(),
                        k.as_ptr(),
                        value.as_ptr().cast(),
                        value.len(),
                        0,
                    )
                };
                None
            }
            _ => None,
        };
        if let Some(w) = made {
            want.insert(rel.clone(), w);
            all.push(rel);
        }
    }
    want
}

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let upper = dir.path().join("upper");
    std::fs::create_dir(&upper).unwrap();
    let want = build(data, &upper);

    let (mut ours, mut theirs) = UnixStream::pair().unwrap();
    let cfg = Config {
        root: dir.path().to_path_buf(),
        upper: "/upper".into(),
        chroot: false,
        exit_on_shutdown: false,
        root_fd: None,
    };
    let writer = std::thread::spawn(move || vmrun_agent::capture::run(&mut theirs, &cfg));
    let mut buf = Vec::new();
    let mut tar_bytes = Vec::new();
    let streamed = DataReader::new(&mut ours, &mut buf).read_to_end(&mut tar_bytes);
    let wrote = writer.join().unwrap();
    if let Err(e) = wrote {
        panic!("a capture of any tree succeeds, but: {e} ({e:?}); the stream: {streamed:?}");
    }
    streamed.expect("the capture stream is well formed");

    let mut got = BTreeMap::new();
    let mut ar = tar::Archive::new(&tar_bytes[..]);
    for e in ar.entries().expect("a tar") {
        let mut e = e.expect("a tar entry");
        let path = e.path().expect("a path").into_owned();
        assert!(
            path.components()
                .all(|c| matches!(c, Component::Normal(_) | Component::CurDir)),
            "a captured path leaves the tree: {path:?}"
        );
        let w = match e.header().entry_type() {
            tar::EntryType::Directory => Want::Dir,
            tar::EntryType::Regular => {
                let mut n = 0u64;
                let mut chunk = [0u8; 4096];
                loop {
                    let k = e.read(&mut chunk).unwrap();
                    if k == 0 {
                        break;
                    }
                    n += k as u64;
                }
                Want::File(n)
            }
            tar::EntryType::Symlink => {
                Want::Link(e.link_name_bytes().expect("a symlink target").into_owned())
            }
            // A hard link's later names point at its first, already read.
            tar::EntryType::Link => {
                let first = PathBuf::from(OsStr::from_bytes(
                    &e.link_name_bytes().expect("a link target"),
                ));
                let first = first
                    .strip_prefix(".")
                    .map(Path::to_path_buf)
                    .unwrap_or(first);
                match got.get(&first) {
                    Some(Want::File(n)) => Want::File(*n),
                    other => panic!("hard link to {first:?}, which is {other:?}"),
                }
            }
            _ => Want::Other,
        };
        let path = path
            .strip_prefix(".")
            .map(Path::to_path_buf)
            .unwrap_or(path);
        if path.as_os_str().is_empty() {
            continue;
        }
        got.insert(path, w);
    }
    assert_eq!(got, want);
});
