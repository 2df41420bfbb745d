//! Each agent handler through the real dispatch (`server::handle`) over a socket pair, with the
//! agent rooted in a temporary directory: no root, no loop devices, no VM. The T2 suite
//! (`tests/tests/agent_t2.rs`) covers what needs root: a real overlay root, whiteouts, chroot.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread::JoinHandle;

use vmrun_agent::{server, Config};
use vmrun_protocol::agent::{
    kind, read_frame, write_frame, DataReader, DataWriter, ErrorInfo, ErrorKind, Exec, ExitStatus,
    FileKind, Reply, Request, Upload, VERSION,
};

fn config(root: &Path) -> Config {
    Config {
        root: root.into(),
        upper: "/upper".into(),
        chroot: false,
        exit_on_shutdown: false,
        root_fd: None,
    }
}

/// One connection to the agent, served by `server::handle` on a thread.
struct Conn {
    s: UnixStream,
    buf: Vec<u8>,
    served: Option<JoinHandle<bool>>,
}

impl Conn {
    fn open(cfg: &Config, req: &Request) -> Conn {
        let (mut ours, mut theirs) = UnixStream::pair().unwrap();
        let cfg = cfg.clone();
        let served = std::thread::spawn(move || server::handle(&mut theirs, &cfg));
        let mut buf = Vec::new();
        write_frame(&mut ours, kind::HELLO, &VERSION.to_le_bytes()).unwrap();
        assert_eq!(
            read_frame(&mut ours, &mut buf).unwrap(),
            Some(kind::HELLO_OK)
        );
        write_frame(&mut ours, kind::REQUEST, &req.encode()).unwrap();
        Conn {
            s: ours,
            buf,
            served: Some(served),
        }
    }

    fn frame(&mut self) -> Option<u8> {
        read_frame(&mut self.s, &mut self.buf).unwrap()
    }

    /// The next frame must be ERROR: its details.
    fn error(&mut self) -> ErrorInfo {
        let k = self.frame();
        assert_eq!(k, Some(kind::ERROR), "expected ERROR");
        ErrorInfo::decode(&self.buf).unwrap()
    }

    fn reply(&mut self) -> Reply {
        let k = self.frame();
        assert_eq!(k, Some(kind::REPLY), "expected REPLY");
        Reply::decode(&self.buf).unwrap()
    }

    /// Waits for the handler; true when it was a shutdown.
    fn finish(mut self) -> bool {
        drop(self.s);
        self.served.take().unwrap().join().unwrap()
    }
}

fn upload(
    cfg: &Config,
    path: &str,
    mode: u32,
    parents: bool,
    data: &[u8],
) -> Result<u64, ErrorInfo> {
    let req = Request::Upload(Upload {
        path: path.into(),
        mode,
        create_parents: parents,
        fsync: true,
    });
    let mut c = Conn::open(cfg, &req);
    match c.frame() {
        Some(kind::OK) => {}
        Some(kind::ERROR) => return Err(ErrorInfo::decode(&c.buf).unwrap()),
        other => panic!("upload start: {other:?}"),
    }
    let mut w = DataWriter::new(c.s.try_clone().unwrap());
    w.write_all(data).unwrap();
    w.finish().unwrap();
    let r = match c.frame() {
        Some(kind::OK) => Ok(u64::from_le_bytes(c.buf[..8].try_into().unwrap())),
        Some(kind::ERROR) => Err(ErrorInfo::decode(&c.buf).unwrap()),
        other => panic!("upload end: {other:?}"),
    };
    assert!(!c.finish());
    r
}

fn exec(cfg: &Config, x: Exec, stdin: Option<&[u8]>) -> (ExitStatus, Vec<u8>, Vec<u8>) {
    let mut x = x;
    x.stdin = stdin.is_some();
    let mut c = Conn::open(cfg, &Request::Exec(x));
    match c.frame() {
        Some(kind::STARTED) => {}
        Some(kind::ERROR) => panic!("exec: {}", ErrorInfo::decode(&c.buf).unwrap()),
        other => panic!("exec: {other:?}"),
    }
    if let Some(data) = stdin {
        let mut w = DataWriter::new(c.s.try_clone().unwrap());
        w.write_all(data).unwrap();
        w.finish().unwrap();
    }
    let (mut out, mut err) = (Vec::new(), Vec::new());
    loop {
        match c.frame() {
            Some(kind::STDOUT) => out.extend_from_slice(&c.buf),
            Some(kind::STDERR) => err.extend_from_slice(&c.buf),
            Some(kind::EXIT) => {
                let st = ExitStatus::decode(&c.buf).unwrap();
                c.finish();
                return (st, out, err);
            }
            other => panic!("exec: unexpected {other:?}"),
        }
    }
}

