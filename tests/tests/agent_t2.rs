//! T2: the real agent serving a real overlay root, on the host: the Debian rootfs image
//! loop-mounted read-only as the lower, a tmpfs upper, overlayfs — built by vmrun-init's own
//! mount plan in a private mount namespace — and driven by the real host client over a Unix
//! socket. Only the transport and the root path differ from the guest.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vmrun::api::agent::{is_no_space, AgentClient, Endpoint, Event};
use vmrun_agent::server::{serve, Listener};
use vmrun_protocol::agent::{
    kind, read_frame, write_frame, ErrorKind, Exec, ExitStatus, FileKind, MAX_FRAME,
};
use vmrun_tests::host::{
    gnu_tar_extract, in_private_ns, is_root, t2_can_run, tar_listings, xattr, Loop,
};
use vmrun_tests::read_tar;

fn rootfs(test: &str) -> Option<PathBuf> {
    let root = is_root();
    let img = vmrun::launch::images::default_rootfs();
    t2_can_run(test, root && img.exists(), || {
        format!(
            "needs root ({root}) and the rootfs image {} (`vmrun images build rootfs`)",
            img.display()
        )
    })
    .then_some(img)
}

fn exec(argv: &[&str]) -> Exec {
    Exec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn sh(script: &str) -> Exec {
    exec(&["/bin/sh", "-c", script])
}

/// Runs `script`, which must succeed (its stderr is the failure message).
fn sh_ok(c: &AgentClient, script: &str) {
    let out = c.exec(sh(script), None).unwrap();
    assert_eq!(
        out.status,
        ExitStatus::Exited(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A guest in miniature: the overlay root and the agent on a Unix socket. `f` runs with a
/// client; the namespace, mounts and loop device go away afterwards.
fn with_agent<T: Send + 'static>(
    img: &Path,
    overlay_size: Option<&str>,
    f: impl FnOnce(&AgentClient, &Path) -> T + Send + 'static,
) -> T {
    with_layers(img, &[], overlay_size, f)
}

/// [`with_agent`] with read-only layer images stacked above `img` (bottom first), as
/// `root.layers=` stacks them in the guest.
fn with_layers<T: Send + 'static>(
    img: &Path,
    layers: &[PathBuf],
    overlay_size: Option<&str>,
    f: impl FnOnce(&AgentClient, &Path) -> T + Send + 'static,
) -> T {
    let work = tempfile::tempdir().unwrap();
    let sock = work.path().join("agent.sock");
    let base = work.path().join("base");
    let dev = Loop::attach(img, true);
    let mut cmdline = format!("root={} root.overlay=tmpfs", dev.0);
    if let Some(s) = overlay_size {
        cmdline.push_str(&format!(" root.overlaysize={s}"));
    }
    let layer_devs: Vec<Loop> = layers.iter().map(|l| Loop::attach(l, true)).collect();
    if !layer_devs.is_empty() {
        let list: Vec<&str> = layer_devs.iter().map(|l| l.0.as_str()).collect();
        cmdline.push_str(&format!(" root.layers={}", list.join(",")));
    }
    let result = in_private_ns(move || {
        let cfg = vmrun_init::cmdline::parse(&cmdline).unwrap();
        vmrun_init::mount_kernel_filesystems(&base).unwrap();
        let root = vmrun_init::plan::build_root(&cfg, &base).unwrap();
        let listener = UnixListener::bind(&sock).unwrap();
        let acfg = vmrun_agent::Config {
            root: root.path.clone(),
            upper: "/.overlayfs/upperfs/upper".into(),
            chroot: true,
            exit_on_shutdown: false,
            root_fd: None,
        };
        let server = std::thread::spawn(move || serve(Listener::Unix(listener), acfg));
        let client = AgentClient::new(Endpoint::Unix(sock));
        let r = f(&client, &root.path);
        client.shutdown().unwrap();
        server.join().unwrap().unwrap();
        r
    });
    drop(layer_devs);
    drop(dev);
    drop(work);
    result
}

#[test]
fn upload_is_seen_by_exec_at_once_and_lands_only_in_the_capture() {
    let name = "upload_is_seen_by_exec_at_once_and_lands_only_in_the_capture";
    let Some(img) = rootfs(name) else { return };
    let marker = format!("seed-bug-{}-{:?}", std::process::id(), Instant::now());
    let m2 = marker.clone();
    let (out, tar, newroot) = with_agent(&img, None, move |c, root| {
        let n = c
            .upload("/work/dir/hello.txt", 0o640, true, false, m2.as_bytes())
            .unwrap();
        assert_eq!(n, m2.len() as u64);
        // No sleep: the upload went through the same kernel the command reads from.
        let out = c.exec(exec(&["cat", "/work/dir/hello.txt"]), None).unwrap();
        let mut tar = Vec::new();
        c.capture(&mut tar).unwrap();
        (out, tar, root.to_path_buf())
    });
    assert_eq!(out.status, ExitStatus::Exited(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), marker);
    let entries = read_tar(&tar);
    let e = entries
        .get("work/dir/hello.txt")
        .expect("the upload is in the capture");
    assert_eq!(
        (e.data.as_slice(), e.mode & 0o777),
        (marker.as_bytes(), 0o640)
    );
    // The overlay lived in a private namespace: the file exists nowhere on the host.
    assert!(!newroot.join("work/dir/hello.txt").exists());
}

#[test]
fn capture_holds_files_whiteouts_opaque_dirs_links_and_matches_a_host_extract() {
    let name = "capture_holds_files_whiteouts_opaque_dirs_links_and_matches_a_host_extract";
    let Some(img) = rootfs(name) else { return };
    let tar = with_agent(&img, None, |c, _| {
        let script = "set -e; echo new > /new.txt; echo changed > /etc/hostname; rm /etc/issue; \
                      rm -rf /etc/skel; mkdir /etc/skel; echo fresh > /etc/skel/only; \
                      ln -s /new.txt /link; ln /new.txt /hard; mkdir -p /data; \
                      head -c 100000 /dev/urandom > /data/blob; chmod 600 /data/blob";
        sh_ok(c, script);
        let mut tar = Vec::new();
        c.capture(&mut tar).unwrap();
        tar
    });
    let t = read_tar(&tar);
    // "hard" sorts first: it carries the data, "new.txt" links to it.
    assert_eq!(
        (t["hard"].kind, t["hard"].data.as_slice()),
        (b'0', &b"new\n"[..])
    );
    assert_eq!(t["etc/hostname"].data, b"changed\n");
    let wh = &t["etc/issue"];
    assert_eq!((wh.kind, wh.dev), (b'3', (0, 0)), "whiteout is char 0/0");
    assert_eq!(
        t["etc/skel"]
            .xattrs
            .get("trusted.overlay.opaque")
            .map(Vec::as_slice),
        Some(&b"y"[..]),
        "opaque dir"
    );
    assert_eq!(t["etc/skel/only"].data, b"fresh\n");
    assert!(
        !t.contains_key("etc/skel/.bashrc"),
        "the replaced directory's old content is not captured"
    );
    assert_eq!(
        (t["link"].kind, t["link"].link.as_deref()),
        (b'2', Some("/new.txt"))
    );
    assert_eq!(
        (t["new.txt"].kind, t["new.txt"].link.as_deref()),
        (b'1', Some("hard")),
        "hardlink to the first name"
    );
    assert_eq!(
        (t["data/blob"].data.len(), t["data/blob"].mode & 0o777),
        (100_000, 0o600)
    );
    assert!(
        !t.contains_key("etc/passwd"),
        "untouched lower files are not in the upper"
    );

    // GNU tar on the host extracts it to the same tree.
    let dir = tempfile::tempdir().unwrap();
    let tarfile = dir.path().join("upper.tar");
    std::fs::write(&tarfile, &tar).unwrap();
    let x = dir.path().join("x");
    std::fs::create_dir(&x).unwrap();
    gnu_tar_extract(&tarfile, &x);
    // GNU tar, BusyBox tar and Python's tarfile all read it, and see the same entries.
    for (reader, names) in tar_listings(&tarfile) {
        for want in ["etc/issue", "etc/skel/only", "new.txt", "hard", "data/blob"] {
            assert!(names.iter().any(|n| n == want), "{reader} lists {names:?}");
        }
    }
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let wh = std::fs::symlink_metadata(x.join("etc/issue")).unwrap();
    assert!(wh.file_type().is_char_device() && wh.rdev() == 0);
    assert_eq!(std::fs::read(x.join("new.txt")).unwrap(), b"new\n");
    assert_eq!(
        std::fs::metadata(x.join("hard")).unwrap().ino(),
        std::fs::metadata(x.join("new.txt")).unwrap().ino()
    );
    assert_eq!(
        xattr(&x.join("etc/skel"), "trusted.overlay.opaque"),
        Some(b"y".to_vec())
    );
}

#[test]
fn exec_results_streams_and_failures() {
    let name = "exec_results_streams_and_failures";
    let Some(img) = rootfs(name) else { return };
    with_agent(&img, None, |c, _| {
        let o = c.exec(sh("echo out; echo err >&2; exit 3"), None).unwrap();
        assert_eq!(
            (o.status, o.stdout.as_slice(), o.stderr.as_slice()),
            (ExitStatus::Exited(3), &b"out\n"[..], &b"err\n"[..])
        );
        let o = c.exec(sh("kill -TERM $$"), None).unwrap();
        assert_eq!(o.status, ExitStatus::Signaled(15));
        let o = c.exec(exec(&["cat"]), Some(b"piped stdin")).unwrap();
        assert_eq!(o.stdout, b"piped stdin");
        let o = c
            .exec(
                Exec {
                    cwd: Some("/etc".into()),
                    env: vec![("GREETING".into(), "hi".into())],
                    ..sh("pwd; echo $GREETING")
                },
                None,
            )
            .unwrap();
        assert_eq!(o.stdout, b"/etc\nhi\n");
        let o = c
            .exec(
                Exec {
                    uid: Some(65534),
                    gid: Some(65534),
                    ..exec(&["id", "-u"])
                },
                None,
            )
            .unwrap();
        assert_eq!(o.stdout, b"65534\n");
        // A missing binary fails to start, with ENOENT.
        let e = c.exec(exec(&["/no/such/binary"]), None).unwrap_err();
        let r = e.remote().expect("an agent error");
        assert_eq!((r.kind, r.errno), (ErrorKind::Spawn, libc::ENOENT), "{r:?}");
        // The timeout kills the whole process group.
        let t = Instant::now();
        let o = c
            .exec(
                Exec {
                    timeout_ms: Some(300),
                    ..sh("sleep 30 & sleep 30; echo never")
                },
                None,
            )
            .unwrap();
        assert_eq!(o.status, ExitStatus::TimedOut);
        assert!(t.elapsed() < Duration::from_secs(10));
        // SIGKILL is delivered at once but a busy host may take a moment to run the dying
        // processes to their end: give them a few seconds, no more.
        let gone = Instant::now();
        loop {
            let ps = c
                .exec(sh("ps -eo args | grep -c '^sleep 30' || true"), None)
                .unwrap();
            let left = String::from_utf8_lossy(&ps.stdout).trim().to_string();
            if left == "0" {
                break;
            }
            assert!(
                gone.elapsed() < Duration::from_secs(10),
                "no sleeper survives: {left} still run 10s after the timeout"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // A grandchild that keeps stdout open does not hold back the result.
        let t = Instant::now();
        let o = c
            .exec(sh("echo before; (sleep 20 &) ; exit 5"), None)
            .unwrap();
        assert_eq!(
            (o.status, o.stdout.as_slice()),
            (ExitStatus::Exited(5), &b"before\n"[..])
        );
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "took {:?}",
            t.elapsed()
        );
        // A huge argv is refused before it is sent.
        let huge = "x".repeat(MAX_FRAME);
        assert!(c.exec(exec(&["echo", &huge]), None).is_err());
        // Stdout arrives while the command runs.
        let mut p = c
            .spawn(Exec {
                stdin: true,
                ..sh("echo first; read line; echo got:$line")
            })
            .unwrap();
        assert_eq!(
            p.next_event().unwrap(),
            Some(Event::Stdout(b"first\n".to_vec()))
        );
        p.write_stdin(b"ping\n").unwrap();
        assert_eq!(
            p.next_event().unwrap(),
            Some(Event::Stdout(b"got:ping\n".to_vec()))
        );
        assert_eq!(
            p.next_event().unwrap(),
            Some(Event::Exit(ExitStatus::Exited(0)))
        );
    });
}

#[test]
fn pty_size_resize_and_signals() {
    let name = "pty_size_resize_and_signals";
    let Some(img) = rootfs(name) else { return };
    with_agent(&img, None, |c, _| {
        let mut p = c
            .spawn(Exec {
                pty: Some((30, 100)),
                stdin: true,
                ..sh("stty size; read x; stty size; sleep 30")
            })
            .unwrap();
        let mut seen = String::new();
        while !seen.contains("30 100") {
            match p.next_event().unwrap() {
                Some(Event::Stdout(b)) => seen.push_str(&String::from_utf8_lossy(&b)),
                other => panic!("{other:?}"),
            }
        }
        p.resize(40, 120).unwrap();
        p.write_stdin(b"go\n").unwrap();
        while !seen.contains("40 120") {
            match p.next_event().unwrap() {
                Some(Event::Stdout(b)) => seen.push_str(&String::from_utf8_lossy(&b)),
                other => panic!("{other:?} after {seen:?}"),
            }
        }
        p.signal(libc::SIGKILL).unwrap();
        loop {
            match p.next_event().unwrap() {
                Some(Event::Exit(s)) => {
                    assert_eq!(s, ExitStatus::Signaled(9));
                    break;
                }
                Some(_) => {}
                None => panic!("no exit"),
            }
        }
    });
}

#[test]
fn file_operations_and_their_errors() {
    let name = "file_operations_and_their_errors";
    let Some(img) = rootfs(name) else { return };
    with_agent(&img, Some("4M"), |c, _| {
        // Download, stat, list, mkdir, remove.
        let mut v = Vec::new();
        let (n, _) = c.download("/etc/debian_version", &mut v).unwrap();
        assert_eq!(n as usize, v.len());
        assert!(!v.is_empty());
        assert_eq!(c.stat("/etc").unwrap().kind, FileKind::Dir);
        c.mkdir("/a/b/c", 0o750, true).unwrap();
        assert_eq!(c.stat("/a/b/c").unwrap().mode & 0o777, 0o750);
        assert!(c
            .list("/a/b")
            .unwrap()
            .iter()
            .any(|(n, s)| n == "c" && s.kind == FileKind::Dir));
        c.remove("/a", true).unwrap();
        assert_eq!(
            c.stat("/a").unwrap_err().remote().unwrap().kind,
            ErrorKind::NotFound
        );
        // Upload errors.
        let e = c
            .upload("/missing/dir/f", 0o644, false, false, &b"x"[..])
            .unwrap_err();
        assert_eq!(e.remote().unwrap().kind, ErrorKind::NotFound, "{e}");
        let e = c
            .upload("/etc", 0o644, false, false, &b"x"[..])
            .unwrap_err();
        assert_eq!(e.remote().unwrap().kind, ErrorKind::IsADirectory, "{e}");
        assert_eq!(
            c.download("/etc", Vec::new())
                .unwrap_err()
                .remote()
                .unwrap()
                .kind,
            ErrorKind::IsADirectory
        );
        // A full upper: ENOSPC by name, and no partial file left.
        let big = vec![0x5au8; 8 << 20];
        let e = c
            .upload("/big.bin", 0o644, false, true, big.as_slice())
            .unwrap_err();
        assert!(is_no_space(&e), "{e}");
        assert!(e.to_string().contains("No space left"), "{e}");
        let left = c
            .exec(sh("ls -a / | grep -c vmrun-upload || true"), None)
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&left.stdout).trim(),
            "0",
            "partial temp file removed"
        );
        assert_eq!(
            c.stat("/big.bin").unwrap_err().remote().unwrap().kind,
            ErrorKind::NotFound
        );
        // Uploads replace atomically and keep the mode.
        c.upload("/etc/motd", 0o600, false, true, &b"v1"[..])
            .unwrap();
        c.upload("/etc/motd", 0o600, false, false, &b"version 2"[..])
            .unwrap();
        let o = c.exec(exec(&["cat", "/etc/motd"]), None).unwrap();
        assert_eq!(o.stdout, b"version 2");
    });
}

/// Symlinks in the root that point out of it (absolute, or `..` past the top) resolve inside
/// the root, as they would for the guest: an upload, a download, a mkdir or a remove through
/// them never touches the host's own files.
#[test]
fn symlinks_never_lead_out_of_the_root() {
    let name = "symlinks_never_lead_out_of_the_root";
    let Some(img) = rootfs(name) else { return };
    let marker = format!("vmrun-escape-{}", std::process::id());
    let host_file = Path::new("/tmp").join(&marker);
    let m = marker.clone();
    let inside = with_agent(&img, None, move |c, root| {
        let o = c
            .exec(
                sh("mkdir -p /tmp && ln -s /tmp /lnk && ln -s ../../../../../../tmp /up"),
                None,
            )
            .unwrap();
        assert_eq!(o.status, vmrun_protocol::agent::ExitStatus::Exited(0));
        c.upload(&format!("/lnk/{m}"), 0o644, false, false, &b"in"[..])
            .unwrap();
        c.upload(&format!("/up/{m}.2"), 0o644, false, false, &b"in"[..])
            .unwrap();
        c.mkdir(&format!("/lnk/{m}.d"), 0o755, false).unwrap();
        let mut v = Vec::new();
        c.download(&format!("/up/{m}"), &mut v).unwrap();
        assert_eq!(v, b"in");
        c.remove(&format!("/up/{m}.d"), false).unwrap();
        root.join("tmp").join(&m).exists()
    });
    assert!(inside, "the upload landed in the root's /tmp");
    for p in [
        host_file.clone(),
        host_file.with_extension("2"),
        host_file.with_extension("d"),
    ] {
        assert!(!p.exists(), "{} was made outside the root", p.display());
    }
}

/// The kind of the ERROR frame the agent answers with on `s`; `None` for anything else.
fn error_kind(s: &mut UnixStream) -> Option<ErrorKind> {
    let mut buf = Vec::new();
    match read_frame(s, &mut buf) {
        Ok(Some(kind::ERROR)) => Some(vmrun_protocol::agent::ErrorInfo::decode(&buf).unwrap().kind),
        _ => None,
    }
}

/// Raw protocol: a client that misbehaves gets an error and a closed connection, and the
/// agent keeps serving others.
#[test]
fn bad_frames_and_disconnects() {
    let name = "bad_frames_and_disconnects";
    let Some(img) = rootfs(name) else { return };
    with_agent(&img, None, |c, _| {
        let Endpoint::Unix(sock) = c.endpoint().clone() else {
            unreachable!()
        };
        // Wrong version.
        let mut s = UnixStream::connect(&sock).unwrap();
        write_frame(&mut s, kind::HELLO, &99u32.to_le_bytes()).unwrap();
        assert_eq!(error_kind(&mut s), Some(ErrorKind::Version));
        // Frame over the cap.
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(&u32::MAX.to_le_bytes()).unwrap();
        s.write_all(&[kind::HELLO]).unwrap();
        assert_eq!(error_kind(&mut s), Some(ErrorKind::Protocol));
        // Unknown frame kind.
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(&[1, 0, 0, 0, 200]).unwrap();
        assert_eq!(error_kind(&mut s), Some(ErrorKind::Protocol));
        // Unknown request.
        let mut s = UnixStream::connect(&sock).unwrap();
        write_frame(&mut s, kind::HELLO, &1u32.to_le_bytes()).unwrap();
        let mut buf = Vec::new();
        assert_eq!(read_frame(&mut s, &mut buf).unwrap(), Some(kind::HELLO_OK));
        write_frame(&mut s, kind::REQUEST, &[77]).unwrap();
        assert_eq!(error_kind(&mut s), Some(ErrorKind::Protocol));
        // Truncated frame, then the client vanishes.
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(&[9, 0, 0, 0, kind::HELLO, 1]).unwrap();
        drop(s);

        // Disconnect mid-upload: no partial file.
        let mut s = UnixStream::connect(&sock).unwrap();
        write_frame(&mut s, kind::HELLO, &1u32.to_le_bytes()).unwrap();
        read_frame(&mut s, &mut buf).unwrap();
        let req = vmrun_protocol::agent::Request::Upload(vmrun_protocol::agent::Upload {
            path: "/half.bin".into(),
            mode: 0o644,
            create_parents: false,
            fsync: false,
        });
        write_frame(&mut s, kind::REQUEST, &req.encode()).unwrap();
        assert_eq!(read_frame(&mut s, &mut buf).unwrap(), Some(kind::OK));
        write_frame(&mut s, kind::DATA, &[1; 1000]).unwrap();
        drop(s);
        std::thread::sleep(Duration::from_millis(300));
        let left = c
            .exec(
                sh("ls -a / | grep -c -e vmrun-upload -e half.bin || true"),
                None,
            )
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&left.stdout).trim(), "0");

        // Disconnect mid-exec: the process group is killed.
        let p = c.spawn(sh("sleep 40 & sleep 40")).unwrap();
        drop(p);
        std::thread::sleep(Duration::from_millis(500));
        let ps = c
            .exec(sh("ps -eo args | grep -c '^sleep 40' || true"), None)
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&ps.stdout).trim(), "0");

        // Still serving.
        assert_eq!(
            c.exec(exec(&["true"]), None).unwrap().status,
            ExitStatus::Exited(0)
        );
    });
}

