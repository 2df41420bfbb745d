//! Tiny guest programs, hand-assembled, that exercise the VMM under real KVM without a kernel:
//! serial output, PIO and MMIO exits, the status port, reset, several vCPUs, and the ring-0 vs
//! ring-3 timing `vmrun doctor` uses. Most run in ring 3 (native even where ring 0 is emulated).

use vmrun_protocol::status::Status;

use crate::arch::x86_64::gdt::CpuMode;
use crate::arch::x86_64::layout::{I8042_PORT, SERIAL_PORT, STATUS_PORT};
use crate::builder::{PROBE_MMIO, PROBE_PORT};

/// A small x86-64 assembler for the handful of instructions these programs use.
#[derive(Default)]
pub struct Asm(Vec<u8>);

impl Asm {
    pub fn mov_dx(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&[0x66, 0xba]);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn mov_al(mut self, v: u8) -> Self {
        self.0.extend_from_slice(&[0xb0, v]);
        self
    }
    pub fn mov_ax(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&[0x66, 0xb8]);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn mov_ecx(mut self, v: u32) -> Self {
        self.0.push(0xb9);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// mov eax, edi (the vCPU index the VMM puts in RDI).
    pub fn mov_eax_edi(mut self) -> Self {
        self.0.extend_from_slice(&[0x89, 0xf8]);
        self
    }
    pub fn add_al(mut self, v: u8) -> Self {
        self.0.extend_from_slice(&[0x04, v]);
        self
    }
    pub fn out_al(mut self) -> Self {
        self.0.push(0xee);
        self
    }
    pub fn out_ax(mut self) -> Self {
        self.0.extend_from_slice(&[0x66, 0xef]);
        self
    }
    pub fn out_eax(mut self) -> Self {
        self.0.push(0xef);
        self
    }
    /// mov dword [abs32], imm32
    pub fn store_abs(mut self, addr: u32, v: u32) -> Self {
        self.0.extend_from_slice(&[0xc7, 0x04, 0x25]);
        self.0.extend_from_slice(&addr.to_le_bytes());
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// mov eax, dword [abs32]
    pub fn load_abs(mut self, addr: u32) -> Self {
        self.0.extend_from_slice(&[0x8b, 0x04, 0x25]);
        self.0.extend_from_slice(&addr.to_le_bytes());
        self
    }
    /// dec ecx; jnz back to the dec.
    pub fn spin_ecx(mut self) -> Self {
        self.0.extend_from_slice(&[0xff, 0xc9, 0x75, 0xfc]);
        self
    }
    /// jmp $ — park the vCPU.
    pub fn park(mut self) -> Self {
        self.0.extend_from_slice(&[0xeb, 0xfe]);
        self
    }
    pub fn print(mut self, s: &str) -> Self {
        self = self.mov_dx(SERIAL_PORT);
        for b in s.bytes() {
            self = self.mov_al(b).out_al();
        }
        self
    }
    pub fn report(self, status: Status) -> Self {
        let [kind, code] = status.encode();
        self.mov_dx(STATUS_PORT)
            .mov_ax(u16::from_le_bytes([kind, code]))
            .out_ax()
            .park()
    }
    pub fn bytes(self) -> Vec<u8> {
        self.0
    }
}

/// A test program and the CPU mode it starts in.
pub struct TestGuest {
    pub code: Vec<u8>,
    pub mode: CpuMode,
}

fn user(a: Asm) -> TestGuest {
    TestGuest {
        code: a.bytes(),
        mode: CpuMode::User64,
    }
}

/// Prints a line on the serial console, then reports status 0.
pub fn hello() -> TestGuest {
    user(
        Asm::default()
            .print("hello from a vmrun test guest\n")
            .report(Status::Exited(0)),
    )
}

/// Reports `status` at once.
pub fn status(status: Status) -> TestGuest {
    user(Asm::default().report(status))
}

/// Resets the machine through the i8042 command port.
pub fn reset() -> TestGuest {
    user(
        Asm::default()
            .mov_dx(I8042_PORT + 4)
            .mov_al(0xfe)
            .out_al()
            .park(),
    )
}

/// Each vCPU prints its index as a digit, then parks.
pub fn cpus() -> TestGuest {
    user(
        Asm::default()
            .mov_dx(SERIAL_PORT)
            .mov_eax_edi()
            .add_al(b'0')
            .out_al()
            .park(),
    )
}

/// Writes 7 into the MMIO probe, reads it back (the probe answers with its sample count) and
/// sends what it read to the PIO probe, then reports status 0.
pub fn mmio() -> TestGuest {
    let a = PROBE_MMIO as u32;
    user(
        Asm::default()
            .store_abs(a, 7)
            .load_abs(a)
            .mov_dx(PROBE_PORT)
            .out_eax()
            .report(Status::Exited(0)),
    )
}

/// Bytes that are no instruction: the vCPU takes #UD with no IDT and triple-faults.
pub fn garbage() -> TestGuest {
    user(Asm(vec![0x0f, 0x0b, 0xff, 0xff, 0xff, 0xff]))
}

/// Probes, spins `iterations` times, probes again and reports 0; in ring 0 or ring 3.
pub fn spin(iterations: u32, mode: CpuMode) -> TestGuest {
    let code = Asm::default()
        .mov_dx(PROBE_PORT)
        .out_eax()
        .mov_ecx(iterations.max(1))
        .spin_ecx()
        .out_eax()
        .report(Status::Exited(0))
        .bytes();
    TestGuest { code, mode }
}

/// Looks a program up by name (for the hidden `vmrun test-guest` command).
pub fn by_name(name: &str) -> Option<TestGuest> {
    Some(match name {
        "hello" => hello(),
        "reset" => reset(),
        "cpus" => cpus(),
        "mmio" => mmio(),
        "garbage" => garbage(),
        _ => {
            let code = name.strip_prefix("status-")?.parse().ok()?;
            status(Status::Exited(code))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings() {
        assert_eq!(
            Asm::default().mov_dx(0x3f8).bytes(),
            [0x66, 0xba, 0xf8, 0x03]
        );
        assert_eq!(
            Asm::default().mov_ecx(5).spin_ecx().bytes(),
            [0xb9, 5, 0, 0, 0, 0xff, 0xc9, 0x75, 0xfc]
        );
        assert_eq!(
            Asm::default().store_abs(0x3000_0000, 7).bytes(),
            [0xc7, 0x04, 0x25, 0, 0, 0, 0x30, 7, 0, 0, 0]
        );
        let r = Asm::default().report(Status::Exited(3)).bytes();
        assert_eq!(&r[4..8], &[0x66, 0xb8, 0, 3]);
        assert_eq!(&r[r.len() - 2..], &[0xeb, 0xfe]);
    }

    #[test]
    fn names() {
        assert!(by_name("hello").is_some());
        assert_eq!(
            by_name("status-42").unwrap().code,
            status(Status::Exited(42)).code
        );
        assert!(by_name("status-300").is_none());
        assert!(by_name("nope").is_none());
    }
}
