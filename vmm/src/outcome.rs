//! How a VM ended, in one line a person can act on: the workload's status, the init's error
//! line, a kernel panic, or what KVM could not do (with the instruction in words where it is
//! one the host's emulator refused).

use std::time::Duration;

use vmrun_protocol::status::Status;

use crate::devices::legacy::serial::ConsoleTail;
use crate::vstate::exit::ExitReason;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// `None`: the VM had not ended when its time ran out.
    pub reason: Option<ExitReason>,
    /// One line saying what happened.
    pub summary: String,
    /// The status of the guest's workload when the guest reported one (a reset without a
    /// report, as after `reboot`, counts as 0; a signal N as 128+N); `None` when the VM
    /// itself failed or was stopped.
    pub workload_status: Option<i32>,
}

impl Outcome {
    /// Interprets an exit reason with the console tail (`None` reason: timed out).
    pub fn new(
        reason: Option<ExitReason>,
        tail: &ConsoleTail,
        timeout: Option<Duration>,
    ) -> Outcome {
        let mut workload_status = None;
        let summary = match &reason {
            None => format!(
                "guest did not finish within {}s; console tail:\n{}",
                timeout.map_or(0, |t| t.as_secs()),
                tail.last_lines(10)
            ),
            Some(ExitReason::Status(Status::Exited(c))) => {
                workload_status = Some(i32::from(*c));
                format!("guest finished, status {c}")
            }
            Some(ExitReason::Status(Status::Signaled(s))) => {
                workload_status = Some(128 + i32::from(*s));
                format!("guest workload killed by signal {s}")
            }
            Some(ExitReason::Status(Status::InitFailed(c))) => format!(
                "init failed (class {c}): {}",
                tail.init_error()
                    .unwrap_or_else(|| "no error line on the console".into())
            ),
            Some(ExitReason::BadStatus { kind, code }) => {
                format!("guest wrote an unknown status kind {kind} (code {code})")
            }
            Some(ExitReason::Reset) => match tail.panic_line() {
                Some(p) => format!("guest kernel panicked: {p}"),
                None => {
                    workload_status = Some(0);
                    "guest reset without reporting a status".into()
                }
            },
            Some(ExitReason::TripleFault { cpu }) => {
                format!("guest crashed: vCPU {cpu} triple-faulted")
            }
            Some(ExitReason::InternalError {
                cpu,
                suberror,
                rip,
                data,
            }) => format!(
                "KVM could not run guest code on vCPU {cpu}: internal error {suberror} at rip {rip:#x}, data {data:x?}"
            ),
            Some(ExitReason::FailEntry { cpu, reason }) => {
                format!("KVM refused to enter vCPU {cpu}: reason {reason:#x}")
            }
            Some(ExitReason::SystemEvent { cpu, kind }) => {
                format!("guest vCPU {cpu} raised system event {kind}")
            }
            Some(ExitReason::VcpuError { cpu, message }) => format!("vCPU {cpu}: {message}"),
            Some(ExitReason::Stopped) => "VM stopped by the host".into(),
        };
        Outcome {
            reason,
            summary,
            workload_status,
        }
    }
}