/// Issue 20's hostile peer: requests before the handshake, counts that lie, non-UTF-8 and
/// escaping paths, hundreds of idle and half-open connections, signal and resize floods and a
/// 50 MB stdout. Each is refused or served as it should be, and the agent serves on.
#[test]
fn hostile_peers_and_floods_are_refused_and_service_continues() {
    let name = "hostile_peers_and_floods_are_refused_and_service_continues";
    let Some(img) = rootfs(name) else { return };
    with_agent(&img, None, |c, root| {
        let Endpoint::Unix(sock) = c.endpoint().clone() else {
            unreachable!()
        };
        let greeted = || {
            let mut s = UnixStream::connect(&sock).unwrap();
            write_frame(&mut s, kind::HELLO, &1u32.to_le_bytes()).unwrap();
            let mut buf = Vec::new();
            assert_eq!(read_frame(&mut s, &mut buf).unwrap(), Some(kind::HELLO_OK));
            s
        };
        let still_serving = |what: &str| {
            let out = c.exec(exec(&["echo", "alive"]), None).unwrap();
            assert_eq!(out.stdout, b"alive\n", "after {what}");
        };

        // A request before the handshake.
        let mut s = UnixStream::connect(&sock).unwrap();
        write_frame(&mut s, kind::REQUEST, &[3, 1, 0, 0, 0, b'/']).unwrap();
        assert_eq!(error_kind(&mut s), Some(ErrorKind::Protocol));
        still_serving("a request before the handshake");

        // Counts that lie: an argv of 4 G strings, an env of 4 G pairs, a path of 4 GiB.
        for body in [
            vec![0u8, 0xff, 0xff, 0xff, 0xff],
            vec![0u8, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff],
            vec![3u8, 0xff, 0xff, 0xff, 0xff, b'/'],
        ] {
            let mut s = greeted();
            write_frame(&mut s, kind::REQUEST, &body).unwrap();
            assert_eq!(error_kind(&mut s), Some(ErrorKind::Protocol), "{body:?}");
        }
        still_serving("lying counts");

        // A path that is not UTF-8.
        let mut s = greeted();
        write_frame(&mut s, kind::REQUEST, &[3, 3, 0, 0, 0, b'/', 0xff, 0xfe]).unwrap();
        assert_eq!(error_kind(&mut s), Some(ErrorKind::Protocol));
        still_serving("a non-UTF-8 path");

        // Traversal: a path with `..` is refused, and nothing lands anywhere.
        let e = c
            .upload(
                "/../../../../tmp/vmrun-escape-probe",
                0o644,
                false,
                false,
                &b"x"[..],
            )
            .unwrap_err();
        let info = e.remote().expect("a refusal from the agent");
        assert_eq!(info.kind, ErrorKind::InvalidInput, "{info:?}");
        assert!(info.message.contains(".."), "{info:?}");
        assert!(
            !Path::new("/tmp/vmrun-escape-probe").exists(),
            "escaped the root"
        );
        assert!(!root.join("tmp/vmrun-escape-probe").exists());
        still_serving("a traversal");

        // 200 idle connections and 200 half-open ones (greeted, then silent), all held open.
        let mut held: Vec<UnixStream> = (0..200)
            .map(|_| UnixStream::connect(&sock).unwrap())
            .collect();
        held.extend((0..200).map(|_| greeted()));
        still_serving("400 connections held open");
        drop(held);

        // Signal and resize floods at a running command on a terminal.
        let mut p = c
            .spawn(Exec {
                pty: Some((24, 80)),
                stdin: true,
                ..sh("trap '' USR1; echo ready; read line; stty size")
            })
            .unwrap();
        // The flood starts once the shell ignores the signal.
        let mut seen = Vec::new();
        while !String::from_utf8_lossy(&seen).contains("ready") {
            match p.next_event().unwrap() {
                Some(Event::Stdout(d)) => seen.extend(d),
                other => panic!("before the shell was ready: {other:?}"),
            }
        }
        for i in 0..2000u16 {
            p.signal(libc::SIGUSR1).unwrap();
            p.resize(10 + i % 50, 20 + i % 100).unwrap();
        }
        p.resize(33, 77).unwrap();
        p.write_stdin(b"go\n").unwrap();
        let out = p.wait_output(1 << 20).unwrap();
        assert_eq!(out.status, ExitStatus::Exited(0));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("33 77"),
            "{:?}",
            String::from_utf8_lossy(&out.stdout)
        );

        // Input for a command started without stdin is refused, not silently dropped.
        let p = c.spawn(sh("sleep 30")).unwrap();
        assert!(matches!(
            p.write_stdin(b"lost"),
            Err(vmrun::api::agent::AgentError::NoStdin)
        ));
        p.signal(libc::SIGKILL).unwrap();
        drop(p);

        // 50 MB on stdout arrives whole.
        let big = 50_000_000usize;
        let out = c
            .exec(sh(&format!("head -c {big} /dev/zero")), None)
            .unwrap();
        assert_eq!(out.status, ExitStatus::Exited(0));
        assert_eq!(out.stdout.len(), big);
        still_serving("the floods");
    });
}

