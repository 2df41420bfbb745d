//! T2: vmrun-init's mount plan, for real, on the host: loop-mounted ext4 and erofs lower images,
//! tmpfs and ext4 uppers, real overlayfs, each test in a private mount namespace (its own
//! thread) so nothing leaks to the host. Needs root, overlayfs, loop devices and mkfs.ext4 /
//! mkfs.erofs; without them each test prints SKIPPED (a failure when VMRUN_REQUIRE_T2=1).

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use vmrun_init::cmdline::parse;
use vmrun_init::plan::{build_root, LOWER_IN_ROOT, UPPERFS_IN_ROOT};
use vmrun_init::{mount_kernel_filesystems, Failure};
use vmrun_protocol::status::InitError;
use vmrun_tests::host::{has_tool, in_private_ns, is_root, run, sha256, t2_can_run, xattr, Loop};

fn can_run(test: &str) -> bool {
    let root = is_root();
    let overlay = fs::read_to_string("/proc/filesystems")
        .unwrap_or_default()
        .contains("overlay");
    let tools = ["losetup", "mkfs.ext4", "mkfs.erofs"]
        .iter()
        .all(|t| has_tool(t));
    t2_can_run(test, root && overlay && tools, || {
        format!(
            "needs root ({root}), overlayfs ({overlay}), losetup/mkfs.ext4/mkfs.erofs ({tools})"
        )
    })
}

/// The base image's tree: a few files, a directory to replace, and the mountpoints the real
/// image has (`/.overlayfs/*`, `/proc`, ...).
fn base_tree(dir: &Path) {
    for d in [
        "etc",
        "data",
        "dir/sub",
        ".overlayfs/lower",
        ".overlayfs/upperfs",
        "proc",
        "sys",
        "dev",
        "run",
    ] {
        fs::create_dir_all(dir.join(d)).unwrap();
    }
    fs::write(dir.join("etc/hostname"), "base\n").unwrap();
    fs::write(dir.join("data/keep.txt"), "keep\n").unwrap();
    fs::write(dir.join("data/gone.txt"), "gone\n").unwrap();
    fs::write(dir.join("dir/a.txt"), "a\n").unwrap();
    fs::write(dir.join("dir/sub/b.txt"), "b\n").unwrap();
}

enum Kind {
    Ext4,
    Erofs,
}

fn make_lower(work: &Path, kind: Kind) -> PathBuf {
    let tree = work.join("tree");
    base_tree(&tree);
    let t = tree.to_str().unwrap();
    match kind {
        Kind::Ext4 => {
            let img = work.join("lower.ext4");
            run(
                "mkfs.ext4",
                &["-q", "-F", "-d", t, img.to_str().unwrap(), "8M"],
            );
            img
        }
        Kind::Erofs => {
            let img = work.join("lower.erofs");
            run("mkfs.erofs", &["--quiet", img.to_str().unwrap(), t]);
            img
        }
    }
}

fn blank_ext4(work: &Path, name: &str, size: &str) -> PathBuf {
    let img = work.join(name);
    run(
        "mkfs.ext4",
        &["-q", "-F", "-m", "0", img.to_str().unwrap(), size],
    );
    img
}

fn boot(cmdline: String, base: PathBuf) -> Result<PathBuf, Failure> {
    let cfg = parse(&cmdline)?;
    mount_kernel_filesystems(&base)?;
    let root = build_root(&cfg, &base)?;
    Ok(root.path)
}

