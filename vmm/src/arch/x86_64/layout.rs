//! Guest physical memory layout. Low addresses follow what Linux and Firecracker expect for a
//! direct 64-bit boot; the 32-bit MMIO gap holds the IOAPIC, LAPIC and virtio-mmio windows.

/// Boot GDT (a handful of 8-byte entries).
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT (empty: the kernel installs its own before enabling interrupts). After the six GDT
/// entries.
pub const BOOT_IDT_START: u64 = 0x530;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map; shares the page with the zero page, only one boot protocol is used per boot.
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack for the 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-map page tables: PML4, PDPT, PD.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// x86 `COMMAND_LINE_SIZE`, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area; the MP table lives here and the range is reserved.
pub const EBDA_START: u64 = 0x9fc00;
/// End of conventional memory (VGA hole and ROMs above).
pub const EBDA_END: u64 = 0xa0000;
/// The kernel loads at or above 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap (768 MiB below 4 GiB).
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// First address past 32 bits: RAM beyond the gap continues here.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Where virtio-mmio device windows are placed, 4 KiB apart.
pub const VIRTIO_MMIO_START: u64 = MMIO_GAP_START;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// IOAPIC and LAPIC default addresses.
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's three-page TSS region (Intel needs it; harmless elsewhere), just below the BIOS area.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// Number of IOAPIC pins KVM emulates.
pub const IOAPIC_PINS: u8 = 24;
/// First IRQ handed to virtio-mmio devices (0-4 are PIT, keyboard, cascade, COM2, COM1).
pub const IRQ_BASE: u32 = 5;
/// Last usable IRQ.
pub const IRQ_MAX: u32 = 23;
/// Serial console port and IRQ.
pub const SERIAL_PORT: u16 = 0x3f8;
pub const SERIAL_IRQ: u32 = 4;
/// i8042 keyboard controller ports (data 0x60 … command 0x64).
pub const I8042_PORT: u16 = 0x60;
/// The status port: see `devices::legacy::status` and `vmrun_protocol::status`.
pub const STATUS_PORT: u16 = vmrun_protocol::status::PORT;
/// Where test programs are loaded, and where the stack of vCPU 0 starts (each next vCPU's
/// 4 KiB lower).
pub const PROGRAM_START: u64 = HIMEM_START;
pub const PROGRAM_STACK: u64 = 0x30_0000;
/// Probe devices for test programs only: a PIO port and an MMIO window inside the identity
/// map but outside RAM.
pub const PROBE_PORT: u16 = 0x06f4;
pub const PROBE_MMIO: u64 = 0x3000_0000;
/// Most vCPUs a VM may have: the MP table (one 20-byte entry per vCPU) must fit in the 1 KiB
/// EBDA, and the IOAPIC takes the APIC id after the last vCPU.
pub const MAX_VCPUS: u8 = 32;

// The stack grows down between the zero page and the page tables; the command line ends below
// the EBDA. Checked at compile time.
const _: () =
    assert!(BOOT_STACK_POINTER < PML4_START && BOOT_STACK_POINTER > ZERO_PAGE_START + 0x1000);
const _: () = assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);

/// The guest RAM ranges for `mem_size` bytes of memory, split around the MMIO gap.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_ranges_split_around_the_gap() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(ram_ranges(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
        let big = 6u64 << 30;
        let r = ram_ranges(big);
        assert_eq!(
            r,
            vec![(0, MMIO_GAP_START), (MMIO_GAP_END, big - MMIO_GAP_START)]
        );
        assert_eq!(r.iter().map(|x| x.1).sum::<u64>(), big);
    }

    #[test]
    fn low_structures_do_not_overlap() {
        let regions = [
            (BOOT_GDT_START, 6 * 8),
            (BOOT_IDT_START, 8),
            (PVH_INFO_START, 0x40),
            (PVH_MODLIST_START, 0x20),
            (ZERO_PAGE_START, 0x1000),
            (PML4_START, 0x1000),
            (PDPTE_START, 0x1000),
            (PDE_START, 0x1000),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
        ];
        for (i, a) in regions.iter().enumerate() {
            for b in regions.iter().skip(i + 1) {
                assert!(
                    a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0,
                    "{a:x?} overlaps {b:x?}"
                );
            }
        }
    }
}