#[test]
fn concurrent_execs_and_a_capture_racing_with_writes() {
    let name = "concurrent_execs_and_a_capture_racing_with_writes";
    let Some(img) = rootfs(name) else { return };
    with_agent(&img, None, |c, _| {
        let (tx, rx) = mpsc::channel();
        std::thread::scope(|sc| {
            for i in 0..20 {
                let (c, tx) = (c.clone(), tx.clone());
                sc.spawn(move || {
                    let o = c.exec(sh(&format!("echo {i}")), None).unwrap();
                    tx.send((i, o)).unwrap();
                });
            }
        });
        drop(tx);
        let mut got: Vec<_> = rx.iter().collect();
        got.sort_by_key(|(i, _)| *i);
        assert_eq!(got.len(), 20);
        for (i, o) in got {
            assert_eq!(
                (o.status, o.stdout),
                (ExitStatus::Exited(0), format!("{i}\n").into_bytes())
            );
        }
        // A writer keeps changing files while captures run: every tar stays readable.
        let writer = c.spawn(sh("i=0; while [ $i -lt 400 ]; do head -c $((i * 97)) /dev/zero > /churn.$((i % 7)); rm -f /churn.$(((i + 3) % 7)); i=$((i+1)); done")).unwrap();
        for _ in 0..5 {
            let mut tar = Vec::new();
            c.capture(&mut tar).unwrap();
            let _ = read_tar(&tar);
            let mut gnu = Command::new("tar")
                .args(["--xattrs", "-tf", "-"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap();
            gnu.stdin.take().unwrap().write_all(&tar).unwrap();
            assert!(gnu.wait().unwrap().success(), "GNU tar reads the capture");
        }
        assert_eq!(
            writer.wait_output(1 << 20).unwrap().status,
            ExitStatus::Exited(0)
        );
    });
}

/// Byte `i` of a reproducible pseudo-random stream (splitmix64 of the word index).
fn word(k: u64) -> [u8; 8] {
    let mut z = k
        .wrapping_add(0x9e3779b97f4a7c15)
        .wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    (z ^ (z >> 31)).to_le_bytes()
}

/// Fills `buf` with the stream from byte `pos` on.
fn fill(pos: u64, buf: &mut [u8]) {
    let mut i = 0;
    while i < buf.len() {
        let p = pos + i as u64;
        let w = word(p / 8);
        let off = (p % 8) as usize;
        let n = (8 - off).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&w[off..off + n]);
        i += n;
    }
}

/// A reader of `len` stream bytes that never holds more than the caller's buffer.
struct Gen {
    pos: u64,
    len: u64,
}

impl Read for Gen {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.len - self.pos) as usize;
        fill(self.pos, &mut buf[..n]);
        self.pos += n as u64;
        Ok(n)
    }
}

