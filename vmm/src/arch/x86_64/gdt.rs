//! The boot GDT and the matching segment registers.
//!
//! Entry layout (Intel SDM vol. 3 §3.4.5): the `flags` argument packs access byte (bits 0-7) and
//! the G/DB/L/AVL nibble (bits 12-15), the usual shorthand (0xa09b = 64-bit ring-0 code).

use kvm_bindings::kvm_segment;

/// Selectors of the boot GDT (index × 8, plus RPL).
pub const KERNEL_CS: u16 = 0x08;
pub const KERNEL_DS: u16 = 0x10;
pub const TSS_SEL: u16 = 0x18;
pub const USER_DS: u16 = 0x20 | 3;
pub const USER_CS: u16 = 0x28 | 3;

/// Which code the vCPU starts: the kernel's 64-bit entry, the PVH 32-bit entry, or a test guest
/// running in ring 3 of long mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuMode {
    Long64,
    Protected32,
    User64,
}

/// Builds a descriptor from flags, base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT for `mode`. Index 3 is always the TSS (KVM wants a usable TR).
pub fn gdt_table(mode: CpuMode) -> [u64; 6] {
    let code = match mode {
        CpuMode::Protected32 => gdt_entry(0xc09b, 0, 0xfffff),
        CpuMode::Long64 | CpuMode::User64 => gdt_entry(0xa09b, 0, 0xfffff),
    };
    [
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
        gdt_entry(0xc0f3, 0, 0xfffff),
        gdt_entry(0xa0fb, 0, 0xfffff),
    ]
}

fn base(entry: u64) -> u64 {
    ((entry & 0xff00_0000_0000_0000) >> 32)
        | ((entry & 0x0000_00ff_0000_0000) >> 16)
        | ((entry & 0x0000_0000_ffff_0000) >> 16)
}

fn limit(entry: u64) -> u32 {
    let raw = (((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0x0000_0000_0000_ffff)) as u32;
    // With 4 KiB granularity the limit counts pages.
    if (entry >> 55) & 1 == 1 {
        (raw << 12) | 0xfff
    } else {
        raw
    }
}

/// The KVM segment register for descriptor `entry` at GDT index `index`.
pub fn kvm_segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let dpl = ((entry >> 45) & 0x3) as u8;
    kvm_segment {
        base: base(entry),
        limit: limit(entry),
        selector: (u16::from(index) * 8) | u16::from(dpl),
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from((entry >> 47) & 1 == 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_encode_the_usual_descriptors() {
        // Values every x86 boot loader writes: flat 64-bit code and 4 GiB data.
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0xc09b, 0, 0xfffff), 0x00cf_9b00_0000_ffff);
    }

    #[test]
    fn segments_decode_back() {
        let t = gdt_table(CpuMode::Long64);
        let cs = kvm_segment_from_gdt(t[1], 1);
        assert_eq!(
            (cs.selector, cs.type_, cs.l, cs.db, cs.dpl),
            (KERNEL_CS, 0xb, 1, 0, 0)
        );
        assert_eq!(
            (cs.present, cs.s, cs.g, cs.limit, cs.base),
            (1, 1, 1, 0xffff_ffff, 0)
        );
        let ds = kvm_segment_from_gdt(t[2], 2);
        assert_eq!((ds.selector, ds.type_, ds.db, ds.l), (KERNEL_DS, 3, 1, 0));
        let tss = kvm_segment_from_gdt(t[3], 3);
        assert_eq!((tss.selector, tss.type_, tss.s), (TSS_SEL, 0xb, 0));
        let ucs = kvm_segment_from_gdt(t[5], 5);
        assert_eq!((ucs.selector, ucs.dpl, ucs.l), (USER_CS, 3, 1));
        let uds = kvm_segment_from_gdt(t[4], 4);
        assert_eq!((uds.selector, uds.dpl), (USER_DS, 3));
        let cs32 = kvm_segment_from_gdt(gdt_table(CpuMode::Protected32)[1], 1);
        assert_eq!((cs32.l, cs32.db), (0, 1));
    }

    #[test]
    fn null_descriptor_is_unusable() {
        let null = kvm_segment_from_gdt(0, 0);
        assert_eq!((null.present, null.unusable), (0, 1));
    }

    #[test]
    fn base_and_byte_granular_limit_round_trip() {
        let e = gdt_entry(0x0093, 0x1234_5678, 0xabcde);
        let s = kvm_segment_from_gdt(e, 2);
        assert_eq!((s.base, s.limit, s.g), (0x1234_5678, 0xabcde, 0));
    }
}
