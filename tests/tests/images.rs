//! T4, issue 21's container images in real guests, through the CLI as a person uses it: a
//! BusyBox OCI image built here is imported; a VM started with `--image` runs the image's
//! entrypoint when given no command and every command with the image's env, working
//! directory and user (a command's own `--user` wins), and sees the image's whiteouts taken
//! effect; a snapshot of it keeps those defaults; what it writes is committed as a new image, which the next VM boots (read-only,
//! no upper) with the write in place and the defaults inherited.

use std::path::Path;

use vmrun::launch::snapshot::SNAPSHOT_DIR_ENV;
use vmrun::launch::store::IMAGE_DIR_ENV;
use vmrun_tests::cli::{run, vmrun_in};
use vmrun_tests::oci::busybox_image;
use vmrun_tests::{t4_images, Budget};

fn cli(rt: &Path, store: &Path, args: &[&str], budget: &Budget) -> (i32, String, String) {
    let mut c = vmrun_in(rt);
    c.env(IMAGE_DIR_ENV, store)
        .env(SNAPSHOT_DIR_ENV, store.join("snapshots"))
        .args(args);
    run(c, b"", budget)
}

fn ok(rt: &Path, store: &Path, args: &[&str], budget: &Budget) -> String {
    let (code, out, err) = cli(rt, store, args, budget);
    assert_eq!(code, 0, "vmrun {args:?}: {out}{err}");
    out
}

#[test]
fn an_imported_image_boots_runs_with_its_config_and_commits() {
    let test = "an_imported_image_boots_runs_with_its_config_and_commits";
    let Some((_, _, pvm)) = t4_images(test) else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let Some(archive) = busybox_image(d.path()) else {
        assert!(
            std::env::var_os("VMRUN_REQUIRE_T4").is_none(),
            "{test}: T4 required but there is no static /bin/busybox (apt-get install busybox-static)"
        );
        eprintln!("SKIPPED {test}: no static /bin/busybox (apt-get install busybox-static)");
        return;
    };
    let label = vmrun::host::compat::kvm_label(pvm);
    let (rt, store) = (d.path().join("rt"), d.path().join("images"));
    // A budget runs from when it is made: one per command.
    let op = || Budget::new("a vmrun command on a running VM", 30, 120);
    let boot = || Budget::new("a VM to start from an image", 60, 300);

    let out = ok(
        &rt,
        &store,
        &["images", "import", archive.to_str().unwrap()],
        &op(),
    );
    assert!(out.starts_with("busybox:1: "), "{out}");

    let t = std::time::Instant::now();
    ok(
        &rt,
        &store,
        &[
            "start",
            "--name",
            "img",
            "--image",
            "busybox:1",
            "--overlay",
            "tmpfs",
        ],
        &boot(),
    );
    eprintln!(
        "[{label}] started from the image in {:.1}s",
        t.elapsed().as_secs_f64()
    );

    // No command: the image's entrypoint and command, with its env, workdir and user.
    let out = ok(&rt, &store, &["exec", "img"], &op());
    assert_eq!(out, "hello from oci in /app as 1000:1000 world\n");
    let out = ok(
        &rt,
        &store,
        &[
            "exec",
            "img",
            "-e",
            "EXTRA=1",
            "--",
            "sh",
            "-c",
            "echo $GREETING $PATH $EXTRA; pwd; id -u; ls /srv; test ! -e /etc/motd && echo motd-gone",
        ],
        &op(),
    );
    assert_eq!(out, "oci /app:/bin 1\n/app\n1000\nnew\nmotd-gone\n");
    // A command's own user wins over the image's.
    let out = ok(
        &rt,
        &store,
        &[
            "exec",
            "img",
            "-u",
            "0",
            "--",
            "sh",
            "-c",
            "echo kept > /srv/mine; id -u",
        ],
        &op(),
    );
    assert_eq!(out, "0\n");
    // A snapshot keeps the defaults: a VM restored from it runs the entrypoint too.
    ok(
        &rt,
        &store,
        &["snapshot", "create", "snap", "--from", "img"],
        &boot(),
    );
    let out = ok(&rt, &store, &["exec", "--from", "snap"], &boot());
    assert_eq!(out, "hello from oci in /app as 1000:1000 world\n");
    let out = ok(&rt, &store, &["diff", "img"], &op());
    assert!(out.lines().any(|l| l == "A /srv/mine"), "{out}");
    let out = ok(&rt, &store, &["commit", "img", "kept"], &op());
    assert!(
        out.contains("1 layers") && out.contains("--image kept"),
        "{out}"
    );
    ok(&rt, &store, &["stop", "img"], &op());

    // The committed image: the write in place, the defaults inherited, read-only root.
    let out = ok(
        &rt,
        &store,
        &[
            "exec", "--image", "kept", "--overlay", "none", "--", "sh", "-c",
            "cat /srv/mine /srv/new; echo $GREETING; pwd; id -u; echo x > /srv/no || echo read-only",
        ],
        &boot(),
    );
    assert_eq!(out, "kept\nnew\noci\n/app\n1000\nread-only\n");
    let out = ok(&rt, &store, &["images", "ls"], &op());
    assert!(out.lines().any(|l| l.starts_with("kept ")), "{out}");
}