/// A writer that checks what it gets against the stream.
#[derive(Default)]
struct Check {
    pos: u64,
    bad: bool,
    scratch: Vec<u8>,
}

impl Write for Check {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.scratch.resize(buf.len(), 0);
        fill(self.pos, &mut self.scratch);
        self.bad |= self.scratch != buf;
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmHWM:")
                .map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap())
        })
        .unwrap()
}

/// One GiB up and back down, streamed: memory stays bounded on both sides (the agent runs in
/// this process here, so the process's peak RSS covers client and agent).
#[test]
fn a_gibibyte_streams_with_bounded_memory() {
    let name = "a_gibibyte_streams_with_bounded_memory";
    let Some(img) = rootfs(name) else { return };
    const N: u64 = 1 << 30;
    let rss_before = peak_rss_kib();
    let (up, down, check, capture, exec_rt) = with_agent(&img, Some("1100M"), |c, _| {
        let t = Instant::now();
        assert_eq!(
            c.upload("/big.bin", 0o644, false, false, Gen { pos: 0, len: N })
                .unwrap(),
            N
        );
        let up = t.elapsed();
        let t = Instant::now();
        let mut check = Check::default();
        let (n, _) = c.download("/big.bin", &mut check).unwrap();
        assert_eq!(n, N);
        let down = t.elapsed();
        let t = Instant::now();
        assert!(c.capture(std::io::sink()).unwrap() > N);
        let capture = t.elapsed();
        let mut rts: Vec<Duration> = (0..21)
            .map(|_| {
                let t = Instant::now();
                assert_eq!(
                    c.exec(exec(&["true"]), None).unwrap().status,
                    ExitStatus::Exited(0)
                );
                t.elapsed()
            })
            .collect();
        rts.sort();
        (up, down, check, capture, rts[10])
    });
    assert!(
        check.pos == N && !check.bad,
        "the bytes came back unchanged"
    );
    let grew = peak_rss_kib().saturating_sub(rss_before);
    eprintln!(
        "T2 host transport: upload 1 GiB {:.0} MiB/s, download {:.0} MiB/s, capture of the 1 GiB file {:.0} MiB/s, exec `true` round trip median {} us, peak RSS growth {} KiB",
        1024.0 / up.as_secs_f64(),
        1024.0 / down.as_secs_f64(),
        1024.0 / capture.as_secs_f64(),
        exec_rt.as_micros(),
        grew
    );
    assert!(
        grew < 64 * 1024,
        "peak RSS grew by {grew} KiB while streaming 1 GiB"
    );
}

