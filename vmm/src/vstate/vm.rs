//! The KVM VM: in-kernel IRQ chip (PIC + IOAPIC + LAPICs) and PIT, created before any vCPU.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, KVM_CLOCK_REALTIME,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::arch::x86_64::layout::KVM_TSS_ADDRESS;

#[derive(Debug, Error)]
pub enum KvmError {
    #[error("cannot open /dev/kvm: {0}; check that KVM is loaded and that you may open /dev/kvm (run `vmrun doctor`)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    #[error("cannot create a VM: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("KVM_SET_TSS_ADDR failed: {0}")]
    Tss(kvm_ioctls::Error),
    #[error("cannot create the in-kernel IRQ chip: {0}")]
    IrqChip(kvm_ioctls::Error),
    #[error("cannot create the in-kernel PIT: {0}")]
    Pit(kvm_ioctls::Error),
    #[error("{what} failed: {source}")]
    State {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

fn state_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::State { what, source }
}

/// What the VM itself holds beyond its vCPUs: the in-kernel PICs and IOAPIC, the PIT, and the
/// clock the guest's kvmclock counts from.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

fn get_chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, KvmError> {
    let mut c = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c)
        .map_err(state_err("KVM_GET_IRQCHIP"))?;
    Ok(c)
}

/// Saves the VM's state; its vCPUs must be out of KVM_RUN.
pub fn save_state(vm: &VmFd) -> Result<VmState, KvmError> {
    Ok(VmState {
        pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(state_err("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(state_err("KVM_GET_CLOCK"))?,
    })
}

/// Restores a saved state into a VM made by [`create_vm`], before its vCPUs are restored.
/// The guest clock resumes where it was plus the wall-clock time since the save (when the
/// saving host's KVM recorded it), so timers and the guest's date are not left in the past.
pub fn restore_state(vm: &VmFd, s: &VmState) -> Result<(), KvmError> {
    vm.set_pit2(&s.pit).map_err(state_err("KVM_SET_PIT2"))?;
    let clock = kvm_clock_data {
        flags: s.clock.flags & KVM_CLOCK_REALTIME,
        ..s.clock
    };
    vm.set_clock(&clock).map_err(state_err("KVM_SET_CLOCK"))?;
    for chip in [&s.pic_master, &s.pic_slave, &s.ioapic] {
        vm.set_irqchip(chip).map_err(state_err("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}

pub fn open_kvm() -> Result<Kvm, KvmError> {
    let kvm = Kvm::new().map_err(KvmError::OpenKvm)?;
    let v = kvm.get_api_version();
    if v != 12 {
        return Err(KvmError::ApiVersion(v));
    }
    Ok(kvm)
}

pub fn create_vm(kvm: &Kvm) -> Result<VmFd, KvmError> {
    let vm = kvm.create_vm().map_err(KvmError::CreateVm)?;
    vm.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(KvmError::Tss)?;
    vm.create_irq_chip().map_err(KvmError::IrqChip)?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(KvmError::Pit)?;
    Ok(vm)
}
