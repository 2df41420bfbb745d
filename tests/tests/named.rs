//! Named VMs as a person uses them (T4: real VMs): one boot serves many commands, shells,
//! copies and a capture; a VMM killed from outside shows as dead and `stop` cleans up; and a
//! launcher killed at a chosen moment (SIGTERM while booting or running a command, SIGKILL in
//! the middle of a capture) leaves nothing behind under its runtime directory, the temporary
//! directory or the capture's path. Each test has a runtime directory of its own.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use vmrun_tests::cli::{alive, children_of, have_tmux, run, vmrun_in, wait_file, Term};
use vmrun_tests::{host_leftovers, read_tar, t4_images, t4_rootfs, Budget};

fn ready(name: &str) -> bool {
    t4_images(name).is_some() && t4_rootfs(name).is_some()
}

fn start_budget() -> Budget {
    Budget::new("`vmrun start` to return with the agent ready", 60, 300)
}

fn op(what: &str) -> Budget {
    Budget::new(what, 30, 120)
}

/// `vmrun ls` rows: (name, state, pid).
fn ls(rt: &Path) -> Vec<(String, String, u32)> {
    let mut c = vmrun_in(rt);
    c.arg("ls");
    let (code, out, err) = run(c, b"", &op("vmrun ls"));
    assert_eq!(code, 0, "{err}");
    out.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((
                f.first()?.to_string(),
                f.get(1)?.to_string(),
                f.get(2)?.parse().unwrap_or(0),
            ))
        })
        .collect()
}

