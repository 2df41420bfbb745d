//! VM, vCPU and guest-memory state, the buses that route exits, and how a VM's end is
//! recorded. Nothing here knows a device: devices plug into the buses through `BusDevice`.

pub mod bus;
pub mod exit;
pub mod memory;
pub mod stats;
pub mod vcpu;
pub mod vm;

pub use exit::{ExitReason, ExitState};
