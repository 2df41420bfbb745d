//! T4, issue 21's stack in real guests, through the library: run 1 writes, deletes a root file
//! and replaces a directory, and is captured; run 2 boots with `--layer` on that capture and
//! sees exactly run 1's final tree (a full listing of the root compared line by line, and the
//! contents of what run 1 wrote); run 2's own capture holds only run 2's changes, and
//! `vmrun diff` on run 2 lists exactly them against run 2's stack.

use std::path::Path;
use std::time::Instant;

use vmrun::api::vm::{Overlay, Vm};
use vmrun_protocol::agent::ExitStatus;
use vmrun_tests::{read_tar, t4_images, t4_rootfs, Budget};

/// The root's top level and every path under /etc and /data (where run 1 wrote; the T2 test
/// compares whole trees, and a full listing takes minutes where guest ring 0 is emulated),
/// with type, mode, owner, mtime (seconds), and size and symlink target but for directories
/// (whose size is their filesystem's business); the kernel filesystems' mountpoints, fresh at
/// each boot, are left out. Then checksums of what run 1 wrote.
const LISTING: &str = "set -e; \
    find / -xdev -mindepth 1 -maxdepth 1 \\( -path /dev -o -path /proc -o -path /sys \
    -o -path /run \\) -prune -o -type d -printf '%p d %m %U:%G %Ts\\n' \
    -o -printf '%p %y %m %U:%G %s %Ts %l\\n'; \
    find /etc /data -xdev -type d -printf '%p d %m %U:%G %Ts\\n' \
    -o -printf '%p %y %m %U:%G %s %Ts %l\\n'; \
    md5sum /new.txt /etc/hostname /etc/skel/only /data/deep/blob /hard";

const RUN1: &str = "set -e; echo new > /new.txt; echo changed > /etc/hostname; rm /etc/issue; \
    rm -rf /etc/skel; mkdir /etc/skel; echo fresh > /etc/skel/only; \
    ln -s /new.txt /link; ln /new.txt /hard; mkdir -p /data/deep; \
    head -c 300000 /dev/urandom > /data/deep/blob; chmod 600 /data/deep/blob; \
    mkfifo /data/pipe; chown 1234:5678 /data/deep";

const RUN2: &str = "set -e; echo second > /second.txt; rm /new.txt; echo more >> /etc/skel/only";

fn run(vm: &Vm, script: &str) -> String {
    let out = vm
        .exec(["/bin/sh", "-c", script])
        .unwrap_or_else(|e| panic!("{e}\n--- console ---\n{}", vm.console_tail(40)));
    assert_eq!(
        out.status,
        ExitStatus::Exited(0),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn start(layer: Option<&Path>) -> Vm {
    let mut b = Vm::builder()
        .overlay(Overlay::Tmpfs {
            size: Some("64M".into()),
        })
        .boot_timeout(Budget::new("a VM to boot to its agent", 60, 240).limit());
    if let Some(l) = layer {
        b = b.layer(l);
    }
    b.start().unwrap()
}

#[test]
fn run_two_on_run_ones_capture_sees_exactly_its_tree() {
    let name = "run_two_on_run_ones_capture_sees_exactly_its_tree";
    let (Some((_, _, pvm)), Some(_)) = (t4_images(name), t4_rootfs(name)) else {
        return;
    };
    let label = vmrun::host::compat::kvm_label(pvm);
    let dir = tempfile::tempdir().unwrap();
    let tar1 = dir.path().join("run1.tar");

    let t = Instant::now();
    let a = start(None);
    let boot_plain = t.elapsed();
    eprintln!("[{label}] run 1 booted in {:.1}s", boot_plain.as_secs_f64());
    run(&a, RUN1);
    let view1 = run(&a, LISTING);
    eprintln!(
        "[{label}] run 1 listed {} paths at {:.1}s",
        view1.lines().count(),
        t.elapsed().as_secs_f64()
    );
    a.capture_overlay_to(&tar1).unwrap();
    a.shutdown().unwrap();

    let t = Instant::now();
    let b = start(Some(&tar1));
    let boot_layered = t.elapsed();
    eprintln!(
        "[{label}] run 2 booted in {:.1}s",
        boot_layered.as_secs_f64()
    );
    let view2 = run(&b, LISTING);
    let diff: Vec<String> = {
        let (l1, l2): (Vec<&str>, Vec<&str>) = (view1.lines().collect(), view2.lines().collect());
        l1.iter()
            .filter(|l| !l2.contains(l))
            .map(|l| format!("- {l}"))
            .chain(
                l2.iter()
                    .filter(|l| !l1.contains(l))
                    .map(|l| format!("+ {l}")),
            )
            .collect()
    };
    assert!(
        diff.is_empty(),
        "run 2 on run 1's layer differs from run 1 (- run 1, + run 2):\n{}",
        diff.join("\n")
    );
    assert!(
        view1.contains("/data/pipe p 644") && !view1.contains("/etc/issue "),
        "{view1}"
    );
    assert!(view1.contains("/data/deep d 755 1234:5678"), "{view1}");

    run(&b, RUN2);
    // `vmrun diff NAME` against the VM's own stack (the root image and run 1's layer).
    let bin = vmrun::api::builder::vmm_binary().unwrap();
    let out = std::process::Command::new(&bin)
        .args(["diff", b.name()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "vmrun diff: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "C /etc\nC /etc/skel\nC /etc/skel/only\nD /new.txt\nA /second.txt\n"
    );
    let mut tar2 = Vec::new();
    b.capture_overlay(&mut tar2).unwrap();
    b.shutdown().unwrap();
    let t2 = read_tar(&tar2);
    assert_eq!(
        vmrun_tests::entry_names(&t2),
        vec!["etc", "etc/skel", "etc/skel/only", "new.txt", "second.txt"],
        "run 2's capture holds run 2's changes only"
    );
    assert_eq!(t2["new.txt"].kind, b'3', "the deletion is a whiteout");
    assert_eq!(t2["etc/skel/only"].data, b"fresh\nmore\n");
    println!(
        "[{label}] boot to agent: {:.1}s plain, {:.1}s with one layer (includes building the \
         layer image)",
        boot_plain.as_secs_f64(),
        boot_layered.as_secs_f64()
    );
}
