//! `docker cp` semantics over the agent's tar streams: a file or tree goes into a destination
//! directory under its own name, or becomes the destination path when that is not a
//! directory. What comes out of the guest is unpacked with the guest treated as hostile: no
//! entry lands outside the destination, device nodes and FIFOs are skipped, set-id bits and
//! ownership are not carried over to the host.

use std::path::{Component, Path, PathBuf};

use tar::{Archive, Builder, EntryType};

use super::agent::{AgentClient, AgentError};
use vmrun_protocol::agent::{ErrorKind, FileKind};

fn local(what: &'static str) -> impl FnOnce(std::io::Error) -> AgentError {
    move |source| AgentError::Local { what, source }
}

/// The last component of a path, as a name an archive entry can carry.
fn last_component(p: &Path) -> Option<&std::ffi::OsStr> {
    match p.components().next_back()? {
        Component::Normal(n) => Some(n),
        _ => None,
    }
}

/// Guest side: where the tree lands (a directory) and under which top-level name.
fn guest_target(
    agent: &AgentClient,
    src: &Path,
    guest: &str,
) -> Result<(String, String), AgentError> {
    let bad = |why: &str| AgentError::Local {
        what: "copy",
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, why.to_string()),
    };
    let src_name = last_component(src)
        .ok_or_else(|| bad("the source path has no last component to name the copy"))?
        .to_string_lossy()
        .into_owned();
    match agent.stat(guest) {
        Ok(st) if st.kind == FileKind::Dir => Ok((guest.to_string(), src_name)),
        Ok(_) => split_guest(guest).ok_or_else(|| bad("the guest path has no parent")),
        Err(AgentError::Remote(e)) if e.kind == ErrorKind::NotFound => {
            split_guest(guest).ok_or_else(|| bad("the guest path has no parent"))
        }
        Err(e) => Err(e),
    }
}

/// `/a/b/c` → (`/a/b`, `c`).
fn split_guest(p: &str) -> Option<(String, String)> {
    let p = p.trim_end_matches('/');
    let (dir, name) = p.rsplit_once('/')?;
    if name.is_empty() || name == "." || name == ".." {
        return None;
    }
    Some((
        if dir.is_empty() {
            "/".into()
        } else {
            dir.into()
        },
        name.into(),
    ))
}

/// Host → guest. Returns the bytes of file data copied.
pub fn copy_in(agent: &AgentClient, src: &Path, guest: &str) -> Result<u64, AgentError> {
    let meta = std::fs::symlink_metadata(src).map_err(local("copy source"))?;
    let (dir, top) = guest_target(agent, src, guest)?;
    let (_, bytes) = agent.archive_in(&dir, |w| {
        let mut b = Builder::new(w);
        b.follow_symlinks(false);
        b.mode(tar::HeaderMode::Complete);
        if meta.is_dir() {
            b.append_dir_all(&top, src)?;
        } else {
            b.append_path_with_name(src, &top)?;
        }
        b.finish()
    })?;
    Ok(bytes)
}

/// Guest → host. Returns the bytes of file data copied.
pub fn copy_out(agent: &AgentClient, guest: &str, dst: &Path) -> Result<u64, AgentError> {
    // Into an existing directory under the guest name; else as `dst` itself.
    let (into, rename) = if dst.is_dir() {
        (dst.to_path_buf(), None)
    } else {
        let parent = match dst.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = last_component(dst).ok_or_else(|| AgentError::Local {
            what: "copy destination",
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the destination path has no last component",
            ),
        })?;
        (parent, Some(name.to_os_string()))
    };
    // Unpacked in a staging directory beside the destination, then moved into place: a
    // failed copy leaves nothing half-written under the destination's name.
    let staging = tempfile::Builder::new()
        .prefix(".vmrun-cp-")
        .tempdir_in(&into)
        .map_err(local("copy destination"))?;
    let (reader, mut writer) = std::io::pipe().map_err(local("pipe"))?;
    let stage = staging.path().to_path_buf();
    let unpacker = std::thread::spawn(move || unpack_hostile(reader, &stage));
    let sent = agent.archive_out(guest, &mut writer);
    drop(writer);
    let unpacked = unpacker
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the unpacking thread panicked")));
    sent?;
    let (top, bytes) = unpacked.map_err(local("copy destination"))?;
    let top = top.ok_or_else(|| AgentError::Local {
        what: "copy",
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "the guest sent no entries"),
    })?;
    let target = into.join(rename.unwrap_or_else(|| top.clone()));
    if target.is_dir() && !dst.is_dir() {
        let _ = std::fs::remove_dir_all(&target);
    }
    std::fs::rename(staging.path().join(&top), &target).map_err(local("copy destination"))?;
    Ok(bytes)
}

