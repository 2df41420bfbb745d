//! What the library offers harnesses: [`vm::Vm`] (a VM as a value, started with
//! [`builder::VmBuilder`] or attached by name) and the agent client it is built on. The option
//! and protocol types a harness needs are re-exported here.

pub mod agent;
pub mod builder;
mod copy;
pub mod vm;

pub use crate::config::{BootProtocol, DiskConfig};
pub use crate::host::compat::Compat;
pub use crate::launch::overlay::Overlay;
pub use crate::launch::{JailUser, Rootfs, VmOptions, DEFAULT_MEMORY_MIB, DEFAULT_MEMORY_MIB_PVM};
pub use builder::{Phase, VmBuilder};
pub use vm::{Vm, VmError};
pub use vmrun_protocol::agent::{ErrorInfo, ErrorKind, Exec, ExitStatus, FileKind, StatInfo};
