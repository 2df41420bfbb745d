//! MSR values at boot, as a freshly reset CPU would hold them for the Linux entry.

use kvm_bindings::kvm_msr_entry;

pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
pub const MSR_IA32_TSC: u32 = 0x10;
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_CSTAR: u32 = 0xc000_0083;
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// Fast string operations on (what firmware leaves enabled).
const MISC_ENABLE_FAST_STRING: u64 = 1;

/// The boot MSR list.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_msrs_are_unique_and_zero_but_misc_enable() {
        let e = boot_msr_entries();
        let mut idx: Vec<u32> = e.iter().map(|m| m.index).collect();
        idx.sort_unstable();
        idx.dedup();
        assert_eq!(idx.len(), e.len());
        for m in &e {
            let want = if m.index == MSR_IA32_MISC_ENABLE {
                1
            } else {
                0
            };
            assert_eq!(m.data, want, "msr {:#x}", m.index);
        }
    }
}
