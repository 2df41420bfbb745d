//! The `vmrun` CLI as a person uses it (T4: real VMs): `vmrun exec` exit codes and stream
//! separation, the overlay toggle and flag precedence, and `vmrun bash` driven through a real
//! terminal (tmux): prompt, a command, resize reaching the guest, Ctrl-C, `exit 3` → 3.

use std::time::Duration;

use vmrun_tests::cli::{children_of, have_tmux, pids_running, run, vmrun, wait_file, Term};
use vmrun_tests::{t4_images, t4_rootfs, Budget};

fn ready(name: &str) -> bool {
    t4_images(name).is_some() && t4_rootfs(name).is_some()
}

#[test]
fn exec_exit_codes_and_separate_streams() {
    if !ready("exec_exit_codes_and_separate_streams") {
        return;
    }
    std::thread::scope(|s| {
        let a = s.spawn(|| {
            let mut c = vmrun();
            c.args([
                "exec",
                "--",
                "/bin/sh",
                "-c",
                "echo out; echo err >&2; cat; exit 7",
            ]);
            run(
                c,
                b"from stdin\n",
                &Budget::new("vmrun exec of a shell script", 60, 300),
            )
        });
        let b = s.spawn(|| {
            let mut c = vmrun();
            c.args(["exec", "--", "/no/such/program"]);
            run(
                c,
                b"",
                &Budget::new("vmrun exec of a missing program", 60, 300),
            )
        });
        let (code, out, err) = a.join().unwrap();
        assert_eq!(
            (code, out.as_str()),
            (7, "out\nfrom stdin\n"),
            "stderr: {err}"
        );
        assert!(err.ends_with("err\n"), "{err}");
        let (code, _, err) = b.join().unwrap();
        assert_eq!(code, 127, "{err}");
        assert!(err.contains("No such file"), "{err}");
    });
    // A launcher error (bad option value) is 125 and says why, without booting.
    let mut c = vmrun();
    c.args(["exec", "--overlay-size", "12q", "--", "true"]);
    let (code, _, err) = run(c, b"", &Budget::new("a refused option", 10, 10));
    assert_eq!(code, 125);
    assert!(err.contains("--overlay-size 12q"), "{err}");
}

/// The overlay choice as the CLI resolves it (`--dry-run` prints the kernel command line; the
/// T4 overlay tests prove that command line gives the guest that root).
#[test]
fn overlay_toggle_and_flag_precedence() {
    let cmdline = |env: Option<&str>, flags: &[&str]| -> (i32, String) {
        let mut c = vmrun();
        if let Some(v) = env {
            c.env("GONDOLIN_ROOT_OVERLAY", v);
        }
        c.args(["exec", "--dry-run", "--rootfs", "/dev/null"])
            .args(flags)
            .args(["--", "true"]);
        let (code, out, err) = run(c, b"", &Budget::new("vmrun exec --dry-run", 10, 10));
        let line = out
            .lines()
            .find_map(|l| l.strip_prefix("cmdline: "))
            .unwrap_or("")
            .to_string();
        (code, if code == 0 { line } else { err })
    };
    let (_, c) = cmdline(Some("TRUE"), &[]);
    assert!(c.contains("root.overlay=tmpfs"), "{c}");
    let (_, c) = cmdline(Some("tmpfs"), &[]);
    assert!(c.contains("root.overlay=tmpfs"), "{c}");
    let (_, c) = cmdline(None, &[]);
    assert!(!c.contains("root.overlay"), "{c}");
    let (_, c) = cmdline(Some("0"), &["--overlay", "tmpfs", "--overlay-size", "64M"]);
    assert!(
        c.contains("root.overlay=tmpfs root.overlaysize=64M"),
        "the flag beats the toggle: {c}"
    );
    let (_, c) = cmdline(Some("1"), &["--cmdline", "root.overlay=/dev/vdc"]);
    assert_eq!(
        c.matches("root.overlay=").count(),
        1,
        "the user's root.overlay= wins: {c}"
    );
    let (code, err) = cmdline(Some("maybe"), &[]);
    assert_eq!(code, 125);
    assert!(err.contains("GONDOLIN_ROOT_OVERLAY=maybe"), "{err}");
}

/// Runs `cmd` in a new 100×30 terminal and waits for the guest's prompt.
fn start_shell(name: &str, cmd: &str) -> Term {
    let t = Term::start(name, cmd, 100, 30);
    t.wait_for(
        "root@vmrun:~#",
        &Budget::new("the guest shell's prompt", 60, 240),
    );
    t
}

/// The T4 images and tmux (which the terminal tests drive `vmrun bash` through).
fn ready_with_tmux(name: &str) -> bool {
    ready(name) && have_tmux(name)
}

/// A command typed into the guest shell and its answer on the screen.
fn answer(what: &str) -> Budget {
    Budget::new(what, 30, 120)
}

#[test]
fn bash_in_a_real_terminal() {
    if !ready_with_tmux("bash_in_a_real_terminal") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let status = dir.path().join("status");
    let bin = vmrun::api::builder::vmm_binary().unwrap();
    let cmd = format!(
        "GONDOLIN_ROOT_OVERLAY=1 {} bash; echo $? > {}; sleep 60",
        bin.display(),
        status.display()
    );
    let t = start_shell("vmrun-test", &cmd);
    t.line("stty size");
    t.wait_for("30 100", &answer("`stty size` to print 30 100"));
    vmrun_tests::cli::tmux(&["resize-window", "-t", &t.0, "-x", "120", "-y", "40"]);
    std::thread::sleep(Duration::from_secs(1));
    t.line("stty size");
    t.wait_for(
        "40 120",
        &answer("`stty size` after the resize to print 40 120"),
    );
    t.line("sleep 300");
    std::thread::sleep(Duration::from_secs(3));
    t.keys("C-c");
    t.line("echo after-interrupt");
    t.wait_for(
        "\nafter-interrupt",
        &answer("the shell to answer after Ctrl-C"),
    );
    t.line("exit 3");
    let exited = Budget::new("vmrun bash to exit after `exit 3`", 30, 60);
    let code = wait_file(&status, &exited, Some(&t));
    assert_eq!(code, "3");
}

