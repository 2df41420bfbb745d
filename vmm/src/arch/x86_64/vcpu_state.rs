//! One vCPU's architectural state as KVM exposes it, for snapshots: what is saved, in which
//! order (KVM's own rules: MP state before the LAPIC, the TSC before its deadline, events
//! last), and the refusals a restore can meet. A state that KVM does not take back whole is an
//! error naming the piece, never a half-restored vCPU.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, VcpuFd};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::msr::MSR_IA32_TSC;

/// The TSC deadline timer: set after the TSC it counts against.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// MSRs read or written per ioctl (KVM stops at the first it refuses).
const MSR_CHUNK: usize = 64;

#[derive(Debug, Error)]
pub enum StateError {
    #[error("vCPU {cpu}: {what} failed: {source}")]
    Ioctl {
        cpu: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {cpu}: this host's KVM refused MSR {index:#x} of the snapshot; the snapshot cannot be restored faithfully here (take it on this host)")]
    MsrRefused { cpu: u8, index: u32 },
    #[error("vCPU {cpu}: the snapshot holds {count} CPUID entries or MSRs, more than KVM takes")]
    TooMany { cpu: u8, count: usize },
}

fn ioctl(cpu: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Ioctl { cpu, what, source }
}

/// Everything KVM keeps of one vCPU that a guest can observe.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: Option<kvm_xcrs>,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// (index, value) of every MSR of KVM's save list this vCPU would read.
    pub msrs: Vec<(u32, u64)>,
    pub events: kvm_vcpu_events,
    pub tsc_khz: Option<u32>,
}

/// Reads what KVM can read of `msrs` (KVM's save list); MSRs it refuses to read are skipped:
/// they are not part of this vCPU (features the host has and this guest was not given).
fn read_msrs(fd: &VcpuFd, cpu: u8, list: &[u32]) -> Result<Vec<(u32, u64)>, StateError> {
    let mut out = Vec::with_capacity(list.len());
    let mut rest = list;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_CHUNK)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| StateError::TooMany {
            cpu,
            count: entries.len(),
        })?;
        let n = fd.get_msrs(&mut msrs).map_err(ioctl(cpu, "KVM_GET_MSRS"))?;
        out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        // Short of the chunk, KVM stopped at entry n: skip it and read on after it.
        let skip = if n < chunk.len() { n + 1 } else { n };
        rest = &rest[skip..];
    }
    Ok(out)
}

