//! x86_64 boot: memory layout, boot protocol structures and initial vCPU state.

pub mod boot_params;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod paging;
pub mod regs;
pub mod vcpu_state;
