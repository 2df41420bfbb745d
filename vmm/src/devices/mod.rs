//! Emulated devices. They sit on the VM's buses (`vstate::bus::BusDevice`) and tell the VM's
//! owner what the guest did through eventfds and the small trait in `legacy`, never by
//! reaching into VM state.

pub mod legacy;
pub mod virtio;

use vmm_sys_util::eventfd::EventFd;

/// An interrupt line: an eventfd that KVM delivers as an IRQ once registered with irqfd.
pub struct IrqLine(pub EventFd);

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