/// The workload's writes (new file, modified file, delete, directory replaced) and what they
/// must leave in the upper layer: the files, a whiteout (char 0/0) and an opaque directory.
fn write_and_check_upper(root: &Path) {
    fs::write(root.join("new.txt"), "new\n").unwrap();
    fs::write(root.join("etc/hostname"), "changed\n").unwrap();
    fs::remove_file(root.join("data/gone.txt")).unwrap();
    fs::remove_dir_all(root.join("dir")).unwrap();
    fs::create_dir(root.join("dir")).unwrap();
    fs::write(root.join("dir/c.txt"), "c\n").unwrap();

    assert_eq!(
        fs::read_to_string(root.join("data/keep.txt")).unwrap(),
        "keep\n"
    );
    assert!(!root.join("dir/a.txt").exists());
    let upper = root.join(UPPERFS_IN_ROOT).join("upper");
    assert_eq!(fs::read_to_string(upper.join("new.txt")).unwrap(), "new\n");
    assert_eq!(
        fs::read_to_string(upper.join("etc/hostname")).unwrap(),
        "changed\n"
    );
    assert!(
        !upper.join("data/keep.txt").exists(),
        "untouched files stay in the lower only"
    );
    let wh = fs::symlink_metadata(upper.join("data/gone.txt")).unwrap();
    assert!(
        wh.file_type().is_char_device() && wh.rdev() == 0,
        "whiteout is char 0/0"
    );
    assert_eq!(
        xattr(&upper.join("dir"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(fs::read_to_string(upper.join("dir/c.txt")).unwrap(), "c\n");
    // The lower stays visible, unchanged, in the new root.
    let lower = root.join(LOWER_IN_ROOT);
    assert_eq!(
        fs::read_to_string(lower.join("data/gone.txt")).unwrap(),
        "gone\n"
    );
    assert_eq!(
        fs::read_to_string(lower.join("etc/hostname")).unwrap(),
        "base\n"
    );
    assert!(
        fs::write(lower.join("x"), "x").is_err(),
        "lower is read-only"
    );
}

fn upper_fs_kind(root: &Path) -> String {
    let mounts = fs::read_to_string("/proc/thread-self/mounts").unwrap();
    let target = root.join(UPPERFS_IN_ROOT);
    mounts
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(target.to_str().unwrap()))
        .map(|l| l.to_string())
        .unwrap_or_default()
}

#[test]
fn ext4_lower_tmpfs_upper() {
    if !can_run("ext4_lower_tmpfs_upper") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let img = make_lower(work.path(), Kind::Ext4);
    let before = sha256(&img);
    let lower = Loop::attach(&img, true);
    let base = work.path().join("base");
    let cmdline = format!(
        "console=ttyS0 root={} root.overlay=tmpfs vmrun.wait=2",
        lower.0
    );
    in_private_ns(move || {
        let root = boot(cmdline, base).unwrap();
        write_and_check_upper(&root);
        assert!(upper_fs_kind(&root).contains(" tmpfs "));
        assert!(
            root.join("proc/self/mounts").exists(),
            "kernel filesystems moved into the new root"
        );
        assert!(root.join(UPPERFS_IN_ROOT).join("work").is_dir());
    });
    drop(lower);
    assert_eq!(sha256(&img), before, "lower image unchanged");
}

#[test]
fn erofs_lower_tmpfs_upper_with_size() {
    if !can_run("erofs_lower_tmpfs_upper_with_size") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let img = make_lower(work.path(), Kind::Erofs);
    let before = sha256(&img);
    let lower = Loop::attach(&img, true);
    let base = work.path().join("base");
    // rootfstype absent: detected from the superblock.
    let cmdline = format!("root={} root.overlay=tmpfs root.overlaysize=1M", lower.0);
    in_private_ns(move || {
        let root = boot(cmdline, base).unwrap();
        let line = upper_fs_kind(&root);
        assert!(line.contains("size=1024k"), "{line}");
        write_and_check_upper(&root);
        let big = vec![7u8; 2 << 20];
        let e = fs::write(root.join("big.bin"), big).unwrap_err();
        assert_eq!(
            e.raw_os_error(),
            Some(libc::ENOSPC),
            "a full tmpfs upper says ENOSPC"
        );
    });
    drop(lower);
    assert_eq!(sha256(&img), before);
}

#[test]
fn ext4_upper_persists_across_boots_and_work_is_emptied() {
    if !can_run("ext4_upper_persists_across_boots_and_work_is_emptied") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let img = make_lower(work.path(), Kind::Ext4);
    let before = sha256(&img);
    let upper_img = blank_ext4(work.path(), "upper.ext4", "16M");
    let lower = Loop::attach(&img, true);
    let upper = Loop::attach(&upper_img, false);
    let cmdline = format!(
        "root={} rootfstype=ext4 root.overlay={} root.overlayfstype=ext4",
        lower.0, upper.0
    );

    let (c1, b1) = (cmdline.clone(), work.path().join("boot1"));
    in_private_ns(move || {
        let root = boot(c1, b1).unwrap();
        assert!(upper_fs_kind(&root).contains(" ext4 "));
        fs::write(root.join("persist.txt"), "from boot 1\n").unwrap();
        fs::remove_file(root.join("data/gone.txt")).unwrap();
        fs::write(root.join(UPPERFS_IN_ROOT).join("work/stale-marker"), "x").unwrap();
        nix::unistd::sync();
    });
    let (c2, b2) = (cmdline, work.path().join("boot2"));
    in_private_ns(move || {
        let root = boot(c2, b2).unwrap();
        assert_eq!(
            fs::read_to_string(root.join("persist.txt")).unwrap(),
            "from boot 1\n"
        );
        assert!(
            !root.join("data/gone.txt").exists(),
            "the whiteout persisted too"
        );
        assert!(
            !root
                .join(UPPERFS_IN_ROOT)
                .join("work/stale-marker")
                .exists(),
            "work/ emptied at boot"
        );
    });
    drop((lower, upper));
    assert_eq!(sha256(&img), before);
}

#[test]
fn without_overlay_the_root_is_mounted_directly() {
    if !can_run("without_overlay_the_root_is_mounted_directly") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let img = make_lower(work.path(), Kind::Ext4);
    let before = sha256(&img);
    let ro = Loop::attach(&img, true);
    let (c, b) = (format!("root={}", ro.0), work.path().join("b1"));
    in_private_ns(move || {
        let root = boot(c, b).unwrap();
        assert_eq!(
            fs::read_to_string(root.join("etc/hostname")).unwrap(),
            "base\n"
        );
        let e = fs::write(root.join("x"), "x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS));
        assert!(
            !root.join(LOWER_IN_ROOT).join("etc").exists(),
            "no overlay mounts"
        );
    });
    // rw asked for, but the disk is read-only: a clear error.
    let (c, b) = (format!("root={} rw", ro.0), work.path().join("b2"));
    let e = in_private_ns(move || boot(c, b).unwrap_err().to_string());
    assert!(
        e.contains("read-write (rw)") && e.contains("attach the disk writable or drop rw"),
        "{e}"
    );
    drop(ro);
    assert_eq!(sha256(&img), before);

    // A writable disk with rw is writable.
    let copy = work.path().join("rw.ext4");
    fs::copy(&img, &copy).unwrap();
    let rw = Loop::attach(&copy, false);
    let (c, b) = (format!("root={} rw", rw.0), work.path().join("b3"));
    in_private_ns(move || {
        let root = boot(c, b).unwrap();
        fs::write(root.join("x"), "x").unwrap();
    });
}

fn boot_err(cmdline: String, work: &Path, tag: &str) -> Failure {
    let base = work.join(tag);
    in_private_ns(move || boot(cmdline, base).unwrap_err())
}

#[test]
fn each_error_case_yields_its_message() {
    if !can_run("each_error_case_yields_its_message") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let img = make_lower(work.path(), Kind::Ext4);
    let before = sha256(&img);
    let erofs_img = make_lower(&work.path().join("e"), Kind::Erofs);
    let lower = Loop::attach(&img, true);
    let w = work.path();
    let l = &lower.0;

    let e = boot_err(
        format!("root={l} root.overlay=tmpfs root.overlaysize=12q"),
        w,
        "size",
    );
    assert_eq!(e.class, InitError::Cmdline);
    assert!(
        e.to_string()
            .contains("root.overlaysize=12q: not a tmpfs size"),
        "{e}"
    );

    let e = boot_err(format!("root={l} root.overlay=zram"), w, "unknown");
    assert!(
        e.to_string()
            .contains("root.overlay=zram: unknown upper layer"),
        "{e}"
    );

    let e = boot_err(
        format!("root={l} root.overlay=/dev/vmrun-missing-disk vmrun.wait=0"),
        w,
        "missing-upper",
    );
    assert_eq!(e.class, InitError::Device);
    assert!(e.to_string().contains("upper device /dev/vmrun-missing-disk: did not appear within 0s; attach a writable disk"), "{e}");

    let e = boot_err(
        "root=/dev/vmrun-missing-root vmrun.wait=0 root.overlay=tmpfs".into(),
        w,
        "missing-lower",
    );
    assert!(
        e.to_string()
            .contains("root device /dev/vmrun-missing-root: did not appear"),
        "{e}"
    );

    let e = boot_err(
        format!("root={l} rootfstype=erofs root.overlay=tmpfs"),
        w,
        "wrong-lower-type",
    );
    assert_eq!(e.class, InitError::Mount);
    assert!(
        e.to_string()
            .contains(&format!("mount root device {l} (erofs) read-only"))
            && e.to_string().contains("check rootfstype="),
        "{e}"
    );

    let e = boot_err(
        format!("root={l} root.overlay=tmpfs rootfstype=nosuchfs"),
        w,
        "unknown-lower-type",
    );
    assert!(
        e.to_string()
            .contains("rootfstype=nosuchfs: the guest kernel does not support nosuchfs"),
        "{e}"
    );

    let upper_img = blank_ext4(w, "u.ext4", "8M");
    let upper = Loop::attach(&upper_img, false);
    let e = boot_err(
        format!("root={l} root.overlay={} root.overlayfstype=erofs", upper.0),
        w,
        "wrong-upper-type",
    );
    assert!(
        e.to_string()
            .contains(&format!("mount upper device {} as erofs", upper.0))
            && e.to_string().contains("vmrun overlay create"),
        "{e}"
    );
    let e = boot_err(
        format!(
            "root={l} root.overlay={} root.overlayfstype=nosuchfs",
            upper.0
        ),
        w,
        "unknown-upper-type",
    );
    assert!(
        e.to_string()
            .contains("root.overlayfstype=nosuchfs: the guest kernel does not support"),
        "{e}"
    );

    // An upper the overlay cannot write to: a read-only filesystem.
    let ro_upper = Loop::attach(&erofs_img, true);
    let e = boot_err(
        format!(
            "root={l} root.overlay={} root.overlayfstype=erofs",
            ro_upper.0
        ),
        w,
        "ro-upper",
    );
    assert!(e.to_string().contains("read-only"), "{e}");

    // A full upper at boot.
    let full_img = blank_ext4(w, "full.ext4", "2M");
    {
        let full_img = full_img.clone();
        in_private_ns(move || {
            let dev = Loop::attach(&full_img, false);
            let mnt = tempfile::tempdir().unwrap();
            mount(
                Some(dev.0.as_str()),
                mnt.path(),
                Some("ext4"),
                MsFlags::empty(),
                None::<&str>,
            )
            .unwrap();
            let chunk = vec![1u8; 64 << 10];
            let mut f = fs::File::create(mnt.path().join("fill")).unwrap();
            use std::io::Write;
            while f.write_all(&chunk).is_ok() {}
            let mut i = 0;
            while fs::create_dir(mnt.path().join(format!("d{i}"))).is_ok() {
                i += 1;
            }
            drop(f);
            umount2(mnt.path(), MntFlags::empty()).unwrap();
        });
    }
    let full = Loop::attach(&full_img, false);
    let e = boot_err(format!("root={l} root.overlay={}", full.0), w, "full-upper");
    assert!(
        e.to_string().contains("the upper layer is full (ENOSPC)"),
        "{e}"
    );

    drop((lower, upper, ro_upper, full));
    assert_eq!(
        sha256(&img),
        before,
        "lower image unchanged after every error"
    );
}

/// `root.layers=`: an erofs layer holding a whiteout, an opaque directory and a new file sits
/// between the root and the upper, and alone (no upper) makes a read-only stack.
#[test]
fn layers_stack_between_the_root_and_the_upper() {
    if !can_run("layers_stack_between_the_root_and_the_upper") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let img = make_lower(work.path(), Kind::Erofs);
    let layer_tree = work.path().join("layer");
    fs::create_dir_all(layer_tree.join("data")).unwrap();
    fs::create_dir_all(layer_tree.join("dir")).unwrap();
    fs::write(layer_tree.join("dir/c.txt"), "c\n").unwrap();
    fs::write(layer_tree.join("layer.txt"), "from the layer\n").unwrap();
    let c = std::ffi::CString::new(layer_tree.join("data/gone.txt").to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path; a whiteout is char 0/0.
    assert_eq!(unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR, 0) }, 0);
    let d = std::ffi::CString::new(layer_tree.join("dir").to_str().unwrap()).unwrap();
    // SAFETY: NUL-terminated strings and a one-byte value.
    let rc = unsafe {
        libc::setxattr(
            d.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            b"y".as_ptr().cast(),
            1,
            0,
        )
    };
    assert_eq!(rc, 0);
    let layer_img = work.path().join("layer.erofs");
    run(
        "mkfs.erofs",
        &[
            "--quiet",
            layer_img.to_str().unwrap(),
            layer_tree.to_str().unwrap(),
        ],
    );
    let (root_dev, layer_dev) = (Loop::attach(&img, true), Loop::attach(&layer_img, true));
    let check = |root: &Path| {
        assert_eq!(
            fs::read_to_string(root.join("layer.txt")).unwrap(),
            "from the layer\n"
        );
        assert!(
            !root.join("data/gone.txt").exists(),
            "the whiteout hides it"
        );
        assert!(root.join("data/keep.txt").exists());
        assert!(
            !root.join("dir/a.txt").exists() && !root.join("dir/sub").exists(),
            "the opaque directory hides the root's"
        );
        assert_eq!(fs::read_to_string(root.join("dir/c.txt")).unwrap(), "c\n");
    };
    let (c1, b1) = (
        format!(
            "root={} root.layers={} vmrun.wait=2",
            root_dev.0, layer_dev.0
        ),
        work.path().join("b1"),
    );
    in_private_ns(move || {
        let root = boot(c1, b1).unwrap();
        check(&root);
        let e = fs::write(root.join("x"), "x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "no upper: read-only");
    });
    let (c2, b2) = (
        format!(
            "root={} root.layers={} root.overlay=tmpfs",
            root_dev.0, layer_dev.0
        ),
        work.path().join("b2"),
    );
    in_private_ns(move || {
        let root = boot(c2, b2).unwrap();
        check(&root);
        fs::write(root.join("layer.txt"), "changed\n").unwrap();
        let upper = root.join(UPPERFS_IN_ROOT).join("upper");
        assert_eq!(
            fs::read_to_string(upper.join("layer.txt")).unwrap(),
            "changed\n",
            "a layer's file is copied up like the root's"
        );
    });
    // A missing layer device: the error names it and the fix.
    let (c3, b3) = (
        format!(
            "root={} root.layers=/dev/vdq root.overlay=tmpfs vmrun.wait=0",
            root_dev.0
        ),
        work.path().join("b3"),
    );
    let e = in_private_ns(move || boot(c3, b3).unwrap_err().to_string());
    assert!(
        e.contains("layer device /dev/vdq") && e.contains("root.layers="),
        "{e}"
    );
}
