//! Per-vCPU CPUID: KVM's supported set, normalised so each vCPU sees its own APIC id, a
//! consistent topology (one socket, `count` cores, one thread each) and the hypervisor bit.

use kvm_bindings::kvm_cpuid_entry2;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
/// CLFLUSH line size in 8-byte units (64 bytes).
const CLFLUSH_LINE: u32 = 8;

/// Topology level types of leaves 0xb/0x1f.
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Bits needed to number `count` cores in an x2APIC id.
fn core_shift(count: u8) -> u32 {
    u32::from(count.max(1)).next_power_of_two().trailing_zeros()
}

/// KVM's paravirtual feature leaf, and the features in it whose use is a `vmcall`: unhalt
/// kicks, IPIs, directed yields and GPA range hypercalls. Where guest ring 0 is emulated
/// (nested PVM) a `vmcall` from it livelocks the vCPU, so those are hidden there.
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
const KVM_FEATURE_PV_UNHALT: u32 = 1 << 7;
const KVM_FEATURE_PV_TLB_FLUSH: u32 = 1 << 9;
const KVM_FEATURE_PV_SEND_IPI: u32 = 1 << 11;
const KVM_FEATURE_PV_SCHED_YIELD: u32 = 1 << 13;
const KVM_FEATURE_HC_MAP_GPA_RANGE: u32 = 1 << 16;
pub const PV_HYPERCALL_FEATURES: u32 = KVM_FEATURE_PV_UNHALT
    | KVM_FEATURE_PV_TLB_FLUSH
    | KVM_FEATURE_PV_SEND_IPI
    | KVM_FEATURE_PV_SCHED_YIELD
    | KVM_FEATURE_HC_MAP_GPA_RANGE;

/// Hides the paravirtual features that make a guest issue `vmcall` (see
/// [`PV_HYPERCALL_FEATURES`]); the others (kvmclock, async page faults, steal time) are
/// MSR-based and stay.
pub fn hide_pv_hypercalls(entries: &mut [kvm_cpuid_entry2]) {
    for e in entries
        .iter_mut()
        .filter(|e| e.function == LEAF_KVM_FEATURES)
    {
        e.eax &= !PV_HYPERCALL_FEATURES;
    }
}

/// Normalises the entries for vCPU `index` of `count`.
pub fn normalize(entries: &mut [kvm_cpuid_entry2], index: u8, count: u8) {
    let apic = u32::from(index);
    let count32 = u32::from(count.max(1));
    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (apic << 24) | (count32 << 16) | (CLFLUSH_LINE << 8);
                e.ecx |= ECX_HYPERVISOR;
                if count32 > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // Cores per package - 1 in EAX[31:26]; caches of level 3 are shared by all.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count32 - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | (sharing << 14) | ((count32 - 1) << 26);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                e.edx = apic;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (LEVEL_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = core_shift(count);
                        e.ebx = count32;
                        e.ecx = (LEVEL_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            LEAF_AMD_SIZES => {
                // NC = cores - 1, and the APIC id size that covers them.
                e.ecx = (core_shift(count) << 12) | (count32 - 1);
            }
            LEAF_AMD_TOPOLOGY => {
                e.eax = apic;
                e.ebx = apic & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0,
            edx: 0,
            ..Default::default()
        }
    }

    fn find(e: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *e.iter().find(|x| x.function == f && x.index == i).unwrap()
    }

    fn sample() -> Vec<kvm_cpuid_entry2> {
        vec![
            leaf(1, 0),
            {
                let mut l1 = leaf(4, 0);
                l1.eax = 1 << 5;
                l1
            },
            {
                let mut l3 = leaf(4, 3);
                l3.eax = 3 << 5;
                l3
            },
            leaf(0xb, 0),
            leaf(0xb, 1),
            leaf(0xb, 2),
            leaf(0x8000_0008, 0),
            leaf(0x8000_001e, 0),
        ]
    }

    #[test]
    fn each_vcpu_gets_its_apic_id() {
        for idx in 0..4u8 {
            let mut e = sample();
            normalize(&mut e, idx, 4);
            assert_eq!(find(&e, 1, 0).ebx >> 24, u32::from(idx));
            assert_eq!(find(&e, 0xb, 0).edx, u32::from(idx));
            assert_eq!(find(&e, 0xb, 1).edx, u32::from(idx));
            assert_eq!(find(&e, 0x8000_001e, 0).eax, u32::from(idx));
        }
    }

    #[test]
    fn topology_counts_cores() {
        let mut e = sample();
        normalize(&mut e, 0, 4);
        let l1 = find(&e, 1, 0);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.edx & EDX_HTT, 0);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        let smt = find(&e, 0xb, 0);
        let core = find(&e, 0xb, 1);
        assert_eq!((smt.ebx, smt.ecx >> 8), (1, LEVEL_SMT));
        assert_eq!((core.eax, core.ebx, core.ecx >> 8), (2, 4, LEVEL_CORE));
        assert_eq!(find(&e, 0xb, 2).ebx, 0);
        assert_eq!(find(&e, 4, 0).eax >> 26, 3);
        assert_eq!((find(&e, 4, 0).eax >> 14) & 0xfff, 0);
        assert_eq!((find(&e, 4, 3).eax >> 14) & 0xfff, 3);
        assert_eq!(find(&e, 0x8000_0008, 0).ecx & 0xff, 3);
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let mut e = sample();
        e[0].edx = EDX_HTT;
        normalize(&mut e, 0, 1);
        assert_eq!(find(&e, 1, 0).edx & EDX_HTT, 0);
        assert_eq!(find(&e, 0xb, 1).eax, 0);
    }

    #[test]
    fn pv_hypercall_features_are_hidden_and_the_rest_kept() {
        let mut e = vec![leaf(LEAF_KVM_FEATURES, 0), leaf(LEAF_FEATURES, 0)];
        e[0].eax = 0x01ff_ffff;
        e[1].eax = 0xffff_ffff;
        hide_pv_hypercalls(&mut e);
        assert_eq!(e[0].eax & PV_HYPERCALL_FEATURES, 0);
        assert_eq!(e[0].eax | PV_HYPERCALL_FEATURES, 0x01ff_ffff, "others kept");
        assert_eq!(e[1].eax, 0xffff_ffff, "other leaves untouched");
    }

    #[test]
    fn shift_covers_non_powers_of_two() {
        assert_eq!(core_shift(1), 0);
        assert_eq!(core_shift(2), 1);
        assert_eq!(core_shift(3), 2);
        assert_eq!(core_shift(64), 6);
    }
}