fn vm_dirs(rt: &Path) -> Vec<String> {
    std::fs::read_dir(rt.join("vms"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn start(rt: &Path, name: &str) -> u32 {
    let mut c = vmrun_in(rt);
    c.args(["start", "--name", name, "--overlay", "tmpfs"]);
    let (code, out, err) = run(c, b"", &start_budget());
    assert_eq!((code, out.trim()), (0, name), "{err}");
    let rows = ls(rt);
    let row = rows.iter().find(|r| r.0 == name).expect("ls lists it");
    assert_eq!(row.1, "running");
    row.2
}

#[test]
fn one_boot_serves_execs_shells_copies_a_capture_ls_and_stop() {
    let test = "one_boot_serves_execs_shells_copies_a_capture_ls_and_stop";
    if !ready(test) || !have_tmux(test) {
        return;
    }
    let rt = tempfile::tempdir().unwrap();
    let rt = rt.path();
    let pid = start(rt, "t4box");

    // Three commands, each in the same VM.
    let exec = |args: &[&str], stdin: &[u8]| {
        let mut c = vmrun_in(rt);
        c.args(["exec", "t4box", "--"]).args(args);
        run(c, stdin, &op("vmrun exec in a running VM"))
    };
    let (code, out, _) = exec(
        &["sh", "-c", "echo $((6*7)) > /work.txt; cat /work.txt"],
        b"",
    );
    assert_eq!((code, out.as_str()), (0, "42\n"));
    let (code, out, _) = exec(&["cat", "/work.txt"], b"");
    assert_eq!(
        (code, out.as_str()),
        (0, "42\n"),
        "the first exec's write is there"
    );
    let (code, out, err) = exec(
        &["sh", "-c", "tr a-z A-Z; echo oops >&2; exit 7"],
        b"upper\n",
    );
    assert_eq!((code, out.as_str(), err.as_str()), (7, "UPPER\n", "oops\n"));
    // VM options make no sense for a running VM.
    let mut c = vmrun_in(rt);
    c.args(["exec", "t4box", "--memory", "64", "--", "true"]);
    let (code, _, err) = run(c, b"", &op("a refused option"));
    assert_eq!(code, 125);
    assert!(err.contains("already running"), "{err}");

    // Two shells at once.
    let dir = tempfile::tempdir().unwrap();
    let bin = vmrun::api::builder::vmm_binary().unwrap();
    let shell = |tag: &str| {
        let status = dir.path().join(format!("{tag}.status"));
        let cmd = format!(
            "{}={} {} bash t4box; echo $? > {}; sleep 60",
            vmrun::runtime::RUNTIME_ENV,
            rt.display(),
            bin.display(),
            status.display()
        );
        (Term::start(&format!("named-{tag}"), &cmd, 100, 30), status)
    };
    let (a, a_status) = shell("a");
    let (b, b_status) = shell("b");
    for t in [&a, &b] {
        t.wait_for("root@vmrun:~#", &op("a shell's prompt in the running VM"));
    }
    a.line("echo shell-a-$((40+2))");
    b.line("echo shell-b-$(cat /work.txt)");
    a.wait_for("shell-a-42", &op("shell a to answer"));
    b.wait_for("shell-b-42", &op("shell b to answer"));
    a.line("exit 4");
    b.line("exit 5");
    assert_eq!(wait_file(&a_status, &op("shell a to exit"), Some(&a)), "4");
    assert_eq!(wait_file(&b_status, &op("shell b to exit"), Some(&b)), "5");

    // A directory in and back out.
    let src = dir.path().join("tree");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("a.txt"), b"alpha\n").unwrap();
    std::fs::write(src.join("sub/b.bin"), vec![7u8; 100_000]).unwrap();
    std::os::unix::fs::symlink("a.txt", src.join("link")).unwrap();
    let cp = |from: &str, to: &str| {
        let mut c = vmrun_in(rt);
        c.args(["cp", from, to]);
        run(c, b"", &op("vmrun cp"))
    };
    let (code, _, err) = cp(src.to_str().unwrap(), "t4box:/data");
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = exec(
        &[
            "sh",
            "-c",
            "cat /data/a.txt; wc -c < /data/sub/b.bin; readlink /data/link",
        ],
        b"",
    );
    assert_eq!((code, out.as_str()), (0, "alpha\n100000\na.txt\n"));
    let back = dir.path().join("back");
    let (code, _, err) = cp("t4box:/data", back.to_str().unwrap());
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read(back.join("a.txt")).unwrap(), b"alpha\n");
    assert_eq!(
        std::fs::read(back.join("sub/b.bin")).unwrap(),
        vec![7u8; 100_000]
    );
    assert_eq!(
        std::fs::read_link(back.join("link")).unwrap(),
        Path::new("a.txt")
    );
    // Into an existing directory, under the source's name.
    let into = dir.path().join("into");
    std::fs::create_dir(&into).unwrap();
    let (code, _, err) = cp("t4box:/data/sub", into.to_str().unwrap());
    assert_eq!(code, 0, "{err}");
    assert!(into.join("sub/b.bin").is_file());

    // A capture of what the guest wrote.
    let tar = dir.path().join("changes.tar");
    let mut c = vmrun_in(rt);
    c.args(["capture", "t4box", tar.to_str().unwrap()]);
    let (code, _, err) = run(c, b"", &op("vmrun capture"));
    assert_eq!(code, 0, "{err}");
    let entries = read_tar(&std::fs::read(&tar).unwrap());
    assert!(entries.contains_key("work.txt") && entries.contains_key("data/sub/b.bin"));
    let partial = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().ends_with(".partial"));
    assert!(!partial, "no unfinished capture file left");

    // All of it in one boot: the same VMM, and the kernel started once.
    let rows = ls(rt);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!((rows[0].1.as_str(), rows[0].2), ("running", pid));
    let console = std::fs::read_to_string(rt.join("vms/t4box/console.log")).unwrap();
    assert_eq!(console.matches("Linux version").count(), 1, "one boot");

    let mut c = vmrun_in(rt);
    c.args(["stop", "t4box"]);
    let (code, out, err) = run(c, b"", &op("vmrun stop"));
    assert_eq!((code, out.trim()), (0, "t4box"), "{err}");
    assert!(ls(rt).is_empty());
    assert!(vm_dirs(rt).is_empty(), "{:?}", vm_dirs(rt));
    assert!(!alive(pid), "the VMM is gone");
}

