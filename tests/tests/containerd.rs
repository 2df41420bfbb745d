//! T4, issue 22: vmrun as containerd's runtime. A private containerd (Debian's package,
//! scripts/containerd.sh) imports a BusyBox OCI image built here; `ctr run --runtime
//! io.containerd.vmrun.v1` runs a command that proves it is in a VM (the guest kernel's
//! release is not the host's) with its output and exit code; a second, long-running container
//! gets `ctr task exec` processes in the same VM (one, as root, writes a file, the next reads it) and a
//! look at its limits (`--memory-limit`, `--cpus`: the VM's memory and vCPUs), and a
//! SIGTERM through `ctr task kill`, which its trap turns into exit code 7; once the tasks are
//! deleted no VMM or shim process, mount or VM directory is left. A host bind mount, which no
//! VM can see, is refused with the reason. `ctr run -t` gets a terminal of the right size in
//! the guest, resized with the window, and the shell's exit code.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use vmrun_tests::cli::{have_tmux, run, tmux, wait_file, Term};
use vmrun_tests::host::has_tool;
use vmrun_tests::oci::busybox_image;
use vmrun_tests::{t4_images, Budget};

const RUNTIME: &str = "io.containerd.vmrun.v1";
const IMAGE: &str = "example.test/tests/busybox:1";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The private containerd, stopped (and everything under its directory removed) on drop.
struct Containerd {
    dir: PathBuf,
}

impl Containerd {
    fn start(dir: &Path, shim_dir: &Path, rt: &Path) -> Containerd {
        let out = Command::new("bash")
            .arg(repo().join("scripts/containerd.sh"))
            .arg("start")
            .arg(dir)
            .arg(shim_dir)
            .env(vmrun::runtime::RUNTIME_ENV, rt)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "containerd.sh start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Containerd {
            dir: dir.to_path_buf(),
        }
    }

    fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(self.dir.join("containerd.sock"))
            .args(["--namespace", "vmrun-test"]);
        c
    }

    fn ok(&self, args: &[&str], budget: &Budget) -> String {
        let mut c = self.ctr();
        c.args(args);
        let (code, out, err) = run(c, b"", budget);
        assert_eq!(code, 0, "ctr {args:?}: {out}{err}\n{}", self.log());
        out
    }

    fn log(&self) -> String {
        let l = std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = l.lines().collect();
        format!(
            "--- containerd log (tail) ---\n{}",
            lines[lines.len().saturating_sub(30)..].join("\n")
        )
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo().join("scripts/containerd.sh"))
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

/// Processes whose command line mentions `what`.
fn processes_with(what: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let pid = e.ok()?.file_name().to_str()?.parse::<u32>().ok()?;
            let c = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            c.contains(what).then(|| format!("{pid}: {c}"))
        })
        .collect()
}

/// A private containerd with the BusyBox image imported, its directory and the KVM label; `None`
/// (a skip, or a failure where T4 is required) when something is missing.
fn setup(test: &str) -> Option<(tempfile::TempDir, Containerd, &'static str)> {
    let (_, _, pvm) = t4_images(test)?;
    let required = std::env::var_os("VMRUN_REQUIRE_T4").is_some();
    let shim_dir = repo().join("target/debug");
    let skip = |why: &str| {
        assert!(!required, "{test}: T4 required but {why}");
        eprintln!("SKIPPED {test}: {why}");
        None
    };
    if !shim_dir.join("containerd-shim-vmrun-v1").is_file() {
        return skip("the shim is not built (cargo build -p containerd-shim-vmrun)");
    }
    if !has_tool("containerd") || !has_tool("ctr") {
        return skip("containerd is not installed (apt-get install containerd)");
    }
    let d = tempfile::tempdir().unwrap();
    let Some(archive) = busybox_image(d.path()) else {
        return skip("no static /bin/busybox (apt-get install busybox-static)");
    };
    let rt = d.path().join("vmrun-rt");
    let ctrd = Containerd::start(&d.path().join("containerd"), &shim_dir, &rt);
    ctrd.ok(
        &["image", "import", archive.to_str().unwrap()],
        &Budget::new("ctr image import", 30, 120),
    );
    Some((d, ctrd, vmrun::host::compat::kvm_label(pvm)))
}

