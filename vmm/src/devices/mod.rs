//! Emulated devices and the buses that route guest PIO/MMIO exits to them.

pub mod bus;
pub mod legacy;
pub mod virtio;

pub use bus::{Bus, BusDevice};

use vmm_sys_util::eventfd::EventFd;

/// An interrupt line: an eventfd that KVM delivers as an IRQ once registered with irqfd.
pub struct IrqLine(pub EventFd);

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
