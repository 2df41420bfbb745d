//! Where the built guest images live: `$VMRUN_CACHE` or `~/.cache/vmrun`, where
//! `scripts/build-images.sh` leaves stable names (symlinks into directories keyed by the hash of
//! their inputs).

use std::path::PathBuf;

/// The image cache directory.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VMRUN_CACHE") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache").join("vmrun")
}

/// Names of the images inside the cache directory.
pub const KERNEL: &str = "vmlinux";
pub const KERNEL_PVM: &str = "vmlinux-pvm";
pub const INITRAMFS: &str = "initramfs.cpio";
pub const ROOTFS_EXT4: &str = "rootfs.ext4";
pub const ROOTFS_EROFS: &str = "rootfs.erofs";

/// The default kernel: `VMRUN_KERNEL`, else the cached build for this kind of host.
pub fn default_kernel(pvm: bool) -> PathBuf {
    std::env::var_os("VMRUN_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join(if pvm { KERNEL_PVM } else { KERNEL }))
}

/// The default initramfs: `VMRUN_INITRAMFS`, else the cached build.
pub fn default_initramfs() -> PathBuf {
    std::env::var_os("VMRUN_INITRAMFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join(INITRAMFS))
}

/// The default root filesystem: `VMRUN_ROOTFS`, else the cached ext4 build.
pub fn default_rootfs() -> PathBuf {
    std::env::var_os("VMRUN_ROOTFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join(ROOTFS_EXT4))
}

/// Whether `kernel` is a PVM-variant kernel vmrun built (the only kind known to run where
/// guest ring 0 is emulated).
pub fn is_pvm_build(kernel: &std::path::Path) -> bool {
    let Ok(k) = kernel.canonicalize() else {
        return false;
    };
    let cache = cache_dir().canonicalize().unwrap_or_else(|_| cache_dir());
    k.strip_prefix(&cache).ok().is_some_and(|rel| {
        rel.components()
            .next()
            .is_some_and(|c| c.as_os_str().to_string_lossy().starts_with("kernel-pvm-"))
    })
}

/// Every image with whether it is present.
pub fn inventory() -> Vec<(&'static str, PathBuf, bool)> {
    let dir = cache_dir();
    [KERNEL, KERNEL_PVM, INITRAMFS, ROOTFS_EXT4, ROOTFS_EROFS]
        .into_iter()
        .map(|n| {
            let p = dir.join(n);
            let ok = p.exists();
            (n, p, ok)
        })
        .collect()
}

/// The repository's scripts directory (images are built from the source tree).
pub fn scripts_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("scripts")
}