#[test]
fn bash_killed_from_outside_restores_the_terminal() {
    if !ready_with_tmux("bash_killed_from_outside_restores_the_terminal") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (status, stty) = (dir.path().join("status"), dir.path().join("stty"));
    let bin = vmrun::api::builder::vmm_binary().unwrap();
    let bin = bin.to_str().unwrap();
    let cmd = format!(
        "GONDOLIN_ROOT_OVERLAY=1 {bin} bash; echo $? > {}; stty -a > {}; sleep 60",
        status.display(),
        stty.display()
    );
    let t = start_shell("vmrun-kill", &cmd);
    let pids = pids_running(&[bin, "bash"]);
    assert_eq!(pids.len(), 1, "one `vmrun bash`: {pids:?}");
    let vmm = children_of(pids[0]);
    assert_eq!(vmm.len(), 1, "one VMM under vmrun bash: {vmm:?}");
    // SAFETY: signalling a process this test started.
    unsafe { libc::kill(pids[0] as i32, libc::SIGTERM) };
    let ended = Budget::new("vmrun bash to end after SIGTERM", 30, 120);
    wait_file(&stty, &ended, Some(&t));
    let code = std::fs::read_to_string(&status).unwrap();
    let modes = std::fs::read_to_string(&stty).unwrap();
    drop(t);
    assert_eq!(code.trim(), "143", "128 + SIGTERM");
    for m in ["icanon", "echo", "isig"] {
        assert!(
            modes.split_whitespace().any(|w| w == m),
            "terminal left without {m}: {modes}"
        );
    }
    assert!(
        !std::path::Path::new(&format!("/proc/{}", vmm[0])).exists(),
        "the VMM outlived vmrun bash"
    );
}

/// `vmrun snapshot create|ls|rm`, `start --from --count`, `exec --from`, a snapshot of a
/// running VM (`create --from VM`), and the errors a person meets.
#[test]
fn snapshot_commands() {
    if !ready("snapshot_commands") {
        return;
    }
    let store = tempfile::tempdir().unwrap();
    let cmd_within = |args: &[&str], what: &str, hw_secs: u64| {
        let mut c = vmrun();
        c.env("VMRUN_SNAPSHOT_DIR", store.path()).args(args);
        run(c, b"", &Budget::new(what.to_string(), hw_secs, 300))
    };
    let cmd = |args: &[&str], what: &str| cmd_within(args, what, 60);
    let (code, out, err) = cmd(
        &[
            "snapshot",
            "create",
            "base",
            "--overlay",
            "tmpfs",
            "--memory",
            "256",
        ],
        "vmrun snapshot create",
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("base: "), "{out}");
    let (code, out, err) = cmd(
        &["start", "--from", "base", "--count", "2", "--name", "fork"],
        "vmrun start --from --count 2",
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "fork-1\nfork-2\n");
    let (code, out, _) = cmd(&["exec", "fork-2", "--", "nproc"], "exec in a fork");
    assert_eq!((code, out.as_str()), (0, "1\n"));
    // A snapshot of a running VM, which runs on.
    let (code, _, err) = cmd(
        &["exec", "fork-1", "--", "sh", "-c", "echo one > /mark"],
        "exec in a fork",
    );
    assert_eq!(code, 0, "{err}");
    // A snapshot reads all of guest memory; where the host's own CPU is emulated (the
    // hardware tier runs in QEMU TCG) that alone takes most of a minute.
    let (code, _, err) = cmd_within(
        &["snapshot", "create", "marked", "--from", "fork-1"],
        "vmrun snapshot create --from VM",
        120,
    );
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = cmd(&["exec", "fork-1", "--", "cat", "/mark"], "the VM runs on");
    assert_eq!((code, out.as_str()), (0, "one\n"));
    let (code, out, err) = cmd(
        &["exec", "--from", "marked", "--", "cat", "/mark"],
        "exec --from a snapshot",
    );
    assert_eq!((code, out.as_str()), (0, "one\n"), "{err}");
    let (code, out, _) = cmd(&["snapshot", "ls"], "vmrun snapshot ls");
    assert_eq!(code, 0);
    assert!(out.contains("base ") && out.contains("marked "), "{out}");

    // Errors: an unknown snapshot, a name taken, options with --from VM.
    let (code, _, err) = cmd(&["start", "--from", "nosuch"], "an unknown snapshot");
    assert_eq!(code, 125);
    assert!(err.contains("no snapshot nosuch"), "{err}");
    let (code, _, err) = cmd(&["snapshot", "create", "base"], "a taken name");
    assert_eq!(code, 125);
    assert!(err.contains("snapshot rm base"), "{err}");
    let (code, _, err) = cmd(
        &["snapshot", "create", "x", "--from", "fork-1", "--cpus", "2"],
        "options with --from VM",
    );
    assert_eq!(code, 125);
    assert!(err.contains("VM options apply only"), "{err}");

    let (code, _, _) = cmd(&["stop", "fork-1", "fork-2"], "vmrun stop");
    assert_eq!(code, 0);
    let (code, _, _) = cmd(&["snapshot", "rm", "base", "marked"], "vmrun snapshot rm");
    assert_eq!(code, 0);
    assert_eq!(std::fs::read_dir(store.path()).unwrap().count(), 0);
}
