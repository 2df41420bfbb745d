//! The container's root filesystem as a VM's root disk. containerd hands the shim its rootfs
//! as mounts (an overlay of the image's unpacked layers, from its snapshotter) or as a
//! populated `rootfs/` directory; a guest cannot see host directories, so the tree is packed
//! into a read-only erofs image, which the VM boots under a tmpfs upper layer of its own. An
//! overlay whose upper directory is empty (a fresh container) is the image's layers and
//! nothing else: its erofs is cached by the layer directories (committed snapshots never
//! change) and built once per image; any other tree is packed for this container and removed
//! with it.

use std::fs;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use sha2::{Digest, Sha256};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum RootfsError {
    #[error("rootfs mount {0:?}: vmrun packs an overlay or bind rootfs (one mount); use the overlayfs or native snapshotter")]
    Unsupported(String),
    #[error("mount the rootfs on {target}: {source}")]
    Mount {
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "mkfs.erofs is missing: apt-get install erofs-utils (it packs the container's rootfs)"
    )]
    NoMkfs,
    #[error("mkfs.erofs {0}")]
    Mkfs(String),
}

/// One of containerd's rootfs mounts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootMount {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// The image the VM boots and whether it is this container's own (removed at delete).
#[derive(Debug, PartialEq, Eq)]
pub struct RootImage {
    pub path: PathBuf,
    pub owned: bool,
}

fn option<'a>(m: &'a RootMount, key: &str) -> Option<&'a str> {
    m.options
        .iter()
        .find_map(|o| o.strip_prefix(key)?.strip_prefix('='))
}

fn dir_is_empty(p: &Path) -> bool {
    fs::read_dir(p)
        .map(|mut d| d.next().is_none())
        .unwrap_or(true)
}

/// The cache key of a fresh overlay rootfs: its layer directories, in order.
fn cache_key(m: &RootMount) -> Option<String> {
    if m.kind != "overlay" {
        return None;
    }
    let lower = option(m, "lowerdir")?;
    if option(m, "upperdir").is_some_and(|u| !dir_is_empty(Path::new(u))) {
        return None;
    }
    Some(vmrun::launch::layers::hex(&Sha256::digest(
        lower.as_bytes(),
    )))
}

fn pack(tree: &Path, out: &Path) -> Result<(), RootfsError> {
    let tmp = out.with_extension("erofs.partial");
    let r = vmrun::launch::layers::mkfs(tree, &tmp).map_err(|e| match e {
        None => RootfsError::NoMkfs,
        Some(why) => RootfsError::Mkfs(why),
    });
    if let Err(e) = r {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, out).map_err(|source| RootfsError::Io {
        what: "rename",
        path: out.to_path_buf(),
        source,
    })
}

/// Mounts `m` on `target`, packs the tree into `out`, and unmounts.
fn pack_mounted(m: &RootMount, target: &Path, out: &Path) -> Result<(), RootfsError> {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in &m.options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => {}
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            other => data.push(other),
        }
    }
    let data = data.join(",");
    let fstype = (m.kind != "bind").then_some(m.kind.as_str());
    mount(
        Some(m.source.as_str()),
        target,
        fstype,
        flags,
        (!data.is_empty()).then_some(data.as_str()),
    )
    .map_err(|source| RootfsError::Mount {
        target: target.to_path_buf(),
        source,
    })?;
    let r = pack(target, out);
    let _ = umount2(target, MntFlags::MNT_DETACH);
    r
}

/// The root image for the container in `bundle` whose rootfs is `mounts` (`cache`: where
/// images of fresh overlays are kept).
pub fn root_image(
    bundle: &Path,
    mounts: &[RootMount],
    cache: &Path,
) -> Result<RootImage, RootfsError> {
    let target = bundle.join("rootfs");
    let own = bundle.join("vmrun-root.erofs");
    match mounts {
        [] => {
            pack(&target, &own)?;
            Ok(RootImage {
                path: own,
                owned: true,
            })
        }
        [m] if m.kind == "overlay" || m.kind == "bind" => {
            fs::create_dir_all(&target).map_err(|source| RootfsError::Io {
                what: "create",
                path: target.clone(),
                source,
            })?;
            match cache_key(m) {
                Some(key) => {
                    let path = cache.join(format!("{key}.erofs"));
                    if !path.is_file() {
                        fs::create_dir_all(cache).map_err(|source| RootfsError::Io {
                            what: "create",
                            path: cache.to_path_buf(),
                            source,
                        })?;
                        pack_mounted(m, &target, &path)?;
                    }
                    Ok(RootImage { path, owned: false })
                }
                None => {
                    pack_mounted(m, &target, &own)?;
                    Ok(RootImage {
                        path: own,
                        owned: true,
                    })
                }
            }
        }
        [m] => Err(RootfsError::Unsupported(m.kind.clone())),
        _ => Err(RootfsError::Unsupported(format!("{} mounts", mounts.len()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlay(lower: &str, upper: &Path) -> RootMount {
        RootMount {
            kind: "overlay".into(),
            source: "overlay".into(),
            options: vec![
                "index=off".into(),
                format!("lowerdir={lower}"),
                format!("upperdir={}", upper.display()),
                "workdir=/w".into(),
            ],
        }
    }

    #[test]
    fn only_a_fresh_overlay_is_cached_by_its_layers() {
        let d = tempfile::tempdir().unwrap();
        let up = d.path().join("up");
        fs::create_dir(&up).unwrap();
        let a = cache_key(&overlay("/s/2/fs:/s/1/fs", &up)).unwrap();
        let b = cache_key(&overlay("/s/3/fs:/s/1/fs", &up)).unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        fs::write(up.join("written"), b"x").unwrap();
        assert_eq!(cache_key(&overlay("/s/2/fs:/s/1/fs", &up)), None);
        let bind = RootMount {
            kind: "bind".into(),
            source: "/x".into(),
            options: vec!["rbind".into()],
        };
        assert_eq!(cache_key(&bind), None);
    }

    #[test]
    fn unsupported_rootfs_mounts_are_named() {
        let d = tempfile::tempdir().unwrap();
        let m = RootMount {
            kind: "zfs".into(),
            source: "pool/x".into(),
            options: vec![],
        };
        let e = root_image(d.path(), &[m.clone(), m], d.path()).unwrap_err();
        assert!(e.to_string().contains("2 mounts"), "{e}");
    }
}