fn sh(script: &str) -> Exec {
    Exec {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

#[test]
fn upload_writes_atomically_with_its_mode_and_names_its_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let data: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(
        upload(&cfg, "/a/b/file.bin", 0o640, true, &data).unwrap(),
        data.len() as u64
    );
    let p = dir.path().join("a/b/file.bin");
    assert!(std::fs::read(&p).unwrap() == data);
    assert_eq!(
        std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
        0o640
    );
    // Nothing but the file: the temporary name is gone.
    let names: Vec<_> = std::fs::read_dir(dir.path().join("a/b")).unwrap().collect();
    assert_eq!(names.len(), 1);

    let e = upload(&cfg, "/missing/x", 0o644, false, b"x").unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
    let e = upload(&cfg, "/a", 0o644, true, b"x").unwrap_err();
    assert_eq!(e.kind, ErrorKind::IsADirectory, "{e}");
    let e = upload(&cfg, "relative", 0o644, true, b"x").unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
    let e = upload(&cfg, "/a/../../escape", 0o644, true, b"x").unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
}

#[test]
fn an_abandoned_upload_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let req = Request::Upload(Upload {
        path: "/partial.bin".into(),
        mode: 0o644,
        create_parents: false,
        fsync: false,
    });
    let mut c = Conn::open(&cfg, &req);
    assert_eq!(c.frame(), Some(kind::OK));
    write_frame(&mut c.s, kind::DATA, &[7u8; 1000]).unwrap();
    // The client goes away without EOF.
    assert!(!c.finish());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn download_stat_list_mkdir_remove() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    std::fs::write(dir.path().join("f.txt"), b"contents\n").unwrap();

    let mut c = Conn::open(
        &cfg,
        &Request::Download {
            path: "/f.txt".into(),
        },
    );
    assert!(matches!(c.reply(), Reply::File { size: 9, .. }));
    let mut got = Vec::new();
    let mut buf = Vec::new();
    DataReader::new(&mut c.s, &mut buf)
        .copy_to(&mut got)
        .unwrap();
    assert_eq!(got, b"contents\n");
    c.finish();

    let mut c = Conn::open(&cfg, &Request::Download { path: "/".into() });
    assert_eq!(c.error().kind, ErrorKind::IsADirectory);
    c.finish();
    let mut c = Conn::open(
        &cfg,
        &Request::Download {
            path: "/nope".into(),
        },
    );
    assert_eq!(c.error().kind, ErrorKind::NotFound);
    c.finish();

    let mut c = Conn::open(
        &cfg,
        &Request::Mkdir {
            path: "/d/e".into(),
            mode: 0o700,
            parents: true,
        },
    );
    assert_eq!(c.frame(), Some(kind::OK));
    c.finish();
    let mut c = Conn::open(
        &cfg,
        &Request::Stat {
            path: "/d/e".into(),
        },
    );
    match c.reply() {
        Reply::Stat(s) => {
            assert_eq!(s.kind, FileKind::Dir);
            assert_eq!(s.mode & 0o777, 0o700);
        }
        r => panic!("{r:?}"),
    }
    c.finish();
    let mut c = Conn::open(&cfg, &Request::List { path: "/".into() });
    match c.reply() {
        Reply::List(v) => {
            let names: Vec<&str> = v.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(names, vec!["d", "f.txt"]);
        }
        r => panic!("{r:?}"),
    }
    c.finish();
    // A non-empty directory needs `recursive`.
    let mut c = Conn::open(
        &cfg,
        &Request::Remove {
            path: "/d".into(),
            recursive: false,
        },
    );
    let e = c.error();
    assert!(e.message.starts_with("remove /d"), "{e}");
    c.finish();
    let mut c = Conn::open(
        &cfg,
        &Request::Remove {
            path: "/d".into(),
            recursive: true,
        },
    );
    assert_eq!(c.frame(), Some(kind::OK));
    c.finish();
    assert!(!dir.path().join("d").exists());
    let mut c = Conn::open(&cfg, &Request::Stat { path: "/d".into() });
    assert_eq!(c.error().kind, ErrorKind::NotFound);
    c.finish();
}

