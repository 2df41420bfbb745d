//! virtio devices over the MMIO transport (virtio 1.x, §4.2): the transport's register file, the
//! interrupt line, and the devices (block; vsock next).

pub mod block;
#[cfg(test)]
mod fuzz;
pub mod mmio;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};

use thiserror::Error;
use virtio_queue::{Queue, QueueState};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Device status bits (§2.1).
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_DEVICE_NEEDS_RESET: u32 = 64;
pub const STATUS_FAILED: u32 = 128;

/// Interrupt status bits of the MMIO transport.
pub const INT_VRING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// Feature bits every vmrun device offers.
pub const F_VERSION_1: u64 = 1 << 32;

/// Device IDs (§5).
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_VSOCK: u32 = 19;

/// The interrupt of one device: a status word the driver reads and acknowledges, and the
/// eventfd KVM turns into the IRQ (irqfd).
pub struct Interrupt {
    status: AtomicU32,
    evt: EventFd,
}

impl Interrupt {
    pub fn new(evt: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            evt,
        }
    }

    pub fn signal(&self, why: u32) {
        self.status.fetch_or(why, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            log::warn!("virtio interrupt: {e}");
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[derive(Debug, Error)]
pub enum ActivateError {
    #[error("queue {0} is not valid in guest memory")]
    BadQueue(usize),
    #[error("the device expects {want} queues, the driver set up {got}")]
    QueueCount { want: usize, got: usize },
}

/// What a device model implements; the transport does the rest.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the count is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    fn features(&self) -> u64;
    /// The config space, fixed for the device's life.
    fn config(&self) -> Vec<u8>;
    /// Takes over the queues once the driver is ready.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        features: u64,
    ) -> Result<(), ActivateError>;
    /// Drops queues and state: the driver wrote status 0.
    fn reset(&mut self);
    /// The queues it took over at activation, for a snapshot.
    fn queue_states(&self) -> Vec<QueueState>;
    /// Called after a restore re-activated it: host-side state (connections, open requests)
    /// did not survive, so the device tells the guest whatever it must.
    fn restored(&mut self) {}
    /// Serves queue `index` after the guest notified it.
    fn process_queue(&mut self, index: usize);
    /// File descriptors of its own the device wants watched (beyond its queues), from start.
    fn initial_fds(&mut self) -> Vec<FdWatch> {
        Vec::new()
    }
    /// Serves an event on one of its own fds (`token` as given in its `FdWatch`).
    fn process_fd(&mut self, _token: u32, _readable: bool, _writable: bool, _hangup: bool) {}
    /// Changes to the watched fds since the last call (connections come and go).
    fn take_fd_changes(&mut self) -> Vec<FdChange> {
        Vec::new()
    }
    /// Called once the changes taken are applied (fds removed may be closed now).
    fn fd_changes_applied(&mut self) {}
}

/// An fd a device wants the event loop to watch, with the token its events come back with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdWatch {
    pub fd: std::os::unix::io::RawFd,
    pub token: u32,
    pub readable: bool,
    pub writable: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FdChange {
    Add(FdWatch),
    Modify(FdWatch),
    Remove(std::os::unix::io::RawFd),
}

/// Device tokens start here; lower ones are queue indexes.
pub const FIRST_DEVICE_TOKEN: u32 = 256;
