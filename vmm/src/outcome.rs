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
            Some(ExitReason::TripleFault {
                cpu,
                ran_ms,
                exits,
                last,
            }) => format!(
                "guest crashed: vCPU {cpu} triple-faulted {ran_ms} ms after the VM first ran, after {exits} exits to the VMM (the last: {last})"
            ),
            Some(ExitReason::InternalError {
                cpu,
                suberror,
                rip,
                data,
            }) => internal_error(*cpu, *suberror, *rip, data),
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

/// KVM_INTERNAL_ERROR_EMULATION: the instruction emulator met an instruction it lacks.
const EMULATION: u32 = 1;
/// `flags` bit: the instruction's length and bytes follow.
const FLAG_INSTRUCTION_BYTES: u64 = 1;

/// The bytes of the instruction KVM could not emulate, when it reported them
/// (`kvm_run.emulation_failure`: flags, then a length byte and up to 15 bytes).
pub fn failed_instruction(suberror: u32, data: &[u64]) -> Option<Vec<u8>> {
    if suberror != EMULATION || data.first()? & FLAG_INSTRUCTION_BYTES == 0 {
        return None;
    }
    let raw: Vec<u8> = data[1..]
        .iter()
        .take(2)
        .flat_map(|w| w.to_le_bytes())
        .collect();
    let len = usize::from(*raw.first()?)
        .min(15)
        .min(raw.len().saturating_sub(1));
    Some(raw[1..1 + len].to_vec())
}

/// A name for the instruction `bytes` start with, for the ones guests are known to meet.
pub fn instruction_name(bytes: &[u8]) -> Option<&'static str> {
    let mut i = 0;
    let mut rex_w = false;
    let mut rep = false;
    while let Some(&b) = bytes.get(i) {
        match b {
            0xf0 | 0xf2 | 0x66 | 0x2e | 0x3e | 0x26 | 0x64 | 0x65 | 0x36 => {}
            0xf3 => rep = true,
            0x40..=0x4f => rex_w = b & 0x08 != 0,
            _ => break,
        }
        i += 1;
    }
    let op = &bytes[i.min(bytes.len())..];
    let reg = |m: Option<&u8>| m.map(|m| (m >> 3) & 7);
    Some(match op {
        [0x0f, 0xc7, m, ..] if reg(Some(m)) == Some(1) => {
            if rex_w {
                "cmpxchg16b"
            } else {
                "cmpxchg8b"
            }
        }
        [0x0f, 0xc7, m, ..] if reg(Some(m)) == Some(6) => "rdrand",
        [0x0f, 0xc7, m, ..] if reg(Some(m)) == Some(7) => "rdseed",
        [0x0f, 0xae, m, ..] if *m < 0xc0 && reg(Some(m)) == Some(4) => "xsave",
        [0x0f, 0xae, m, ..] if *m < 0xc0 && reg(Some(m)) == Some(5) => "xrstor",
        [0x0f, 0x01, 0xc1, ..] => "vmcall",
        [0x0f, 0x01, 0xd9, ..] => "vmmcall",
        [0x0f, 0xb8, ..] if rep => "popcnt",
        [0x0f, 0xbc, ..] if rep => "tzcnt",
        [0x0f, 0xbd, ..] if rep => "lzcnt",
        [0x0f, 0x0b, ..] => "ud2",
        [0x9b, ..] => "fwait",
        [0xcc, ..] => "int3",
        [0xf4, ..] => "hlt",
        _ => return None,
    })
}

fn internal_error(cpu: u8, suberror: u32, rip: u64, data: &[u64]) -> String {
    let head = format!("KVM could not run guest code on vCPU {cpu}");
    let Some(bytes) = failed_instruction(suberror, data) else {
        return format!("{head}: internal error {suberror} at rip {rip:#x}, data {data:x?}");
    };
    let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let what = match instruction_name(&bytes) {
        Some(n) => format!("`{n}` ({})", hex.join(" ")),
        None => format!("an instruction ({})", hex.join(" ")),
    };
    let supervisor = rip >= 0xffff_8000_0000_0000;
    format!(
        "{head}: KVM's instruction emulator cannot run {what} at rip {rip:#x}{}. On a host whose \
         KVM emulates guest ring 0 (nested PVM; `vmrun doctor` says so) the guest kernel must \
         avoid such instructions: use vmrun's PVM kernel variant (`vmrun images build \
         kernel-pvm`, then drop --kernel or pass --compat pvm), or map the address to the \
         caller with the kernel's System.map to patch it out",
        if supervisor {
            " (in the guest kernel, ring 0)"
        } else {
            ""
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emulation_failures_name_the_instruction() {
        // What a Debian cloud kernel met on a PVM host: `lock cmpxchg16b 0x20(%rbp)`.
        let data = [1, 0x7420_4dc7_0f48_f00f, 0, 0];
        let bytes = failed_instruction(1, &data).unwrap();
        assert_eq!(&bytes[..6], &[0xf0, 0x48, 0x0f, 0xc7, 0x4d, 0x20]);
        assert_eq!(instruction_name(&bytes), Some("cmpxchg16b"));
        let msg = internal_error(0, 1, 0xffff_ffff_8891_7850, &data);
        assert!(msg.contains("`cmpxchg16b` (f0 48 0f c7 4d 20"), "{msg}");
        assert!(
            msg.contains("ring 0") && msg.contains("kernel-pvm"),
            "{msg}"
        );
        for (b, n) in [
            (&[0x9b][..], "fwait"),
            (&[0xcc], "int3"),
            (&[0xf3, 0x48, 0x0f, 0xb8, 0xc0], "popcnt"),
            (&[0x0f, 0x01, 0xc1], "vmcall"),
            (&[0x48, 0x0f, 0xc7, 0xf0], "rdrand"),
        ] {
            assert_eq!(instruction_name(b), Some(n), "{b:x?}");
        }
        assert_eq!(instruction_name(&[0x90]), None);
        // Without the bytes flag, or another suberror: the raw report.
        assert_eq!(failed_instruction(1, &[0, 5]), None);
        assert_eq!(failed_instruction(3, &[1, 5]), None);
        assert!(internal_error(0, 3, 0x1000, &[7]).contains("internal error 3"));
        // A length byte beyond what was sent is cut to what is there.
        assert_eq!(failed_instruction(1, &[1, 0xff]).unwrap().len(), 7);
    }
}
