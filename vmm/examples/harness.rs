//! A test harness in miniature: start a throwaway VM with a tmpfs overlay root, put a fixture
//! in, run the program under test, check its output, and keep everything it wrote as a tar.
//!
//! Run it (after `vmrun images build`): `cargo run --example harness -- /tmp/changes.tar`

use std::path::PathBuf;

use vmrun::api::vm::{Overlay, Vm};
use vmrun::api::{Exec, ExitStatus};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_tar = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "changes.tar".into()),
    );

    // One VM per test case: the base image stays pristine, every write lands in the overlay.
    let vm = Vm::builder()
        .overlay(Overlay::Tmpfs {
            size: Some("256M".into()),
        })
        .memory_mib(512)
        .start()?;

    // The fixture goes in through the guest kernel, so the command sees it at once.
    vm.upload_bytes("/work/numbers.txt", b"3\n1\n2\n", 0o644)?;

    // The "program under test": sort the fixture, with a timeout and its own environment.
    let out = vm.exec(Exec {
        argv: vec![
            "/bin/sh".into(),
            "-c".into(),
            "sort numbers.txt | tee sorted.txt".into(),
        ],
        cwd: Some("/work".into()),
        env: vec![("LC_ALL".into(), "C".into())],
        timeout_ms: Some(60_000),
        ..Default::default()
    })?;
    assert_eq!(
        out.status,
        ExitStatus::Exited(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"1\n2\n3\n");

    // Everything the test wrote, whiteouts included, for the artifact store.
    let bytes = vm.capture_overlay_to(&out_tar)?;
    println!(
        "ok: sorted; {bytes} bytes of changes in {}",
        out_tar.display()
    );

    // Dropping `vm` would kill it; shutting down lets the guest flush first.
    vm.shutdown()?;
    Ok(())
}
