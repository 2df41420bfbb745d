//! T4 end to end, the product as a harness drives it: boot with a tmpfs overlay root and the
//! agent on vsock, upload a file and `exec cat` it at once (the seed's bug), write, delete and
//! replace a directory, capture the upper layer, check the tar, shut down; the rootfs image is
//! unchanged. Timings are printed with the kind of KVM they came from.

use std::time::{Duration, Instant};

use vmrun::api::agent::{AgentClient, Endpoint};
use vmrun::builder::Vmm;
use vmrun::config::VsockConfig;
use vmrun::devices::legacy::serial::ConsoleSink;
use vmrun::host::compat::Compat;
use vmrun::launch::overlay::Overlay;
use vmrun::launch::{Rootfs, VmOptions};
use vmrun::vstate::ExitReason;
use vmrun_protocol::agent::{Exec, ExitStatus, PORT};
use vmrun_protocol::status::Status;
use vmrun_tests::host::{gnu_tar_extract, sha256, tar_listings, xattr};
use vmrun_tests::{read_tar, t4_images, t4_rootfs, Budget};

fn sh(script: &str) -> Exec {
    Exec {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

#[test]
fn upload_exec_capture_through_a_real_guest() {
    let name = "upload_exec_capture_through_a_real_guest";
    let (Some((_, _, pvm)), Some(rootfs)) = (t4_images(name), t4_rootfs(name)) else {
        return;
    };
    let label = vmrun::host::compat::kvm_label(pvm);
    let before = sha256(&rootfs);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let opts = VmOptions {
        rootfs: Rootfs::Path(rootfs.clone()),
        overlay: Some(Overlay::Tmpfs {
            size: Some("64M".into()),
        }),
        vsock: Some(VsockConfig {
            cid: 3,
            uds_path: sock.clone(),
        }),
        compat: Compat::Auto,
        ..Default::default()
    };
    let t0 = Instant::now();
    let resolved = vmrun::launch::resolve(&opts, None).unwrap();
    let vmm = Vmm::start(resolved.into_config(&opts, ConsoleSink::None)).unwrap();
    let agent = AgentClient::new(Endpoint::Vsock {
        uds: sock.clone(),
        port: PORT,
    });
    let budget = Budget::new("the guest agent to answer after boot", 60, 240);
    loop {
        if agent.stat("/").is_ok() {
            break;
        }
        assert!(
            vmm.wait(Some(Duration::from_millis(500))).is_none(),
            "VM ended before the agent answered:\n{}",
            vmm.console().last_lines(30)
        );
        budget.check(|| format!("console tail:\n{}", vmm.console().last_lines(30)));
    }
    let ready = t0.elapsed();

    // The seed's bug: upload, then exec cat at once.
    let payload: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
    let t = Instant::now();
    agent
        .upload(
            "/root/work/seed.bin",
            0o644,
            true,
            false,
            payload.as_slice(),
        )
        .unwrap();
    let upload = t.elapsed();
    let t = Instant::now();
    let out = agent
        .exec(
            Exec {
                argv: vec!["cat".into(), "/root/work/seed.bin".into()],
                ..Default::default()
            },
            None,
        )
        .unwrap();
    let exec_rt = t.elapsed();
    assert_eq!(
        out.status,
        ExitStatus::Exited(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout == payload, "cat saw {} bytes", out.stdout.len());

    let out = agent.exec(sh("rm /etc/issue && rm -rf /etc/skel && mkdir /etc/skel && echo fresh > /etc/skel/only"), None).unwrap();
    assert_eq!(
        out.status,
        ExitStatus::Exited(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let t = Instant::now();
    let mut tar = Vec::new();
    agent.capture(&mut tar).unwrap();
    let capture = t.elapsed();
    let entries = read_tar(&tar);
    let found = (
        entries
            .get("root/work/seed.bin")
            .is_some_and(|e| e.data == payload),
        // A whiteout: char device 0/0.
        entries
            .get("etc/issue")
            .is_some_and(|e| e.kind == b'3' && e.dev.0 == 0),
        entries.get("etc/skel").is_some_and(|e| {
            e.xattrs.get("trusted.overlay.opaque").map(Vec::as_slice) == Some(&b"y"[..])
        }),
    );
    assert_eq!(
        found,
        (true, true, true),
        "capture has (seed file, whiteout, opaque dir)"
    );
    // Extracted on the host with GNU tar: the same tree, whiteout and opaque marker included.
    let x = dir.path().join("extract");
    std::fs::create_dir(&x).unwrap();
    let tarfile = dir.path().join("upper.tar");
    std::fs::write(&tarfile, &tar).unwrap();
    gnu_tar_extract(&tarfile, &x);
    // The capture a real guest made reads in GNU tar, BusyBox tar and Python's tarfile.
    for (reader, names) in tar_listings(&tarfile) {
        for want in ["root/work/seed.bin", "etc/issue", "etc/skel/only"] {
            assert!(names.iter().any(|n| n == want), "{reader}: {names:?}");
        }
    }
    assert!(std::fs::read(x.join("root/work/seed.bin")).unwrap() == payload);
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let wh = std::fs::symlink_metadata(x.join("etc/issue")).unwrap();
    assert!(
        wh.file_type().is_char_device() && wh.rdev() == 0,
        "whiteout extracted as char 0/0"
    );
    let opaque = xattr(&x.join("etc/skel"), "trusted.overlay.opaque");
    assert!(
        opaque.as_deref() == Some(&b"y"[..]),
        "opaque dir extracted: {opaque:?}"
    );
    assert_eq!(std::fs::read(x.join("etc/skel/only")).unwrap(), b"fresh\n");

    agent.shutdown().unwrap();
    let off = Budget::new("the VM to power off after the agent's shutdown", 30, 120);
    let reason = vmm.wait(Some(off.limit()));
    if reason.is_none() {
        off.overrun(&vmm.console().last_lines(20));
    }
    eprintln!(
        "T4 e2e ({label}): boot to agent ready {:.1}s; upload 64 KiB {:.2}s; exec cat round trip {:.2}s; capture {} KiB {:.2}s",
        ready.as_secs_f64(),
        upload.as_secs_f64(),
        exec_rt.as_secs_f64(),
        tar.len() / 1024,
        capture.as_secs_f64()
    );
    assert_eq!(
        reason,
        Some(ExitReason::Status(Status::Exited(0))),
        "{}",
        vmm.console().last_lines(20)
    );
    drop(vmm);
    assert_eq!(sha256(&rootfs), before, "the rootfs image is unchanged");
    assert!(!sock.exists());
}