#[test]
fn a_killed_vmm_is_shown_dead_and_stop_cleans_up() {
    let test = "a_killed_vmm_is_shown_dead_and_stop_cleans_up";
    if !ready(test) {
        return;
    }
    let rt = tempfile::tempdir().unwrap();
    let rt = rt.path();
    let pid = start(rt, "doomed");
    // A name in use is refused, and says how to free it.
    let mut c = vmrun_in(rt);
    c.args(["start", "--name", "doomed"]);
    let (code, _, err) = run(c, b"", &op("a start with a taken name"));
    assert_eq!(code, 125);
    assert!(err.contains("vmrun stop doomed"), "{err}");

    // SAFETY: killing the VMM this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let gone = op("the killed VMM to be seen dead");
    while ls(rt).first().is_some_and(|r| r.1 == "running") {
        gone.check(|| format!("{:?}", ls(rt)));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(ls(rt)[0].1, "dead");
    let mut c = vmrun_in(rt);
    c.args(["exec", "doomed", "--", "true"]);
    let (code, _, err) = run(c, b"", &op("an exec into a dead VM"));
    assert_eq!(code, 125);
    assert!(
        err.contains("not running") && err.contains("vmrun stop doomed"),
        "{err}"
    );
    let mut c = vmrun_in(rt);
    c.args(["exec", "nosuch", "--", "true"]);
    let (code, _, err) = run(c, b"", &op("an exec into no VM"));
    assert_eq!(code, 125);
    assert!(err.contains("no VM named nosuch"), "{err}");

    let mut c = vmrun_in(rt);
    c.args(["stop", "doomed"]);
    let (code, _, err) = run(c, b"", &op("vmrun stop of a dead VM"));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("removed what it left"), "{err}");
    assert!(vm_dirs(rt).is_empty(), "{:?}", vm_dirs(rt));
    assert!(!alive(pid));
}

/// A launcher started with its output piped, and what it printed so far.
fn spawn(c: &mut Command) -> Child {
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_exit(child: &mut Child, what: &str) -> i32 {
    let b = op(what);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            use std::os::unix::process::ExitStatusExt;
            return s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0));
        }
        b.check(String::new);
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The VMM pid of the only VM in `rt`, once its record has one.
fn only_vmm(rt: &Path, budget: &Budget) -> u32 {
    loop {
        let pid = vm_dirs(rt)
            .first()
            .and_then(|n| std::fs::read_to_string(rt.join("vms").join(n).join("vm")).ok())
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("pid=")?.parse::<u32>().ok())
            })
            .filter(|p| *p > 0);
        if let Some(p) = pid {
            return p;
        }
        budget.check(|| format!("VM dirs: {:?}", vm_dirs(rt)));
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn assert_nothing_left(rt: &Path, before: &[String], vmm: u32, out_dir: Option<&Path>) {
    let b = op("the VMM to end");
    while alive(vmm) {
        b.check(|| format!("VMM {vmm} still runs"));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(vm_dirs(rt).is_empty(), "runtime: {:?}", vm_dirs(rt));
    let leftovers: Vec<String> = host_leftovers()
        .into_iter()
        .filter(|l| !before.contains(l) && !l.starts_with("runtime:"))
        .collect();
    assert!(leftovers.is_empty(), "temporary directory: {leftovers:?}");
    if let Some(d) = out_dir {
        let files: Vec<PathBuf> = std::fs::read_dir(d)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_none_or(|x| x != "bin"))
            .collect();
        assert!(files.is_empty(), "output directory: {files:?}");
    }
}