/// Saves the state of a vCPU that is out of KVM_RUN with no I/O pending (see
/// `Vcpu::park`). `msr_list` is KVM_GET_MSR_INDEX_LIST.
pub fn save(
    fd: &VcpuFd,
    cpu: u8,
    msr_list: &[u32],
    has_xcrs: bool,
) -> Result<VcpuState, StateError> {
    // MP state first: reading it makes KVM process pending APIC events.
    let mp_state = fd.get_mp_state().map_err(ioctl(cpu, "KVM_GET_MP_STATE"))?;
    // Events before the registers: without KVM_CAP_EXCEPTION_PAYLOAD, reading them delivers a
    // queued exception's payload (CR2 of a #PF, DR6 of a #DB) into the registers read next.
    let events = fd
        .get_vcpu_events()
        .map_err(ioctl(cpu, "KVM_GET_VCPU_EVENTS"))?;
    let regs = fd.get_regs().map_err(ioctl(cpu, "KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(ioctl(cpu, "KVM_GET_SREGS"))?;
    let xsave = fd.get_xsave().map_err(ioctl(cpu, "KVM_GET_XSAVE"))?;
    let xcrs = if has_xcrs {
        Some(fd.get_xcrs().map_err(ioctl(cpu, "KVM_GET_XCRS"))?)
    } else {
        None
    };
    let debug_regs = fd
        .get_debug_regs()
        .map_err(ioctl(cpu, "KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(ioctl(cpu, "KVM_GET_LAPIC"))?;
    let msrs = read_msrs(fd, cpu, msr_list)?;
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(ioctl(cpu, "KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    let tsc_khz = fd.get_tsc_khz().ok();
    Ok(VcpuState {
        cpuid,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        msrs,
        events,
        tsc_khz,
    })
}

/// The MSRs in the order KVM must see them: the TSC first, its deadline last.
fn restore_order(msrs: &[(u32, u64)]) -> Vec<(u32, u64)> {
    let rank = |i: u32| match i {
        MSR_IA32_TSC => 0,
        MSR_IA32_TSC_DEADLINE => 2,
        _ => 1,
    };
    let mut v = msrs.to_vec();
    v.sort_by_key(|&(i, _)| rank(i));
    v
}

fn write_msrs(fd: &VcpuFd, cpu: u8, msrs: &[(u32, u64)]) -> Result<(), StateError> {
    for chunk in restore_order(msrs).chunks(MSR_CHUNK) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let set = Msrs::from_entries(&entries).map_err(|_| StateError::TooMany {
            cpu,
            count: entries.len(),
        })?;
        let n = fd.set_msrs(&set).map_err(ioctl(cpu, "KVM_SET_MSRS"))?;
        if n < chunk.len() {
            return Err(StateError::MsrRefused {
                cpu,
                index: chunk[n].0,
            });
        }
    }
    Ok(())
}

/// Puts a saved state into a new vCPU (created, not yet run).
pub fn restore(fd: &VcpuFd, cpu: u8, s: &VcpuState) -> Result<(), StateError> {
    if let Some(khz) = s.tsc_khz {
        // Same frequency as when saved, so guest time runs at the rate it calibrated; a host
        // that cannot scale the TSC keeps its own (the guest's clocksource copes).
        if fd.get_tsc_khz().ok() != Some(khz) {
            if let Err(e) = fd.set_tsc_khz(khz) {
                log::warn!("vCPU {cpu}: cannot set the TSC to {khz} kHz: {e}");
            }
        }
    }
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|_| StateError::TooMany {
        cpu,
        count: s.cpuid.len(),
    })?;
    fd.set_cpuid2(&cpuid)
        .map_err(ioctl(cpu, "KVM_SET_CPUID2"))?;
    fd.set_mp_state(s.mp_state)
        .map_err(ioctl(cpu, "KVM_SET_MP_STATE"))?;
    fd.set_regs(&s.regs).map_err(ioctl(cpu, "KVM_SET_REGS"))?;
    fd.set_sregs(&s.sregs)
        .map_err(ioctl(cpu, "KVM_SET_SREGS"))?;
    // SAFETY: `s.xsave` is a whole kvm_xsave as KVM_GET_XSAVE returned it (its 4 KiB region,
    // no trailing extension), which is what KVM_SET_XSAVE reads.
    unsafe { fd.set_xsave(&s.xsave) }.map_err(ioctl(cpu, "KVM_SET_XSAVE"))?;
    if let Some(x) = &s.xcrs {
        fd.set_xcrs(x).map_err(ioctl(cpu, "KVM_SET_XCRS"))?;
    }
    fd.set_debug_regs(&s.debug_regs)
        .map_err(ioctl(cpu, "KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&s.lapic)
        .map_err(ioctl(cpu, "KVM_SET_LAPIC"))?;
    write_msrs(fd, cpu, &s.msrs)?;
    fd.set_vcpu_events(&s.events)
        .map_err(ioctl(cpu, "KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// Whether KVM has the extended control registers (XCR0) to save.
pub fn has_xcrs(vm: &kvm_ioctls::VmFd) -> bool {
    vm.check_extension(Cap::Xcrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tsc_goes_first_and_its_deadline_last() {
        let v = restore_order(&[
            (MSR_IA32_TSC_DEADLINE, 1),
            (0x174, 2),
            (MSR_IA32_TSC, 3),
            (0x175, 4),
        ]);
        let order: Vec<u32> = v.iter().map(|e| e.0).collect();
        assert_eq!(
            order,
            vec![MSR_IA32_TSC, 0x174, 0x175, MSR_IA32_TSC_DEADLINE]
        );
    }
}
