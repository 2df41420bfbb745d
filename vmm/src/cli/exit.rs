//! The exit-code policy of every command, docker's: the workload's own status, 128+N for a
//! signal N, 126 for a command that cannot execute, 127 for one not found, and 125 when the VM
//! or the launcher failed (with the reason on stderr).

use std::process::ExitCode;

use vmrun::api::agent::AgentError;
use vmrun::api::vm::VmError;
use vmrun::outcome::Outcome;
use vmrun_protocol::agent::{ErrorKind, ExitStatus};

/// Exit code for failures of the VM or the launcher itself (docker's convention).
pub const EXIT_LAUNCHER: i32 = 125;

pub fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

pub fn launcher_error(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("vmrun: {e}");
    exit_code(EXIT_LAUNCHER)
}

/// How a VM's end becomes vmrun's exit code.
pub fn outcome_code(o: &Outcome) -> i32 {
    o.workload_status.unwrap_or(EXIT_LAUNCHER)
}

/// docker's conventions for a command that could not run.
pub fn spawn_failure(e: &VmError) -> Option<i32> {
    match e {
        VmError::Agent(AgentError::Remote(r)) if r.kind == ErrorKind::Spawn => {
            Some(if r.errno == libc::ENOENT { 127 } else { 126 })
        }
        _ => None,
    }
}

/// A command's exit status as a process status.
pub fn status_code(s: ExitStatus) -> i32 {
    match s {
        ExitStatus::Exited(c) => c,
        ExitStatus::Signaled(sig) => 128 + sig,
        // SIGKILL after the timeout, as `timeout --signal=KILL` reports it.
        ExitStatus::TimedOut => 137,
    }
}
