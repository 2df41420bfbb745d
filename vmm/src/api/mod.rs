//! What the library offers harnesses: [`vm::Vm`] (a VM as a value) and the agent client it is
//! built on. The protocol types a harness needs are re-exported here.

pub mod agent;
pub mod vm;

pub use crate::config::{BootProtocol, DiskConfig};
pub use crate::host::compat::Compat;
pub use crate::launch::overlay::Overlay;
pub use crate::launch::{Rootfs, VmOptions, DEFAULT_MEMORY_MIB};
pub use vmrun_protocol::agent::{ErrorInfo, ErrorKind, Exec, ExitStatus, FileKind, StatInfo};