#[test]
fn exec_streams_statuses_stdin_and_start_failures() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let (st, out, err) = exec(&cfg, sh("echo out; echo err >&2; exit 3"), None);
    assert_eq!(
        (st, out.as_slice(), err.as_slice()),
        (ExitStatus::Exited(3), &b"out\n"[..], &b"err\n"[..])
    );
    let (st, out, _) = exec(&cfg, sh("tr a-z A-Z"), Some(b"shout\n"));
    assert_eq!(
        (st, out.as_slice()),
        (ExitStatus::Exited(0), &b"SHOUT\n"[..])
    );
    // The working directory is resolved under the root, the environment added.
    std::fs::create_dir(dir.path().join("w")).unwrap();
    let mut x = sh("pwd; echo $GREETING");
    x.cwd = Some("/w".into());
    x.env = vec![("GREETING".into(), "hi".into())];
    let (_, out, _) = exec(&cfg, x, None);
    let want = format!("{}\nhi\n", dir.path().join("w").display());
    assert_eq!(String::from_utf8_lossy(&out), want);
    // Killed by a signal, timed out.
    let (st, _, _) = exec(&cfg, sh("kill -TERM $$"), None);
    assert_eq!(st, ExitStatus::Signaled(libc::SIGTERM));
    let mut x = sh("sleep 30");
    x.timeout_ms = Some(200);
    assert_eq!(exec(&cfg, x, None).0, ExitStatus::TimedOut);
    // A program that does not exist: an ERROR before STARTED, with the errno.
    let mut c = Conn::open(
        &cfg,
        &Request::Exec(Exec {
            argv: vec!["no-such-program-anywhere".into()],
            ..Default::default()
        }),
    );
    let e = c.error();
    assert_eq!((e.kind, e.errno), (ErrorKind::Spawn, libc::ENOENT), "{e}");
    c.finish();
}

/// The capture's tar, whole.
fn capture(cfg: &Config) -> Vec<u8> {
    drain(Conn::open(cfg, &Request::Capture))
}

/// Everything a connection streams back (DATA… EOF), then its end.
fn drain(mut c: Conn) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    DataReader::new(&mut c.s, &mut buf)
        .copy_to(&mut out)
        .unwrap();
    c.finish();
    out
}

#[test]
fn capture_streams_the_upper_as_a_tar_and_says_when_there_is_none() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let mut c = Conn::open(&cfg, &Request::Capture);
    let e = c.error();
    assert!(e.message.contains("no overlay upper layer"), "{e}");
    c.finish();

    let upper = dir.path().join("upper");
    std::fs::create_dir_all(upper.join("etc")).unwrap();
    std::fs::write(upper.join("etc/hostname"), b"box\n").unwrap();
    std::fs::hard_link(upper.join("etc/hostname"), upper.join("etc/again")).unwrap();
    std::os::unix::fs::symlink("hostname", upper.join("etc/link")).unwrap();
    let tar = capture(&cfg);
    let mut seen = Vec::new();
    for e in tar::Archive::new(tar.as_slice()).entries().unwrap() {
        let e = e.unwrap();
        let p = e.path().unwrap().to_string_lossy().into_owned();
        seen.push((p, e.header().entry_type()));
    }
    let has = |p: &str, t: tar::EntryType| {
        seen.iter()
            .any(|(q, u)| q.trim_end_matches('/') == p && *u == t)
    };
    assert!(has("etc", tar::EntryType::Directory), "{seen:?}");
    assert!(has("etc/again", tar::EntryType::Regular), "{seen:?}");
    assert!(has("etc/hostname", tar::EntryType::Link), "{seen:?}");
    assert!(has("etc/link", tar::EntryType::Symlink), "{seen:?}");
}

