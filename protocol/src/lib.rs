//! What the vmrun host and guest programs must agree on, compiled by both sides so they cannot
//! drift: the status port encoding, the kernel command-line keys vmrun owns, and the agent wire
//! protocol.

pub mod agent;
pub mod cmdline;
pub mod status;