/// Unpacks a tar from the guest into `dst`: entries stay inside it (the tar crate's
/// `unpack_in` checks), device nodes and FIFOs are skipped, modes lose set-id bits.
/// Returns the top-level name and the bytes of file data.
fn unpack_hostile(
    src: impl std::io::Read,
    dst: &Path,
) -> std::io::Result<(Option<std::ffi::OsString>, u64)> {
    let mut a = Archive::new(src);
    a.set_preserve_permissions(false);
    a.set_preserve_ownerships(false);
    a.set_unpack_xattrs(false);
    a.set_overwrite(true);
    let (mut top, mut bytes) = (None, 0u64);
    for e in a.entries()? {
        let mut e = e?;
        let ty = e.header().entry_type();
        if !matches!(
            ty,
            EntryType::Regular
                | EntryType::Directory
                | EntryType::Symlink
                | EntryType::Link
                | EntryType::GNUSparse
        ) {
            continue;
        }
        let path = e.path()?.into_owned();
        let first = match path.components().next() {
            Some(Component::Normal(n)) => n.to_os_string(),
            _ => continue,
        };
        match &top {
            None => top = Some(first),
            Some(t) if *t != first => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("entry {} is outside the copied tree", path.display()),
                ))
            }
            Some(_) => {}
        }
        if !e.unpack_in(dst)? {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "entry {} would land outside the destination",
                    path.display()
                ),
            ));
        }
        if ty == EntryType::Regular {
            bytes += e.header().size().unwrap_or(0);
        }
    }
    Ok((top, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_paths_split_into_directory_and_name() {
        assert_eq!(split_guest("/a/b/c"), Some(("/a/b".into(), "c".into())));
        assert_eq!(split_guest("/c/"), Some(("/".into(), "c".into())));
        assert_eq!(split_guest("/"), None);
        assert_eq!(split_guest("/a/.."), None);
        assert_eq!(split_guest("relative"), None);
    }

    fn raw_tar(entries: &[(&str, EntryType, &[u8], u32)]) -> Vec<u8> {
        let mut b = Builder::new(Vec::new());
        for (name, ty, data, mode) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*ty);
            h.set_size(data.len() as u64);
            h.set_mode(*mode);
            let raw = h.as_old_mut();
            raw.name[..name.len()].copy_from_slice(name.as_bytes());
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn a_hostile_tree_cannot_leave_the_destination_or_plant_devices() {
        let d = tempfile::tempdir().unwrap();
        let t = raw_tar(&[
            ("tree", EntryType::Directory, b"", 0o755),
            ("tree/ok.txt", EntryType::Regular, b"fine", 0o4755),
            ("tree/dev", EntryType::Block, b"", 0o666),
        ]);
        let (top, bytes) = unpack_hostile(t.as_slice(), d.path()).unwrap();
        assert_eq!((top.unwrap(), bytes), ("tree".into(), 4));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.path().join("tree/ok.txt"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7000, 0, "no set-id bits from the guest");
        assert!(!d.path().join("tree/dev").exists(), "no device nodes");
        for bad in [
            raw_tar(&[("tree/../../x", EntryType::Regular, b"x", 0o644)]),
            raw_tar(&[
                ("a", EntryType::Regular, b"1", 0o644),
                ("b", EntryType::Regular, b"2", 0o644),
            ]),
        ] {
            let e = tempfile::tempdir().unwrap();
            assert!(unpack_hostile(bad.as_slice(), e.path()).is_err());
        }
    }
}
