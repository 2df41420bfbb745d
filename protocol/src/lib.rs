//! What the vmrun host and guest programs must agree on, compiled by both sides so they cannot
//! drift: the status port encoding and the kernel command-line keys vmrun owns.
//! (The agent wire protocol joins this crate with the agent.)

pub mod cmdline;
pub mod status;