/// `tar` extracted by GNU tar into `dir/out`, which it returns.
fn gnu_extract(dir: &Path, tar: &[u8]) -> std::path::PathBuf {
    let t = dir.join("c.tar");
    std::fs::write(&t, tar).unwrap();
    let out = dir.join("out");
    std::fs::create_dir(&out).unwrap();
    let ok = std::process::Command::new("tar")
        .arg("-xf")
        .arg(&t)
        .arg("-C")
        .arg(&out)
        .status()
        .unwrap()
        .success();
    assert!(ok, "GNU tar extracts the capture");
    out
}

/// Found by the capture_writer fuzz target: the tar crate's link writer rewrote a symlink to
/// `/` as `//` (and would fold `a//b/` to `a/b`). Targets go into the capture byte for byte,
/// a long one through a PAX `linkpath` record that GNU tar restores.
#[test]
fn capture_keeps_symlink_targets_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let upper = dir.path().join("upper");
    std::fs::create_dir_all(&upper).unwrap();
    let long = format!("{}/end", "d".repeat(150));
    let targets = ["/", "a//b/", "./x", "..", long.as_str()];
    for (i, t) in targets.iter().enumerate() {
        std::os::unix::fs::symlink(t, upper.join(format!("l{i}"))).unwrap();
    }
    let tar = capture(&cfg);
    let mut got = Vec::new();
    for e in tar::Archive::new(tar.as_slice()).entries().unwrap() {
        let e = e.unwrap();
        if e.header().entry_type() == tar::EntryType::Symlink {
            let p = e.path().unwrap().to_string_lossy().into_owned();
            let t = e.link_name_bytes().unwrap().into_owned();
            got.push((p, String::from_utf8(t).unwrap()));
        }
    }
    got.sort();
    let want: Vec<(String, String)> = targets
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("l{i}"), t.to_string()))
        .collect();
    assert_eq!(got, want);
    // GNU tar reads the same.
    let out = gnu_extract(dir.path(), &tar);
    for (i, want) in targets.iter().enumerate() {
        let got = std::fs::read_link(out.join(format!("l{i}"))).unwrap();
        assert_eq!(got.to_str().unwrap(), *want);
    }
}

/// Found by the capture_writer fuzz target: a name over 100 bytes that starts with bytes that
/// are not UTF-8 failed the whole capture (the tar crate's long-name writer cut it to its
/// valid UTF-8 prefix, which was empty), and a long name with a newline came back cut (the tar
/// crate's reader splits PAX records at newlines). Names and hard-link targets go in byte for
/// byte, long ones through GNU long-name/long-link entries that the tar crate and GNU tar read.
#[test]
fn capture_keeps_long_names_that_are_not_utf8() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let upper = dir.path().join("upper");
    std::fs::create_dir_all(&upper).unwrap();
    let mut long = vec![0xba, 0xc6, b'@', 0x01, 0xc1];
    long.extend(std::iter::repeat_n(b'F', 120));
    long.extend_from_slice(b"\nand a newline\n");
    let mut exact = vec![0xff];
    exact.extend(std::iter::repeat_n(b'e', 99));
    let mut link = long.clone();
    link.extend_from_slice(b".link");
    let names = [long.clone(), exact.clone(), link.clone()];
    std::fs::write(upper.join(OsStr::from_bytes(&long)), b"first").unwrap();
    std::fs::write(upper.join(OsStr::from_bytes(&exact)), b"exactly 100").unwrap();
    std::fs::hard_link(
        upper.join(OsStr::from_bytes(&long)),
        upper.join(OsStr::from_bytes(&link)),
    )
    .unwrap();
    let tar = capture(&cfg);
    let mut got = Vec::new();
    for e in tar::Archive::new(tar.as_slice()).entries().unwrap() {
        let e = e.unwrap();
        let p = e.path_bytes().into_owned();
        let l = e.link_name_bytes().map(|l| l.into_owned());
        got.push((p, e.header().entry_type(), l));
    }
    got.sort_by(|a, b| a.0.cmp(&b.0));
    for n in &names {
        assert!(got.iter().any(|g| &g.0 == n), "{n:?} is in {got:?}");
    }
    let hard = got.iter().find(|g| g.0 == link || g.0 == long).unwrap();
    let other = got
        .iter()
        .find(|g| (g.0 == link || g.0 == long) && g.0 != hard.0)
        .unwrap();
    assert_eq!(other.1, tar::EntryType::Link, "{got:?}");
    assert_eq!(other.2.as_deref(), Some(hard.0.as_slice()));
    // GNU tar restores the same names, the hard link included.
    let out = gnu_extract(dir.path(), &tar);
    for n in &names {
        assert!(out.join(OsStr::from_bytes(n)).is_file(), "{n:?} restored");
    }
    use std::os::unix::fs::MetadataExt;
    let a = std::fs::metadata(out.join(OsStr::from_bytes(&long))).unwrap();
    let b = std::fs::metadata(out.join(OsStr::from_bytes(&link))).unwrap();
    assert_eq!(a.ino(), b.ino(), "the hard link is restored as one");
}

