//! What the library offers harnesses: the agent client (the VM-level API builds on it).

pub mod agent;
pub mod vm;