/// Issue 21's stack on the host: run 1 writes, deletes a lower file and replaces a directory,
/// and is captured; the capture becomes a layer image (vmrun's own tar → erofs path) and run 2
/// stacked on it sees exactly run 1's final tree, file by file; run 2's own capture holds only
/// run 2's changes. A second layer on top of the first stacks in order.
#[test]
fn a_captured_upper_stacks_as_a_layer_and_the_next_run_sees_exactly_its_tree() {
    let name = "a_captured_upper_stacks_as_a_layer_and_the_next_run_sees_exactly_its_tree";
    let Some(img) = rootfs(name) else { return };
    if !vmrun_tests::host::has_tool("mkfs.erofs") {
        assert!(
            std::env::var_os("VMRUN_REQUIRE_T2").is_none(),
            "{name}: needs mkfs.erofs"
        );
        eprintln!("SKIPPED {name}: needs mkfs.erofs (apt-get install erofs-utils)");
        return;
    }
    const SKIP: &[&str] = &["proc", "sys", "dev", "run", ".overlayfs"];
    let run1 = "set -e; echo new > /new.txt; echo changed > /etc/hostname; rm /etc/issue; \
                rm -rf /etc/skel; mkdir /etc/skel; echo fresh > /etc/skel/only; \
                ln -s /new.txt /link; ln /new.txt /hard; mkdir -p /data/deep; \
                head -c 300000 /dev/urandom > /data/deep/blob; chmod 600 /data/deep/blob; \
                mkfifo /data/pipe; chown 1234:5678 /data/deep";
    let (tar1, view1) = with_agent(&img, None, move |c, root| {
        sh_ok(c, run1);
        let mut tar = Vec::new();
        c.capture(&mut tar).unwrap();
        (tar, vmrun_tests::host::tree_view(root, SKIP))
    });
    // `vmrun diff` of the capture against the image it was taken over: the known change set.
    let changes = vmrun::launch::diff::with_lower(std::slice::from_ref(&img), |lower| {
        vmrun::launch::diff::changes(tar1.as_slice(), lower)
    })
    .unwrap()
    .unwrap();
    let text = vmrun::launch::diff::render(&changes, false);
    let want = "A /data\nA /data/deep\nA /data/deep/blob\nA /data/pipe\nC /etc\n\
                C /etc/hostname\nD /etc/issue\nC /etc/skel\nD /etc/skel/.bash_logout\n\
                D /etc/skel/.bashrc\nD /etc/skel/.profile\nA /etc/skel/only\nA /hard\n\
                A /link\nA /new.txt\n";
    assert_eq!(text, want, "vmrun diff of run 1's capture");
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("layers");
    let tar1_path = work.path().join("run1.tar");
    std::fs::write(&tar1_path, &tar1).unwrap();
    let layer1 = vmrun::launch::layers::image_for(&tar1_path, &cache).unwrap();
    assert_eq!(
        std::fs::read(&tar1_path).unwrap(),
        tar1,
        "the tar is not modified"
    );
    // Built once: the same tar gives the same cached image.
    let again = vmrun::launch::layers::image_for(&tar1_path, &cache).unwrap();
    assert_eq!(layer1, again);

    let run2 = "set -e; echo second > /second.txt; rm /new.txt; echo more >> /etc/skel/only";
    let l1 = vec![layer1.clone()];
    let (tar2, view2_before, view2_after) = with_layers(&img, &l1, None, move |c, root| {
        let before = vmrun_tests::host::tree_view(root, SKIP);
        sh_ok(c, run2);
        let mut tar = Vec::new();
        c.capture(&mut tar).unwrap();
        (tar, before, vmrun_tests::host::tree_view(root, SKIP))
    });
    // Run 2 starts from run 1's final tree, file by file. The root directory's times are
    // always its upper directory's (overlayfs), made fresh at each boot.
    let no_time = |v: &mut std::collections::BTreeMap<String, String>| {
        let root = v.get_mut("").unwrap();
        *root = root.split(" mtime").next().unwrap().to_string();
    };
    let (mut view1, mut view2_before) = (view1, view2_before);
    no_time(&mut view1);
    no_time(&mut view2_before);
    let diff: Vec<_> = view1
        .iter()
        .filter(|(k, v)| view2_before.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}: run 1 {v}, run 2 {:?}", view2_before.get(k)))
        .chain(
            view2_before
                .keys()
                .filter(|k| !view1.contains_key(*k))
                .map(|k| format!("{k}: only in run 2")),
        )
        .collect();
    assert!(
        diff.is_empty(),
        "run 2 differs from run 1:\n{}",
        diff.join("\n")
    );
    assert!(!view1.contains_key("etc/issue") && view1.contains_key("data/pipe"));
    // Run 2's capture holds run 2's changes only.
    let t2 = read_tar(&tar2);
    assert_eq!(
        vmrun_tests::entry_names(&t2),
        vec!["etc", "etc/skel", "etc/skel/only", "new.txt", "second.txt"],
        "{t2:?}"
    );
    assert_eq!(t2["new.txt"].kind, b'3', "the deletion is a whiteout");
    assert_eq!(t2["etc/skel/only"].data, b"fresh\nmore\n");

    // Stacked in order: run 2's layer above run 1's.
    let tar2_path = work.path().join("run2.tar");
    std::fs::write(&tar2_path, &tar2).unwrap();
    let layer2 = vmrun::launch::layers::image_for(&tar2_path, &cache).unwrap();
    let both = vec![layer1, layer2];
    let mut view3 = with_layers(&img, &both, None, |_, root| {
        vmrun_tests::host::tree_view(root, SKIP)
    });
    let mut view2_after = view2_after;
    no_time(&mut view3);
    no_time(&mut view2_after);
    assert_eq!(view3, view2_after, "two layers give run 2's final tree");
}
