//! The `vmrun` CLI as a person uses it (T4: real VMs): `vmrun exec` exit codes and stream
//! separation, the overlay toggle and flag precedence, and `vmrun bash` driven through a real
//! terminal (tmux): prompt, a command, resize reaching the guest, Ctrl-C, `exit 3` → 3.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use vmrun_tests::{t4_images, t4_rootfs, Budget};

fn vmrun() -> Command {
    let bin = vmrun::api::builder::vmm_binary()
        .expect("the vmrun binary is built (cargo test --workspace)");
    let mut c = Command::new(bin);
    c.env_remove("GONDOLIN_ROOT_OVERLAY");
    c
}

/// Runs `c` to its end within `budget` (killed and failed past it).
fn run(mut c: Command, stdin: &[u8], budget: &Budget) -> (i32, String, String) {
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let pid = child.id();
    let out = std::thread::scope(|s| {
        let waiter = s.spawn(|| child.wait_with_output().unwrap());
        while !waiter.is_finished() {
            if budget.expired() {
                // SAFETY: signalling the child this function started and has not reaped.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                let out = waiter.join().unwrap();
                budget.overrun(&format!(
                    "stdout: {}\nstderr: {}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        waiter.join().unwrap()
    });
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

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

/// Runs `cmd` in a new 100×30 tmux session and waits for the guest's prompt.
fn start_shell(session: &str, cmd: &str) {
    tmux(&[
        "new-session",
        "-d",
        "-s",
        session,
        "-x",
        "100",
        "-y",
        "30",
        cmd,
    ]);
    wait_screen(
        session,
        "root@vmrun:~#",
        &Budget::new("the guest shell's prompt", 60, 240),
    );
}

/// The T4 images and tmux (which the terminal tests drive `vmrun bash` through).
fn ready_with_tmux(name: &str) -> bool {
    if !ready(name) {
        return false;
    }
    if Command::new("tmux").arg("-V").output().is_err() {
        assert!(
            std::env::var_os("VMRUN_REQUIRE_T4").is_none(),
            "tmux is required"
        );
        eprintln!("SKIPPED {name}: no tmux");
        return false;
    }
    true
}

fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux").args(args).output().expect("tmux");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_screen(session: &str, want: &str, budget: &Budget) -> String {
    loop {
        let screen = tmux(&["capture-pane", "-p", "-t", session]);
        if screen.contains(want) {
            return screen;
        }
        budget.check(|| format!("waiting for {want:?}; screen:\n{screen}"));
        std::thread::sleep(Duration::from_millis(500));
    }
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
    let session = format!("vmrun-test-{}", std::process::id());
    let bin = vmrun::api::builder::vmm_binary().unwrap();
    let cmd = format!(
        "GONDOLIN_ROOT_OVERLAY=1 {} bash; echo $? > {}; sleep 60",
        bin.display(),
        status.display()
    );
    start_shell(&session, &cmd);
    tmux(&["send-keys", "-t", &session, "stty size", "Enter"]);
    wait_screen(&session, "30 100", &answer("`stty size` to print 30 100"));
    tmux(&["resize-window", "-t", &session, "-x", "120", "-y", "40"]);
    std::thread::sleep(Duration::from_secs(1));
    tmux(&["send-keys", "-t", &session, "stty size", "Enter"]);
    wait_screen(
        &session,
        "40 120",
        &answer("`stty size` after the resize to print 40 120"),
    );
    tmux(&["send-keys", "-t", &session, "sleep 300", "Enter"]);
    std::thread::sleep(Duration::from_secs(3));
    tmux(&["send-keys", "-t", &session, "C-c"]);
    tmux(&["send-keys", "-t", &session, "echo after-interrupt", "Enter"]);
    wait_screen(
        &session,
        "\nafter-interrupt",
        &answer("the shell to answer after Ctrl-C"),
    );
    tmux(&["send-keys", "-t", &session, "exit 3", "Enter"]);
    let exited = Budget::new("vmrun bash to exit after `exit 3`", 30, 60);
    while !status.exists() {
        exited.check(|| tmux(&["capture-pane", "-p", "-t", &session]));
        std::thread::sleep(Duration::from_millis(300));
    }
    std::thread::sleep(Duration::from_millis(200));
    let code = std::fs::read_to_string(&status).unwrap();
    tmux(&["kill-session", "-t", &session]);
    assert_eq!(code.trim(), "3");
}

/// Pids of processes whose command line is exactly `argv`.
fn pids_running(argv: &[&str]) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let args: Vec<&[u8]> = c.split(|b| *b == 0).filter(|a| !a.is_empty()).collect();
                args.len() == argv.len() && args.iter().zip(argv).all(|(a, b)| *a == b.as_bytes())
            })
        })
        .collect()
}

fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[test]
fn bash_killed_from_outside_restores_the_terminal() {
    if !ready_with_tmux("bash_killed_from_outside_restores_the_terminal") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (status, stty) = (dir.path().join("status"), dir.path().join("stty"));
    let session = format!("vmrun-kill-{}", std::process::id());
    let bin = vmrun::api::builder::vmm_binary().unwrap();
    let bin = bin.to_str().unwrap();
    let cmd = format!(
        "GONDOLIN_ROOT_OVERLAY=1 {bin} bash; echo $? > {}; stty -a > {}; sleep 60",
        status.display(),
        stty.display()
    );
    start_shell(&session, &cmd);
    let pids = pids_running(&[bin, "bash"]);
    assert_eq!(pids.len(), 1, "one `vmrun bash`: {pids:?}");
    let vmm = children_of(pids[0]);
    assert_eq!(vmm.len(), 1, "one VMM under vmrun bash: {vmm:?}");
    // SAFETY: signalling a process this test started.
    unsafe { libc::kill(pids[0] as i32, libc::SIGTERM) };
    let ended = Budget::new("vmrun bash to end after SIGTERM", 30, 120);
    while !stty.exists() {
        ended.check(|| tmux(&["capture-pane", "-p", "-t", &session]));
        std::thread::sleep(Duration::from_millis(300));
    }
    std::thread::sleep(Duration::from_millis(300));
    let code = std::fs::read_to_string(&status).unwrap();
    let modes = std::fs::read_to_string(&stty).unwrap();
    tmux(&["kill-session", "-t", &session]);
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
