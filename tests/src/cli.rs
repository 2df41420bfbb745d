//! Driving the `vmrun` binary as a person would: commands run to their end within a budget,
//! terminals through tmux, and what processes are left.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::Budget;

/// The `vmrun` binary of this build, without the overlay toggle of the caller's environment.
pub fn vmrun() -> Command {
    let bin = vmrun::api::builder::vmm_binary()
        .expect("the vmrun binary is built (cargo test --workspace)");
    let mut c = Command::new(bin);
    c.env_remove("GONDOLIN_ROOT_OVERLAY");
    c
}

/// `vmrun` with its runtime directory (where VMs live) at `rt`, so a test sees only its own.
pub fn vmrun_in(rt: &Path) -> Command {
    let mut c = vmrun();
    c.env(vmrun::runtime::RUNTIME_ENV, rt);
    c
}

/// Runs `c` to its end within `budget` (killed and failed past it): (code, stdout, stderr).
pub fn run(mut c: Command, stdin: &[u8], budget: &Budget) -> (i32, String, String) {
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

/// Whether tmux is here (the terminal tests drive `vmrun bash` through it); a skip, or a
/// failure with VMRUN_REQUIRE_T4, when not.
pub fn have_tmux(test: &str) -> bool {
    if Command::new("tmux").arg("-V").output().is_ok() {
        return true;
    }
    assert!(
        std::env::var_os("VMRUN_REQUIRE_T4").is_none(),
        "{test}: tmux is required"
    );
    eprintln!("SKIPPED {test}: no tmux");
    false
}

pub fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux").args(args).output().expect("tmux");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A terminal running one shell command line in a tmux session; killed when dropped.
pub struct Term(pub String);

impl Term {
    /// `cmd` in a new `w`×`h` terminal.
    pub fn start(name: &str, cmd: &str, w: u16, h: u16) -> Term {
        let session = format!("{name}-{}", std::process::id());
        let (w, h) = (w.to_string(), h.to_string());
        tmux(&["new-session", "-d", "-s", &session, "-x", &w, "-y", &h, cmd]);
        Term(session)
    }

    pub fn screen(&self) -> String {
        tmux(&["capture-pane", "-p", "-t", &self.0])
    }

    /// Types `line` and Enter.
    pub fn line(&self, line: &str) {
        tmux(&["send-keys", "-t", &self.0, line, "Enter"]);
    }

    pub fn keys(&self, keys: &str) {
        tmux(&["send-keys", "-t", &self.0, keys]);
    }

    /// Waits for `want` on the screen.
    pub fn wait_for(&self, want: &str, budget: &Budget) -> String {
        loop {
            let screen = self.screen();
            if screen.contains(want) {
                return screen;
            }
            budget.check(|| format!("waiting for {want:?}; screen:\n{screen}"));
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Term {
    fn drop(&mut self) {
        tmux(&["kill-session", "-t", &self.0]);
    }
}

/// Waits until `path` exists and returns its trimmed contents.
pub fn wait_file(path: &Path, budget: &Budget, term: Option<&Term>) -> String {
    while !path.exists() {
        budget.check(|| term.map(Term::screen).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(300));
    }
    std::thread::sleep(Duration::from_millis(200));
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Pids of processes whose command line is exactly `argv`.
pub fn pids_running(argv: &[&str]) -> Vec<u32> {
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

pub fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Whether a process is alive (not gone, not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let state = s.rsplit_once(") ")?.1.chars().next()?;
            Some(state != 'Z' && state != 'X')
        })
        .unwrap_or(false)
}
