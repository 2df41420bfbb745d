//! vmrun: a microVM launcher on KVM.
//!
//! The public surface is [`api`]: start VMs ([`api::vm::Vm`]), run commands, move files and
//! capture what the guest wrote. The VMM itself runs as its own process, one per VM (the
//! `vmrun` binary, which this crate also builds); see DESIGN.md. The other modules are the
//! VMM's internals, public only for that binary and for the crate's own integration tests.

pub mod api;

#[doc(hidden)]
pub mod arch;
#[doc(hidden)]
pub mod boot;
#[doc(hidden)]
pub mod builder;
#[doc(hidden)]
pub mod config;
#[doc(hidden)]
pub mod control;
#[doc(hidden)]
pub mod devices;
#[doc(hidden)]
pub mod host;
#[doc(hidden)]
pub mod jail;
#[doc(hidden)]
pub mod launch;
#[doc(hidden)]
pub mod outcome;
#[doc(hidden)]
pub mod runtime;
#[doc(hidden)]
pub mod seccomp;
#[doc(hidden)]
pub mod snapshot;
#[doc(hidden)]
pub mod vstate;
