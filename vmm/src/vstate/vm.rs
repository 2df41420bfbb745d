//! The KVM VM: in-kernel IRQ chip (PIC + IOAPIC + LAPICs) and PIT, created before any vCPU.

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
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