#[test]
fn killed_launchers_leave_nothing_behind() {
    let test = "killed_launchers_leave_nothing_behind";
    if !ready(test) {
        return;
    }
    let before = host_leftovers();

    // SIGTERM while the VM boots.
    let rt = tempfile::tempdir().unwrap();
    let mut child = spawn(vmrun_in(rt.path()).args(["exec", "--", "true"]));
    let vmm = only_vmm(rt.path(), &op("the VM's directory and VMM"));
    // SAFETY: signalling the launcher this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(wait_exit(&mut child, "the launcher to end on SIGTERM"), 143);
    assert_nothing_left(rt.path(), &before, vmm, None);

    // SIGTERM while the command runs.
    let mut child =
        spawn(vmrun_in(rt.path()).args(["exec", "--", "sh", "-c", "echo started; sleep 600"]));
    let vmm = only_vmm(rt.path(), &op("the VM's directory and VMM"));
    let mut out = child.stdout.take().unwrap();
    let mut line = [0u8; 8];
    let started = Budget::new("the command to start in the VM", 60, 300);
    let reader =
        std::thread::spawn(move || std::io::Read::read_exact(&mut out, &mut line).map(|_| line));
    while !reader.is_finished() {
        started.check(String::new);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(&reader.join().unwrap().unwrap(), b"started\n");
    // SAFETY: signalling the launcher this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(wait_exit(&mut child, "the launcher to end on SIGTERM"), 143);
    assert_nothing_left(rt.path(), &before, vmm, None);

    // SIGKILL in the middle of a capture: the capture never carries its final name, and the
    // next vmrun run clears what the launcher could not.
    let out_dir = tempfile::tempdir().unwrap();
    let big = out_dir.path().join("big.bin");
    std::fs::write(&big, vec![0x5au8; 4 << 20]).unwrap();
    let capture = out_dir.path().join("out.tar");
    let mut child = spawn(vmrun_in(rt.path()).args([
        "run",
        "--upload",
        &format!("{}:/work/big.bin", big.display()),
        "--capture",
        capture.to_str().unwrap(),
        "--",
        "true",
    ]));
    let vmm = only_vmm(rt.path(), &op("the VM's directory and VMM"));
    let capturing = Budget::new("the capture to begin", 120, 600);
    loop {
        let partial = std::fs::read_dir(out_dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().ends_with(".partial"));
        if partial {
            break;
        }
        if let Some(s) = child.try_wait().unwrap() {
            panic!("the launcher ended ({s}) before the capture could be caught midway");
        }
        capturing.check(String::new);
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    let _ = child.wait();
    assert!(!capture.exists(), "a cut capture never has the final name");
    // The VMM sees its launcher gone; the next vmrun run clears the directory and the
    // unfinished capture.
    let b = op("the VMM to end after its launcher");
    while alive(vmm) {
        b.check(String::new);
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut c = vmrun_in(rt.path());
    c.arg("ls");
    let (code, _, err) = run(c, b"", &op("vmrun ls"));
    assert_eq!(code, 0, "{err}");
    assert_nothing_left(rt.path(), &before, vmm, Some(out_dir.path()));
}

/// `/proc/PID/status` as field → value.
fn proc_status(pid: u32) -> std::collections::BTreeMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

#[test]
fn the_vmm_runs_jailed_and_leaves_nothing_behind() {
    let test = "the_vmm_runs_jailed_and_leaves_nothing_behind";
    if !ready(test) {
        return;
    }
    let rt = tempfile::tempdir().unwrap();
    let rt = rt.path();
    let supervisor = start(rt, "jailed");
    let kids = children_of(supervisor);
    assert_eq!(
        kids.len(),
        1,
        "the supervisor runs one jailed VMM: {kids:?}"
    );
    let vmm = kids[0];

    // An unprivileged, fresh user; no capability in any set; no way to gain one; filtered.
    let st = proc_status(vmm);
    let fresh = (vmrun::jail::FRESH_ID_BASE + supervisor).to_string();
    let ids = [fresh.as_str(); 4].join("\t");
    assert_eq!(st["Uid"], ids, "{st:?}");
    assert_eq!(st["Gid"], ids, "{st:?}");
    assert_eq!(st["Groups"], "", "{st:?}");
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(st[set], "0000000000000000", "{set}: {st:?}");
    }
    assert_eq!(st["NoNewPrivs"], "1");
    assert_eq!(st["Seccomp"], "2", "the main thread's filter");

    // Namespaces of its own.
    for ns in ["pid", "mnt", "net", "ipc", "uts"] {
        let theirs = std::fs::read_link(format!("/proc/{vmm}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "{ns} namespace");
    }
    // Its root holds /dev/kvm and nothing else of /dev, and none of the host's system.
    let root = PathBuf::from(format!("/proc/{vmm}/root"));
    let dev: Vec<String> = std::fs::read_dir(root.join("dev"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(dev, ["kvm"]);
    for absent in ["etc", "usr", "bin", "home", "sys"] {
        assert!(
            !root.join(absent).exists(),
            "/{absent} is visible in the jail"
        );
    }
    // Its cgroup, where the host has cgroup v2 with memory and cpu controllers.
    let memory_mib: u64 = std::fs::read_to_string(rt.join("vms/jailed/vm"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("memory_mib=")?.parse().ok())
        .unwrap();
    let cgroup = vmrun::jail::cgroup_of("jailed");
    match &cgroup {
        Some(dir) => {
            let own = std::fs::read_to_string(format!("/proc/{vmm}/cgroup")).unwrap();
            assert!(own.contains("/vmrun/jailed"), "{own}");
            let max = std::fs::read_to_string(dir.join("memory.max")).unwrap();
            assert_eq!(
                max.trim(),
                ((memory_mib + vmrun::jail::MEMORY_OVERHEAD_MIB) << 20).to_string()
            );
        }
        None => eprintln!(
            "T4 jail: no cgroup limits on this host ({}); the --cpu-quota refusal is checked instead",
            vmrun::jail::cgroup_report()
        ),
    }

    // The VM works through all of it.
    let mut c = vmrun_in(rt);
    c.args(["exec", "jailed", "--", "sh", "-c", "echo through-the-jail"]);
    let (code, out, err) = run(c, b"", &op("an exec in the jailed VM"));
    assert_eq!((code, out.as_str()), (0, "through-the-jail\n"), "{err}");

    // --cpu-quota: set where it can be, refused with the reason where it cannot. (Ten CPUs'
    // worth: a slow host's boot must not be slowed further.)
    let mut c = vmrun_in(rt);
    c.args([
        "start",
        "--name",
        "quota",
        "--cpu-quota",
        "1000",
        "--overlay",
        "tmpfs",
    ]);
    let (code, out, err) = run(c, b"", &start_budget());
    match vmrun::jail::cgroup_of("quota") {
        Some(dir) => {
            assert_eq!((code, out.trim()), (0, "quota"), "{err}");
            let cpu = std::fs::read_to_string(dir.join("cpu.max")).unwrap();
            assert_eq!(cpu.trim(), "1000000 100000");
            let mut c = vmrun_in(rt);
            c.args(["stop", "quota"]);
            assert_eq!(run(c, b"", &op("vmrun stop")).0, 0);
            assert!(!dir.exists(), "the cgroup went with its VM");
        }
        None => {
            assert_eq!(code, 125, "{out}{err}");
            assert!(
                err.contains("--cpu-quota needs a cgroup v2 cpu controller"),
                "{err}"
            );
            assert!(!vm_dirs(rt).contains(&"quota".to_string()));
        }
    }

    // Stopped: neither process, nor the VM's directory, nor its cgroup is left.
    let mut c = vmrun_in(rt);
    c.args(["stop", "jailed"]);
    let (code, _, err) = run(c, b"", &op("vmrun stop"));
    assert_eq!(code, 0, "{err}");
    let b = op("the jailed VMM and its supervisor to end");
    while alive(supervisor) || alive(vmm) {
        b.check(|| format!("supervisor {supervisor} or VMM {vmm} still runs"));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(vm_dirs(rt).is_empty(), "{:?}", vm_dirs(rt));
    if let Some(dir) = cgroup {
        assert!(!dir.exists(), "{} is left", dir.display());
    }
}
