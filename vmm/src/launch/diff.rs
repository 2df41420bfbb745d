//! `vmrun diff`: what an upper layer (a capture tar, or a running VM's upper streamed as one)
//! changed against the stack below it, as `docker diff` shows it: `A` added, `C` changed
//! (modified, or a directory whose entries changed), `D` deleted. The upper alone cannot tell
//! an added path from a changed one, so the stack below (the root image and the layer images)
//! is mounted read-only on the host, in a private mount namespace that goes with the thread
//! that made it.

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use thiserror::Error;

use super::layers::is_erofs;
use super::tarball::{self, Kind, Limits, TarError};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ChangeKind {
    Added,
    Changed,
    Deleted,
}

impl ChangeKind {
    pub fn letter(self) -> char {
        match self {
            ChangeKind::Added => 'A',
            ChangeKind::Changed => 'C',
            ChangeKind::Deleted => 'D',
        }
    }
}

/// One changed path, absolute in the guest's root.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Change {
    pub path: PathBuf,
    pub kind: ChangeKind,
}

#[derive(Debug, Error)]
pub enum DiffError {
    #[error("the upper layer: {0}")]
    Tar(#[from] TarError),
    #[error(
        "mounting the images below the upper needs root (loop devices and mounts); run as root"
    )]
    NotRoot,
    #[error("{what}: {why}")]
    Lower { what: String, why: String },
}

fn lower_err(what: impl Into<String>, why: impl std::fmt::Display) -> DiffError {
    DiffError::Lower {
        what: what.into(),
        why: why.to_string(),
    }
}