#[test]
fn ctr_runs_containers_in_vms_with_exec_kill_and_a_clean_delete() {
    let test = "ctr_runs_containers_in_vms_with_exec_kill_and_a_clean_delete";
    let Some((d, ctrd, label)) = setup(test) else {
        return;
    };
    let rt = d.path().join("vmrun-rt");
    let op = || Budget::new("a ctr command", 30, 120);
    let boot = || Budget::new("a container VM's command", 90, 400);

    // What a VM cannot honour is refused before anything boots, with the reason.
    let mut c = ctrd.ctr();
    c.args(["run", "--rm", "--runtime", RUNTIME])
        .args([
            "--mount",
            "type=bind,src=/etc,dst=/hostetc,options=rbind:ro",
        ])
        .args([IMAGE, "bind", "true"]);
    let (code, out, err) = run(c, b"", &op());
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("host bind mounts cannot reach a VM"), "{err}");

    // One command in a VM: its kernel is not the host's; output and exit code come back.
    let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let t = Instant::now();
    let mut c = ctrd.ctr();
    c.args(["run", "--rm", "--runtime", RUNTIME, IMAGE, "one"])
        .args([
            "sh",
            "-c",
            "uname -r; echo in-vm as $(id -u) in $(pwd) $GREETING; exit 3",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().map(|l| l.unwrap()).unwrap_or_default();
    let to_first = t.elapsed();
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let st = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    eprintln!(
        "[{label}] ctr run → first output line in {:.1}s",
        to_first.as_secs_f64()
    );
    assert!(boot().limit() > to_first, "ctr run took {to_first:?}");
    assert!(
        !first.is_empty() && first.trim() != host_release.trim(),
        "guest kernel {first:?} (host {host_release:?}); stderr: {err}\n{}",
        ctrd.log()
    );
    // The image config's user, working directory and env, as ctr put them in the spec.
    assert_eq!(rest, vec!["in-vm as 1000 in /app oci"], "stderr: {err}");
    assert_eq!(
        st.code(),
        Some(3),
        "ctr run exits with the task's code: {err}"
    );

    // A long-running container: exec processes in its VM, then a signal.
    let mut c = ctrd.ctr();
    c.args(["run", "--rm", "--runtime", RUNTIME])
        .args(["--memory-limit", "209715200", "--cpus", "2"])
        .args([IMAGE, "two"])
        .args([
            "sh",
            "-c",
            "trap 'echo got-term; exit 7' TERM; echo ready; while true; do sleep 1; done",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut long = c.spawn().unwrap();
    let mut out = BufReader::new(long.stdout.take().unwrap()).lines();
    let first = out.next().map(|l| l.unwrap());
    if first.as_deref() != Some("ready") {
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(&mut long.stderr.take().unwrap(), &mut err);
        panic!("ctr run two: {first:?}, stderr: {err}\n{}", ctrd.log());
    }
    ctrd.ok(
        &[
            "task",
            "exec",
            "--exec-id",
            "e1",
            "--user",
            "0",
            "two",
            "sh",
            "-c",
            "echo marker > /srv/m",
        ],
        &boot(),
    );
    let got = ctrd.ok(
        &["task", "exec", "--exec-id", "e2", "two", "cat", "/srv/m"],
        &boot(),
    );
    assert_eq!(
        got, "marker\n",
        "the second exec sees the first's file: one VM"
    );
    // The spec's limits became the VM's memory and vCPUs.
    let got = ctrd.ok(
        &[
            "task",
            "exec",
            "--exec-id",
            "e3",
            "two",
            "sh",
            "-c",
            "nproc; grep MemTotal /proc/meminfo",
        ],
        &boot(),
    );
    let mut l = got.lines();
    assert_eq!(l.next(), Some("2"), "{got}");
    let kib: u64 = l
        .next()
        .and_then(|m| m.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or_else(|| panic!("{got}"));
    assert!(
        (150_000..=204_800).contains(&kib),
        "MemTotal {kib} kB for a 200 MiB limit"
    );
    let tasks = ctrd.ok(&["task", "ls"], &op());
    assert!(
        tasks
            .lines()
            .any(|l| l.starts_with("two") && l.contains("RUNNING")),
        "{tasks}"
    );
    ctrd.ok(&["task", "kill", "--signal", "SIGTERM", "two"], &op());
    assert_eq!(out.next().map(|l| l.unwrap()).as_deref(), Some("got-term"));
    let st = long.wait().unwrap();
    assert_eq!(st.code(), Some(7), "the trap's exit code comes back");

    // Deleted (--rm): no VMM, no shim, no mount, no VM directory.
    let budget = op();
    loop {
        let left: Vec<String> = processes_with(rt.to_str().unwrap())
            .into_iter()
            .chain(processes_with(&format!(
                "-address {}",
                ctrd.dir.join("containerd.sock").display()
            )))
            .collect();
        let mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(d.path().to_str().unwrap()))
            .map(String::from)
            .collect();
        let vms: Vec<_> = std::fs::read_dir(rt.join("vms"))
            .map(|r| r.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        if left.is_empty() && mounts.is_empty() && vms.is_empty() {
            break;
        }
        budget.check(|| format!("left behind: {left:?} {mounts:?} {vms:?}"));
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(ctrd.ok(&["task", "ls"], &op()).lines().count() <= 1);
}

#[test]
fn ctr_run_with_a_terminal_sizes_and_resizes_it() {
    let test = "ctr_run_with_a_terminal_sizes_and_resizes_it";
    if !have_tmux(test) {
        return;
    }
    let Some((d, ctrd, _)) = setup(test) else {
        return;
    };
    let status = d.path().join("status");
    let cmd = format!(
        "ctr --address {} --namespace vmrun-test run -t --rm --runtime {RUNTIME} {IMAGE} tty sh; echo ctr-exit-$? > {}",
        ctrd.dir.join("containerd.sock").display(),
        status.display()
    );
    let t = Term::start("ctr-tty", &cmd, 100, 30);
    // Typed before the VM is up, it waits in containerd's stdin FIFO.
    t.line("echo ready-$((6*7))");
    t.wait_for("ready-42", &Budget::new("the container's shell", 90, 400));
    t.line("stty size");
    t.wait_for(
        "30 100",
        &Budget::new("stty size in the container", 30, 120),
    );
    tmux(&["resize-window", "-t", &t.0, "-x", "120", "-y", "40"]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    t.line("stty size");
    t.wait_for("40 120", &Budget::new("the resized terminal", 30, 120));
    t.line("exit 5");
    let got = wait_file(&status, &Budget::new("ctr to end", 30, 120), Some(&t));
    assert_eq!(got, "ctr-exit-5", "{}", t.screen());
}
