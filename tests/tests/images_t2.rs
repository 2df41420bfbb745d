//! T2, issue 21's container images on the host: a BusyBox OCI image built here is imported
//! (its layers applied in order, an OCI whiteout and an opaque directory taking effect, the
//! digests checked), and its root filesystem, mounted read-only, holds exactly what the
//! layers say plus the mountpoints the init needs; the config's defaults are kept; a second
//! import of the name is refused and leaves nothing; `vmrun commit` of a capture tar over the
//! image makes an image that shares the root and inherits the defaults; `images ls|rm` show
//! and remove them.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use vmrun::launch::store;
use vmrun_tests::cli::{run, vmrun};
use vmrun_tests::host::{has_tool, in_private_ns, is_root, t2_can_run, Loop};
use vmrun_tests::oci::{busybox_image, layer_tar, Entry};
use vmrun_tests::Budget;

/// Names under `dir` of the mounted image `img`, with the modes of a few, read in a private
/// mount namespace.
fn mounted_view(img: &Path, rels: &[&'static str]) -> (Vec<String>, Vec<(String, Option<u32>)>) {
    let img = img.to_path_buf();
    let rels = rels.to_vec();
    in_private_ns(move || {
        let l = Loop::attach(&img, true);
        let m = tempfile::tempdir().unwrap();
        nix::mount::mount(
            Some(l.0.as_str()),
            m.path(),
            Some("erofs"),
            nix::mount::MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .expect("mount the image's erofs root");
        let mut names = Vec::new();
        let mut stack = vec![m.path().to_path_buf()];
        while let Some(p) = stack.pop() {
            for e in std::fs::read_dir(&p).unwrap() {
                let e = e.unwrap();
                let rel = e
                    .path()
                    .strip_prefix(m.path())
                    .unwrap()
                    .display()
                    .to_string();
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                }
                names.push(rel);
            }
        }
        names.sort();
        let modes = rels
            .iter()
            .map(|r| {
                let md = std::fs::symlink_metadata(m.path().join(r)).ok();
                (r.to_string(), md.map(|md| md.permissions().mode() & 0o7777))
            })
            .collect();
        nix::mount::umount(m.path()).unwrap();
        (names, modes)
    })
}

#[test]
fn an_imported_image_is_its_layers_applied_and_commits_stack_on_it() {
    let test = "an_imported_image_is_its_layers_applied_and_commits_stack_on_it";
    if !t2_can_run(
        test,
        is_root() && has_tool("mkfs.erofs") && has_tool("losetup"),
        || "needs root, mkfs.erofs (erofs-utils) and losetup".into(),
    ) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let Some(archive) = busybox_image(d.path()) else {
        t2_can_run(test, false, || {
            "no static /bin/busybox (apt-get install busybox-static)".into()
        });
        return;
    };
    let store_dir = d.path().join("images");
    let report = store::import_in(&store_dir, &archive, None, None).unwrap();
    assert_eq!((report.layers, report.skipped_devices), (2, 0));
    let img = report.image;
    assert_eq!(
        img.name, "busybox:1",
        "named after its ref, registry dropped"
    );
    assert!(img.layers.is_empty(), "one flattened root");
    let dfl = &img.defaults;
    assert_eq!(dfl.argv, vec!["/app/hello.sh", "world"]);
    assert_eq!(dfl.cwd.as_deref(), Some("/app"));
    assert_eq!((dfl.uid, dfl.gid), (Some(1000), Some(1000)));
    assert!(dfl.env.contains(&("GREETING".into(), "oci".into())));

    let (names, modes) = mounted_view(&img.root, &["tmp", "app/hello.sh", "bin/busybox"]);
    let want: Vec<&str> = vec![
        ".overlayfs",
        ".overlayfs/lower",
        ".overlayfs/upperfs",
        "app",
        "app/hello.sh",
        "bin",
        "bin/busybox",
        "bin/cat",
        "bin/echo",
        "bin/env",
        "bin/grep",
        "bin/id",
        "bin/ls",
        "bin/mkdir",
        "bin/nproc",
        "bin/pwd",
        "bin/rm",
        "bin/sh",
        "bin/sleep",
        "bin/stty",
        "bin/sync",
        "bin/test",
        "bin/uname",
        "dev",
        "etc",
        "etc/group",
        "etc/passwd",
        "proc",
        "root",
        "run",
        "srv",
        "srv/new",
        "sys",
        "tmp",
    ];
    assert_eq!(names, want, "layer 2 deleted etc/motd and hid srv/old");
    assert_eq!(
        modes,
        vec![
            ("tmp".to_string(), Some(0o1777)),
            ("app/hello.sh".to_string(), Some(0o755)),
            ("bin/busybox".to_string(), Some(0o755)),
        ]
    );

    // The name is taken: refused, and nothing half-made stays in the store.
    let e = store::import_in(&store_dir, &archive, None, None).unwrap_err();
    assert!(e.to_string().contains("vmrun images rm busybox:1"), "{e}");
    let entries: Vec<String> = std::fs::read_dir(&store_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(entries, vec!["busybox:1"]);

    // `vmrun commit` of a capture tar over the image: its root shared, the capture on top,
    // the image's defaults kept.
    let cap = d.path().join("cap.tar");
    std::fs::write(
        &cap,
        layer_tar(&[
            Entry::Dir("app"),
            Entry::File("app/added", b"added\n", 0o644),
        ]),
    )
    .unwrap();
    let cli = |args: &[&str]| {
        let mut c = vmrun();
        c.env(store::IMAGE_DIR_ENV, &store_dir)
            .env("VMRUN_CACHE", d.path().join("cache"))
            .args(args);
        run(c, b"", &Budget::new("a vmrun image command", 60, 120))
    };
    let (code, out, err) = cli(&[
        "commit",
        cap.to_str().unwrap(),
        "committed",
        "--image",
        "busybox:1",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("--image committed"), "{out}");
    let c = store::load_in(&store_dir, "committed").unwrap();
    assert_eq!(c.layers.len(), 1);
    assert_eq!(
        std::fs::metadata(&c.root).unwrap().ino(),
        std::fs::metadata(&img.root).unwrap().ino(),
        "the root is linked, not copied"
    );
    assert_eq!(c.defaults, img.defaults);
    let (names, _) = mounted_view(&c.layers[0], &[]);
    assert_eq!(names, vec!["app", "app/added"]);

    let (code, out, err) = cli(&["images", "ls"]);
    assert_eq!(code, 0, "{err}");
    for n in ["busybox:1", "committed"] {
        assert!(out.lines().any(|l| l.starts_with(n)), "{n} in:\n{out}");
    }
    let (code, _, err) = cli(&["images", "rm", "committed", "busybox:1"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = cli(&["images", "rm", "committed"]);
    assert_eq!(code, 125, "removing it twice is an error");
    assert!(err.contains("no image committed"), "{err}");
    assert_eq!(std::fs::read_dir(&store_dir).unwrap().count(), 0);
}
