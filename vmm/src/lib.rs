//! vmrun: a microVM launcher on KVM.
//!
//! The crate is both the library that harnesses use and the `vmrun` binary. The VMM itself runs
//! as its own process, one per VM; see DESIGN.md.

pub mod api;
pub mod arch;
pub mod bench;
pub mod builder;
pub mod cli;
pub mod cli_vm;
pub mod cmdline;
pub mod compat;
pub mod devices;
pub mod doctor;
pub mod images;
pub mod launch;
pub mod overlay;
pub mod testguest;
pub mod vstate;
