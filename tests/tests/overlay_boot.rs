//! T4: one boot per overlay mode with the real kernel, init and rootfs (virtio-blk), the
//! workload run by vmrun-init (`vmrun.exec`). On hosts that emulate guest ring 0 each boot takes
//! about a minute; timings are printed and labelled.

use vmrun::host::compat::Compat;
use vmrun::launch::overlay::Overlay;
use vmrun::launch::{Rootfs, VmOptions};
use vmrun::vstate::ExitReason;
use vmrun_protocol::status::{InitError, Status};
use vmrun_tests::host::sha256;
use vmrun_tests::{boot, t4_images, t4_rootfs, Booted, Budget};

/// A boot that runs one shell command and powers off.
fn limit(what: &str) -> Budget {
    Budget::new(format!("{what} to boot, run and power off"), 60, 240)
}

fn opts(rootfs: &std::path::Path, exec: &str) -> VmOptions {
    VmOptions {
        rootfs: Rootfs::Path(rootfs.into()),
        exec: Some(exec.into()),
        compat: Compat::Auto,
        ..Default::default()
    }
}

fn report(name: &str, pvm: bool, b: &Booted) {
    eprintln!(
        "T4 {name}: {:.1}s ({}), {}",
        b.secs,
        vmrun::host::compat::kvm_label(pvm),
        b.outcome.summary
    );
}

fn assert_status(b: &Booted, code: u8) {
    assert_eq!(
        b.outcome.reason,
        Some(ExitReason::Status(Status::Exited(code))),
        "{}\n--- console ---\n{}",
        b.outcome.summary,
        tail(&b.console)
    );
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[test]
fn tmpfs_overlay_from_the_env_toggle_keeps_the_lower_pristine() {
    let name = "tmpfs_overlay_from_the_env_toggle_keeps_the_lower_pristine";
    let (Some((_, _, pvm)), Some(rootfs)) = (t4_images(name), t4_rootfs(name)) else {
        return;
    };
    let before = sha256(&rootfs);
    // One shell: a new file, a changed file, a deleted lower file, then what the upper holds
    // (no quotes inside: the whole command is single-quoted for vmrun.exec).
    let script = "echo new > /new.txt; echo changed > /etc/hostname; rm /etc/issue; \
                  ls /.overlayfs/upperfs/upper /.overlayfs/upperfs/upper/etc; stat -c %n,%F,%t:%T /.overlayfs/upperfs/upper/etc/issue; \
                  grep -q ^overlay /proc/mounts";
    let b = boot(
        &opts(&rootfs, &format!("/bin/sh -c '{script}'")),
        Some("1"),
        &limit(name),
    );
    report(name, pvm, &b);
    assert_status(&b, 0);
    assert!(
        b.console
            .contains("overlay root: /dev/vda lower (ext4), tmpfs upper"),
        "{}",
        tail(&b.console)
    );
    assert!(b.console.contains("new.txt"), "{}", tail(&b.console));
    assert!(b.console.contains("hostname"));
    assert!(
        b.console
            .contains("/.overlayfs/upperfs/upper/etc/issue,character special file,0:0"),
        "whiteout: {}",
        tail(&b.console)
    );
    assert_eq!(sha256(&rootfs), before, "the rootfs image is unchanged");
}

#[test]
fn disk_upper_persists_across_two_boots() {
    let name = "disk_upper_persists_across_two_boots";
    let (Some((_, _, pvm)), Some(rootfs)) = (t4_images(name), t4_rootfs(name)) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let upper = dir.path().join("upper.ext4");
    vmrun::launch::overlay::create_disk(&upper, "64M", "ext4").unwrap();
    let before = sha256(&rootfs);
    let with_disk = |exec: &str| {
        let mut o = opts(&rootfs, exec);
        o.overlay = Some(Overlay::Disk {
            path: upper.clone(),
            fstype: "ext4".into(),
        });
        o
    };
    let b1 = boot(
        &with_disk("/bin/sh -c 'echo from-boot-1 > /persist.txt; rm /etc/issue'"),
        None,
        &limit("the first disk-upper VM"),
    );
    report("disk upper, boot 1", pvm, &b1);
    assert_status(&b1, 0);
    assert!(
        b1.console.contains("tmpfs upper") || b1.console.contains("ext4 upper"),
        "{}",
        tail(&b1.console)
    );
    let b2 = boot(
        &with_disk("/bin/sh -c 'cat /persist.txt; test ! -e /etc/issue'"),
        None,
        &limit("the second disk-upper VM"),
    );
    report("disk upper, boot 2", pvm, &b2);
    assert_status(&b2, 0);
    assert!(b2.console.contains("from-boot-1"), "{}", tail(&b2.console));
    assert_eq!(sha256(&rootfs), before);
}

#[test]
fn without_overlay_the_root_is_read_only() {
    let name = "without_overlay_the_root_is_read_only";
    let (Some((_, _, pvm)), Some(rootfs)) = (t4_images(name), t4_rootfs(name)) else {
        return;
    };
    let before = sha256(&rootfs);
    let b = boot(
        &opts(&rootfs, "/bin/sh -c 'touch /x'"),
        Some("0"),
        &limit(name),
    );
    report(name, pvm, &b);
    assert_status(&b, 1);
    assert!(
        b.console.contains("root: /dev/vda (ext4, ro)"),
        "{}",
        tail(&b.console)
    );
    assert!(
        b.console.contains("Read-only file system"),
        "{}",
        tail(&b.console)
    );
    assert_eq!(sha256(&rootfs), before);
}

#[test]
fn bad_overlay_size_is_the_init_error_not_a_timeout() {
    let name = "bad_overlay_size_is_the_init_error_not_a_timeout";
    let (Some((_, _, pvm)), Some(rootfs)) = (t4_images(name), t4_rootfs(name)) else {
        return;
    };
    // Straight onto the kernel command line, so the host-side check cannot catch it first.
    let mut o = opts(&rootfs, "/bin/true");
    o.cmdline = Some("root.overlay=tmpfs root.overlaysize=12q".into());
    let b = boot(&o, None, &limit(name));
    report(name, pvm, &b);
    assert_eq!(
        b.outcome.reason,
        Some(ExitReason::Status(Status::InitFailed(
            InitError::Cmdline as u8
        ))),
        "{}",
        tail(&b.console)
    );
    // The VM failed rather than a workload: vmrun's 125.
    assert_eq!(b.outcome.workload_status, None);
    assert!(
        b.outcome
            .summary
            .contains("vmrun-init: error: root.overlaysize=12q: not a tmpfs size"),
        "{}",
        b.outcome.summary
    );
}
