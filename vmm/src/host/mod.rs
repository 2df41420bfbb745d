//! What vmrun learns about the host by running guests of its own: whether KVM emulates guest
//! ring 0 (and so which kernel variant a VM needs), from the tiny test programs in `testguest`.

pub mod compat;
pub mod kvmstats;
pub mod pvmnative;
pub mod testguest;