/// The changes `upper` (a tar of an overlay upper layer) makes to the tree at `lower`.
pub fn changes(upper: impl Read, lower: &Path) -> Result<Vec<Change>, DiffError> {
    let mut seen: BTreeSet<PathBuf> = BTreeSet::new();
    let mut opaque: Vec<PathBuf> = Vec::new();
    let mut out = Vec::new();
    tarball::for_each(upper, &Limits::default(), |item, _| {
        if item.path.as_os_str().is_empty() {
            return Ok::<(), DiffError>(());
        }
        seen.insert(item.path.clone());
        let below = fs::symlink_metadata(lower.join(&item.path)).is_ok();
        let kind = match item.kind {
            Kind::Whiteout => ChangeKind::Deleted,
            _ if below => ChangeKind::Changed,
            _ => ChangeKind::Added,
        };
        let is_opaque = item
            .xattrs
            .iter()
            .any(|(k, v)| k == b"trusted.overlay.opaque" && v == b"y");
        if item.kind == Kind::Dir && is_opaque && below {
            opaque.push(item.path.clone());
        }
        out.push(Change {
            path: Path::new("/").join(&item.path),
            kind,
        });
        Ok(())
    })?;
    // An opaque directory hides everything below it: what it no longer holds was deleted.
    for dir in opaque {
        let Ok(rd) = fs::read_dir(lower.join(&dir)) else {
            continue;
        };
        for e in rd.flatten() {
            let rel = dir.join(e.file_name());
            if !seen.contains(&rel) {
                out.push(Change {
                    path: Path::new("/").join(rel),
                    kind: ChangeKind::Deleted,
                });
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Changes as text: `A /path` lines, or a JSON array of `{"kind":"A","path":"/path"}`.
pub fn render(changes: &[Change], json: bool) -> String {
    if !json {
        return changes
            .iter()
            .map(|c| format!("{} {}\n", c.kind.letter(), c.path.display()))
            .collect();
    }
    let items: Vec<String> = changes
        .iter()
        .map(|c| {
            format!(
                "{{\"kind\":\"{}\",\"path\":{}}}",
                c.kind.letter(),
                json_string(&c.path.to_string_lossy())
            )
        })
        .collect();
    format!("[{}]\n", items.join(","))
}

/// A JSON string literal (vmrun has no JSON dependency for this one use).
fn json_string(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// Loop devices attached by this process, detached on drop.
struct Loops(Vec<String>);

impl Drop for Loops {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = Command::new("losetup").arg("-d").arg(d).status();
        }
    }
}

/// Runs `f` with the read-only view of `stack` (the root image, then layer images, bottom
/// first), mounted in a private mount namespace of a thread of its own; everything is
/// unmounted and detached afterwards.
pub fn with_lower<T: Send>(
    stack: &[PathBuf],
    f: impl FnOnce(&Path) -> T + Send,
) -> Result<T, DiffError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(DiffError::NotRoot);
    }
    if stack.is_empty() {
        return Err(lower_err("the stack below the upper", "is empty"));
    }
    let dir = tempfile::Builder::new()
        .prefix("vmrun-diff-")
        .tempdir()
        .map_err(|e| lower_err("a temporary directory", e))?;
    let mut loops = Loops(Vec::new());
    for img in stack {
        let out = Command::new("losetup")
            .args(["--find", "--show", "--read-only"])
            .arg(img)
            .output()
            .map_err(|e| lower_err("losetup", e))?;
        if !out.status.success() {
            return Err(lower_err(
                format!("attach {}", img.display()),
                String::from_utf8_lossy(&out.stderr).trim(),
            ));
        }
        loops
            .0
            .push(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    let base = dir.path().to_path_buf();
    let devs = loops.0.clone();
    let r = std::thread::scope(|s| {
        s.spawn(move || -> Result<T, DiffError> {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
                .map_err(|e| lower_err("a private mount namespace", e))?;
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .map_err(|e| lower_err("a private mount namespace", e))?;
            let mut dirs = Vec::new();
            for (i, (dev, img)) in devs.iter().zip(stack).enumerate() {
                let at = base.join(i.to_string());
                fs::create_dir(&at).map_err(|e| lower_err("mkdir", e))?;
                let (fstype, data) = if is_erofs(img) {
                    ("erofs", None)
                } else {
                    ("ext4", Some("noload"))
                };
                mount(
                    Some(dev.as_str()),
                    &at,
                    Some(fstype),
                    MsFlags::MS_RDONLY,
                    data,
                )
                .map_err(|e| lower_err(format!("mount {} ({fstype})", img.display()), e))?;
                dirs.push(at);
            }
            let view = if dirs.len() == 1 {
                dirs[0].clone()
            } else {
                let v = base.join("view");
                fs::create_dir(&v).map_err(|e| lower_err("mkdir", e))?;
                let lowers: Vec<String> =
                    dirs.iter().rev().map(|d| d.display().to_string()).collect();
                let data = format!("lowerdir={}", lowers.join(":"));
                mount(
                    Some("overlay"),
                    &v,
                    Some("overlay"),
                    MsFlags::MS_RDONLY,
                    Some(data.as_str()),
                )
                .map_err(|e| lower_err("mount the layer stack (overlayfs)", e))?;
                dirs.push(v.clone());
                v
            };
            let r = f(&view);
            for d in dirs.iter().rev() {
                let _ = umount2(d, MntFlags::MNT_DETACH);
            }
            Ok(r)
        })
        .join()
    });
    drop(loops);
    match r {
        Ok(r) => r,
        Err(p) => std::panic::resume_unwind(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(entries: &[(tar::EntryType, &str, Option<&[u8]>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (ty, name, xattr) in entries {
            if let Some(v) = xattr {
                let mut rec = format!("{:02} SCHILY.xattr.trusted.overlay.opaque=", 0).into_bytes();
                rec.extend_from_slice(v);
                rec.push(b'\n');
                let len = rec.len();
                rec[..2].copy_from_slice(format!("{len:02}").as_bytes());
                let mut h = tar::Header::new_ustar();
                h.set_path("PaxHeaders/x").unwrap();
                h.set_entry_type(tar::EntryType::XHeader);
                h.set_size(len as u64);
                h.set_mode(0o644);
                h.set_uid(0);
                h.set_gid(0);
                h.set_mtime(0);
                h.set_cksum();
                b.append(&h, rec.as_slice()).unwrap();
            }
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*ty);
            h.set_path(name).unwrap();
            h.set_mode(0o755);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_size(0);
            h.set_cksum();
            b.append(&h, std::io::empty()).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn added_changed_deleted_and_an_opaque_directory() {
        let lower = tempfile::tempdir().unwrap();
        for d in ["etc/skel", "data"] {
            fs::create_dir_all(lower.path().join(d)).unwrap();
        }
        for f in [
            "etc/hostname",
            "etc/issue",
            "etc/skel/.bashrc",
            "etc/skel/.profile",
        ] {
            fs::write(lower.path().join(f), "x").unwrap();
        }
        use tar::EntryType as T;
        let t = tar_of(&[
            (T::Directory, ".", None),
            (T::Directory, "etc", None),
            (T::Regular, "etc/hostname", None),
            (T::Char, "etc/issue", None),
            (T::Directory, "etc/skel", Some(b"y")),
            (T::Regular, "etc/skel/.profile", None),
            (T::Regular, "etc/skel/only", None),
            (T::Regular, "new.txt", None),
        ]);
        let c = changes(t.as_slice(), lower.path()).unwrap();
        let text = render(&c, false);
        assert_eq!(
            text,
            "C /etc\nC /etc/hostname\nD /etc/issue\nC /etc/skel\nD /etc/skel/.bashrc\n\
             C /etc/skel/.profile\nA /etc/skel/only\nA /new.txt\n"
        );
        let json = render(&c[..2], true);
        assert_eq!(
            json,
            "[{\"kind\":\"C\",\"path\":\"/etc\"},{\"kind\":\"C\",\"path\":\"/etc/hostname\"}]\n"
        );
        assert_eq!(json_string("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }
}
