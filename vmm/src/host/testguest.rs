//! Tiny guest programs, hand-assembled, that exercise the VMM under real KVM without a kernel:
//! serial output, PIO and MMIO exits, the status port, reset, several vCPUs, and the ring-0 vs
//! ring-3 timing `vmrun doctor` uses. Most run in ring 3 (native even where ring 0 is emulated).

use vmrun_protocol::status::Status;

use crate::arch::x86_64::gdt::CpuMode;
use crate::arch::x86_64::layout::{I8042_PORT, PROBE_MMIO, PROBE_PORT, SERIAL_PORT, STATUS_PORT};

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
    /// mov eax, ebx (PVH: the start info address).
    pub fn mov_eax_ebx(mut self) -> Self {
        self.0.extend_from_slice(&[0x89, 0xd8]);
        self
    }
    /// mov eax, esi (64-bit boot protocol: the zero page address).
    pub fn mov_eax_esi(mut self) -> Self {
        self.0.extend_from_slice(&[0x89, 0xf0]);
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
    /// `mov dword [abs32], imm32`
    pub fn store_abs(mut self, addr: u32, v: u32) -> Self {
        self.0.extend_from_slice(&[0xc7, 0x04, 0x25]);
        self.0.extend_from_slice(&addr.to_le_bytes());
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// `mov eax, dword [abs32]`
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
    /// `inc dword [abs32]`
    pub fn inc_abs(mut self, addr: u32) -> Self {
        self.0.extend_from_slice(&[0xff, 0x04, 0x25]);
        self.0.extend_from_slice(&addr.to_le_bytes());
        self
    }
    /// Where the next instruction goes (a jump target).
    pub fn here(&self) -> usize {
        self.0.len()
    }
    /// `jmp rel32` back to `target` (an earlier `here()`).
    pub fn jmp_to(mut self, target: usize) -> Self {
        let rel = target as i64 - (self.0.len() as i64 + 5);
        self.0.push(0xe9);
        self.0.extend_from_slice(&(rel as i32).to_le_bytes());
        self
    }
    /// Bytes as they are.
    pub fn raw(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
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

/// Sends [`crate::devices::legacy::probe::FORBIDDEN_CALL`] to the probe port: the vCPU thread
/// then makes a system call its seccomp filter forbids.
pub fn forbidden_call() -> TestGuest {
    user(
        Asm::default()
            .mov_dx(PROBE_PORT)
            .raw(&[0xb8])
            .raw(&crate::devices::legacy::probe::FORBIDDEN_CALL.to_le_bytes())
            .out_eax()
            .report(Status::Exited(0)),
    )
}

/// Where [`counter`] keeps its count: guest memory well away from the program.
pub const COUNTER_ADDR: u32 = 0x20_0000;

/// Forever: adds one to a counter in guest memory, sends it to the probe port, spins a
/// while. A VM restored from a snapshot of it carries on from the count it was saved at, so
/// its probe samples show that memory, registers (the port in DX) and RIP came back.
pub fn counter(spin: u32) -> TestGuest {
    let a = Asm::default().mov_dx(PROBE_PORT);
    let top = a.here();
    user(
        a.inc_abs(COUNTER_ADDR)
            .load_abs(COUNTER_ADDR)
            .out_eax()
            .mov_ecx(spin.max(1))
            .spin_ecx()
            .jmp_to(top),
    )
}

/// Spins in ring 3 until killed: a running VM that costs no exits (for measurements).
pub fn park() -> TestGuest {
    user(Asm::default().park())
}

/// An instruction KVM's emulator lacks, run in ring 0: `fwait` (what a kernel's FPU code
/// meets). Where ring 0 runs at hardware speed it simply runs and the guest reports 0; where
/// ring 0 is emulated (nested PVM) the vCPU stops with an emulation failure.
pub fn ring0_fwait() -> TestGuest {
    TestGuest {
        code: Asm::default()
            .raw(&[0x9b])
            .report(Status::Exited(0))
            .bytes(),
        mode: CpuMode::Long64,
    }
}

/// The native-mode probe of [`super::pvmnative`], starting in ring 0, with `flags` in the low
/// bits of its control-MSR write and the probe's `options`.
pub fn pvm_native(flags: u8, options: u16) -> TestGuest {
    TestGuest {
        code: super::pvmnative::program(flags, options),
        mode: CpuMode::Long64,
    }
}

/// Looks a program up by name (for the hidden `vmrun test-guest` command).
pub fn by_name(name: &str) -> Option<TestGuest> {
    Some(match name {
        "hello" => hello(),
        "reset" => reset(),
        "cpus" => cpus(),
        "mmio" => mmio(),
        "garbage" => garbage(),
        "park" => park(),
        "counter" => counter(1 << 20),
        "forbidden-call" => forbidden_call(),
        "ring0-fwait" => ring0_fwait(),
        _ => {
            // pvm-native[:FLAGS[:OPTIONS]]
            if let Some(rest) = name.strip_prefix("pvm-native") {
                let (flags, options): (u8, u16) = match rest.split(':').collect::<Vec<_>>()[..] {
                    [""] => (0, 0),
                    ["", f] => (f.parse().ok()?, 0),
                    ["", f, o] => (f.parse().ok()?, o.parse().ok()?),
                    _ => return None,
                };
                return (flags < 0x80).then(|| pvm_native(flags, options));
            }
            let code = name.strip_prefix("status-")?.parse().ok()?;
            status(Status::Exited(code))
        }
    })
}

/// Kernel images around a test program, to exercise each boot entry path of the loader.
pub mod images {
    use super::Asm;
    use crate::arch::x86_64::layout::PROBE_PORT;
    use vmrun_protocol::status::Status;

    /// Where the ELF images load their one segment.
    pub const LOAD: u64 = 0x100_0000;

    /// Code that sends EBX and ESI to the probe port (what the boot protocol handed over:
    /// PVH start info in EBX, zero page in ESI), prints `msg` and reports `status`. Only
    /// instructions that encode the same in 32-bit and 64-bit mode, so it serves every entry.
    pub fn program(msg: &str, status: Status) -> Vec<u8> {
        Asm::default()
            .mov_dx(PROBE_PORT)
            .mov_eax_ebx()
            .out_eax()
            .mov_eax_esi()
            .out_eax()
            .print(msg)
            .report(status)
            .bytes()
    }

    /// A minimal bzImage (boot protocol 2.15, 64-bit capable): one setup sector, then the
    /// protected-mode part whose 64-bit entry (at +0x200) is `code`.
    pub fn bzimage(code: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 1024];
        f[0x1f1] = 1; // setup_sects
        f[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        f[0x202..0x206].copy_from_slice(b"HdrS");
        f[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        f[0x211] = 1; // loadflags: LOADED_HIGH
        f[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        f[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
        f[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes()); // kernel_alignment
        f[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
        f[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes()); // cmdline_size
                                                                 // Protected-mode part: 32-bit entry (unused) at 0, 64-bit entry at 0x200.
        let mut pm = vec![0xf4u8; 0x200];
        pm.extend_from_slice(code);
        f.extend_from_slice(&pm);
        f
    }

    /// An ELF64 executable with one PT_LOAD segment at [`LOAD`] holding `code`, entered at its
    /// start; with `pvh`, also a PT_NOTE holding the Xen PVH entry note (32-bit entry).
    pub fn elf(code: &[u8], pvh: bool) -> Vec<u8> {
        const CODE_OFF: usize = 0x1000;
        let phnum: u16 = if pvh { 2 } else { 1 };
        let mut f = vec![0u8; CODE_OFF];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2; // 64-bit
        f[5] = 1; // little endian
        f[6] = 1; // version
        f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&LOAD.to_le_bytes()); // entry
        f[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
        f[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
        f[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
        f[56..58].copy_from_slice(&phnum.to_le_bytes());
        let mut ph =
            |i: usize, kind: u32, flags: u32, off: u64, addr: u64, size: u64, align: u64| {
                let p = 64 + 56 * i;
                f[p..p + 4].copy_from_slice(&kind.to_le_bytes());
                f[p + 4..p + 8].copy_from_slice(&flags.to_le_bytes());
                f[p + 8..p + 16].copy_from_slice(&off.to_le_bytes());
                f[p + 16..p + 24].copy_from_slice(&addr.to_le_bytes());
                f[p + 24..p + 32].copy_from_slice(&addr.to_le_bytes());
                f[p + 32..p + 40].copy_from_slice(&size.to_le_bytes());
                f[p + 40..p + 48].copy_from_slice(&size.to_le_bytes());
                f[p + 48..p + 56].copy_from_slice(&align.to_le_bytes());
            };
        ph(0, 1, 5, CODE_OFF as u64, LOAD, code.len() as u64, 0x1000); // PT_LOAD, R+X
        if pvh {
            // One note: namesz 4 ("Xen\0"), descsz 4 (the 32-bit entry), type 18
            // (XEN_ELFNOTE_PHYS32_ENTRY): 20 bytes at offset 0x200.
            ph(1, 4, 4, 0x200, 0, 20, 4); // PT_NOTE
            let n = 0x200;
            f[n..n + 4].copy_from_slice(&4u32.to_le_bytes());
            f[n + 4..n + 8].copy_from_slice(&4u32.to_le_bytes());
            f[n + 8..n + 12].copy_from_slice(&18u32.to_le_bytes());
            f[n + 12..n + 16].copy_from_slice(b"Xen\0");
            f[n + 16..n + 20].copy_from_slice(&(LOAD as u32).to_le_bytes());
        }
        f.extend_from_slice(code);
        f
    }
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
        assert!(by_name("pvm-native").is_some());
        assert_eq!(
            by_name("pvm-native:16:300").unwrap().code,
            pvm_native(16, 300).code
        );
        for bad in [
            "pvm-native:",
            "pvm-native:128",
            "pvm-native:1:2:3",
            "pvm-natives",
        ] {
            assert!(by_name(bad).is_none(), "{bad}");
        }
    }
}
