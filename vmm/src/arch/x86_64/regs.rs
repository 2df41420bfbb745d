//! Initial vCPU register state for each entry mode.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::gdt::{gdt_table, kvm_segment_from_gdt, CpuMode};
use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PVH_INFO_START, ZERO_PAGE_START,
};
use super::paging::write_identity_tables;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 is reserved and always set.
const RFLAGS_RESERVED: u64 = 1 << 1;
/// IOPL 3, so ring-3 test guests may use port I/O to talk to the VMM.
const RFLAGS_IOPL3: u64 = 3 << 12;

/// General registers. Linux 64-bit entry: RSI points at the zero page. PVH: RBX points at the
/// start info. Test guests get a stack below their code.
pub fn initial_regs(mode: CpuMode, entry: u64, stack: Option<u64>) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        rip: entry,
        ..Default::default()
    };
    match mode {
        CpuMode::Long64 => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
        CpuMode::Protected32 => regs.rbx = PVH_INFO_START,
        CpuMode::User64 => {
            regs.rflags |= RFLAGS_IOPL3;
            regs.rsp = stack.unwrap_or(BOOT_STACK_POINTER);
        }
    }
    regs
}

/// x87 and SSE state as after FNINIT / reset: what the kernel's early FPU code expects.
pub fn initial_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// Writes the GDT (and an empty IDT, plus page tables for long mode) into guest memory and
/// returns the special registers for `mode`, starting from the vCPU's current ones.
pub fn initial_sregs(
    mem: &GuestMemoryMmap,
    mode: CpuMode,
    mut sregs: kvm_sregs,
) -> Result<kvm_sregs, vm_memory::GuestMemoryError> {
    let gdt = gdt_table(mode);
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;

    let (cs, ds) = match mode {
        CpuMode::User64 => (
            kvm_segment_from_gdt(gdt[5], 5),
            kvm_segment_from_gdt(gdt[4], 4),
        ),
        _ => (
            kvm_segment_from_gdt(gdt[1], 1),
            kvm_segment_from_gdt(gdt[2], 2),
        ),
    };
    sregs.cs = cs;
    sregs.ds = ds;
    sregs.es = ds;
    sregs.fs = ds;
    sregs.gs = ds;
    sregs.ss = ds;
    sregs.tr = kvm_segment_from_gdt(gdt[3], 3);

    match mode {
        CpuMode::Protected32 => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        CpuMode::Long64 | CpuMode::User64 => {
            sregs.cr3 = write_identity_tables(mem, mode == CpuMode::User64)?;
            sregs.cr4 = X86_CR4_PAE;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    Ok(sregs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn long_mode_sregs() {
        let m = mem();
        let s = initial_sregs(&m, CpuMode::Long64, kvm_sregs::default()).unwrap();
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE | X86_CR0_PG);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!((s.cs.l, s.cs.dpl, s.ss.dpl), (1, 0, 0));
        assert_eq!(s.gdt.base, BOOT_GDT_START);
        let written: u64 = m.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(written, 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn pvh_starts_in_flat_protected_mode_without_paging() {
        let s = initial_sregs(&mem(), CpuMode::Protected32, kvm_sregs::default()).unwrap();
        assert_eq!(s.cr0 & X86_CR0_PG, 0);
        assert_eq!(s.cr0 & X86_CR0_PE, X86_CR0_PE);
        assert_eq!((s.efer, s.cs.db, s.cs.l), (0, 1, 0));
        let r = initial_regs(CpuMode::Protected32, 0x100_0000, None);
        assert_eq!((r.rbx, r.rip), (PVH_INFO_START, 0x100_0000));
    }

    #[test]
    fn user_mode_runs_at_cpl3_with_io_privilege() {
        let s = initial_sregs(&mem(), CpuMode::User64, kvm_sregs::default()).unwrap();
        assert_eq!((s.cs.dpl, s.cs.selector & 3, s.ss.dpl), (3, 3, 3));
        let r = initial_regs(CpuMode::User64, 0x10_0000, Some(0x20_0000));
        assert_eq!(r.rflags & RFLAGS_IOPL3, RFLAGS_IOPL3);
        assert_eq!(r.rsp, 0x20_0000);
    }

    #[test]
    fn linux_entry_points_rsi_at_zero_page() {
        let r = initial_regs(CpuMode::Long64, 0x100_0000, None);
        assert_eq!(
            (r.rsi, r.rsp, r.rflags),
            (ZERO_PAGE_START, BOOT_STACK_POINTER, 2)
        );
        let f = initial_fpu();
        assert_eq!((f.fcw, f.mxcsr), (0x37f, 0x1f80));
    }
}