#[test]
fn bad_handshakes_are_errors_and_shutdown_ends_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    // A version the agent does not speak.
    let (mut ours, mut theirs) = UnixStream::pair().unwrap();
    let c2 = cfg.clone();
    let t = std::thread::spawn(move || server::handle(&mut theirs, &c2));
    write_frame(&mut ours, kind::HELLO, &(VERSION + 1).to_le_bytes()).unwrap();
    let mut buf = Vec::new();
    assert_eq!(read_frame(&mut ours, &mut buf).unwrap(), Some(kind::ERROR));
    assert_eq!(ErrorInfo::decode(&buf).unwrap().kind, ErrorKind::Version);
    drop(ours);
    assert!(!t.join().unwrap());
    // A request before HELLO.
    let (mut ours, mut theirs) = UnixStream::pair().unwrap();
    let c2 = cfg.clone();
    let t = std::thread::spawn(move || server::handle(&mut theirs, &c2));
    write_frame(&mut ours, kind::REQUEST, &Request::Capture.encode()).unwrap();
    assert_eq!(read_frame(&mut ours, &mut buf).unwrap(), Some(kind::ERROR));
    assert_eq!(ErrorInfo::decode(&buf).unwrap().kind, ErrorKind::Protocol);
    drop(ours);
    assert!(!t.join().unwrap());
    // Shutdown: OK, and the handler says the server should stop.
    let mut c = Conn::open(&cfg, &Request::Shutdown);
    assert_eq!(c.frame(), Some(kind::OK));
    assert!(c.finish());
}

#[test]
fn archives_go_out_and_come_back_in() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    std::fs::create_dir_all(dir.path().join("src/sub")).unwrap();
    std::fs::write(dir.path().join("src/a.txt"), b"aaa").unwrap();
    std::fs::write(dir.path().join("src/sub/b.txt"), b"bb").unwrap();
    std::os::unix::fs::symlink("a.txt", dir.path().join("src/link")).unwrap();

    let tar = drain(Conn::open(
        &cfg,
        &Request::ArchiveOut {
            path: "/src".into(),
        },
    ));

    // Back in, under another directory: the tree arrives whole, the link as a link.
    let mut c = Conn::open(
        &cfg,
        &Request::ArchiveIn {
            path: "/dst/deep".into(),
        },
    );
    assert_eq!(c.frame(), Some(kind::OK));
    let mut w = DataWriter::new(c.s.try_clone().unwrap());
    w.write_all(&tar).unwrap();
    w.finish().unwrap();
    assert_eq!(c.frame(), Some(kind::OK));
    let entries = u64::from_le_bytes(c.buf[..8].try_into().unwrap());
    let bytes = u64::from_le_bytes(c.buf[8..16].try_into().unwrap());
    c.finish();
    assert_eq!((entries, bytes), (5, 5), "src, a.txt, link, sub, b.txt");
    let out = dir.path().join("dst/deep/src");
    assert_eq!(std::fs::read(out.join("sub/b.txt")).unwrap(), b"bb");
    assert_eq!(
        std::fs::read_link(out.join("link")).unwrap(),
        Path::new("a.txt")
    );

    let mut c = Conn::open(
        &cfg,
        &Request::ArchiveOut {
            path: "/missing".into(),
        },
    );
    assert_eq!(c.error().kind, ErrorKind::NotFound);
    c.finish();
}
