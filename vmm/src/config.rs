//! What the VMM builds a VM from: fully resolved, no defaults left to pick and nothing read
//! from the environment. `launch` turns what a user asks for into this.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

use crate::arch::x86_64::gdt::CpuMode;
use crate::devices::legacy::serial::ConsoleSink;

/// Entry protocol for ELF kernels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum BootProtocol {
    /// PVH when the kernel has the PVH note, else the 64-bit Linux boot protocol.
    #[default]
    Auto,
    Pvh,
    Linux64,
}

impl BootProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            BootProtocol::Auto => "auto",
            BootProtocol::Pvh => "pvh",
            BootProtocol::Linux64 => "linux64",
        }
    }
}

impl std::str::FromStr for BootProtocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(BootProtocol::Auto),
            "pvh" => Ok(BootProtocol::Pvh),
            "linux64" => Ok(BootProtocol::Linux64),
            _ => Err(format!("{s:?}: use auto, pvh or linux64")),
        }
    }
}

impl std::fmt::Display for BootProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the VM runs.
#[derive(Clone, Debug)]
pub enum Payload {
    Linux {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
        protocol: BootProtocol,
    },
    /// Raw machine code loaded at `layout::PROGRAM_START`; every vCPU starts there. Test
    /// programs also get the probe port and window.
    Program { code: Vec<u8>, mode: CpuMode },
}

/// A disk attached as virtio-blk; the first is /dev/vda in the guest, then /dev/vdb, ...
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
}

/// The vsock device: the guest's CID and the host Unix socket (hybrid vsock).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    pub cid: u64,
    pub uds_path: PathBuf,
}

/// The guest CID vmrun gives a VM unless told otherwise (the first one not reserved).
pub const DEFAULT_CID: u64 = 3;

pub struct VmConfig {
    pub payload: Payload,
    pub mem_mib: u64,
    pub vcpus: u8,
    pub console: ConsoleSink,
    pub disks: Vec<DiskConfig>,
    pub vsock: Option<VsockConfig>,
    /// Wire the probe port and window (`layout::PROBE_PORT`, `PROBE_MMIO`): test programs
    /// only, never a Linux guest.
    pub probes: bool,
    /// Hide KVM's paravirtual features that make the guest issue `vmcall`: where guest ring 0
    /// is emulated (the PVM compatibility variant), a `vmcall` from it livelocks the vCPU.
    pub hide_pv_hypercalls: bool,
    /// The seccomp filters each VMM thread installs on itself (`None`: no filtering).
    pub seccomp: Option<std::sync::Arc<crate::seccomp::Filters>>,
    /// The jail's user: the VMM drops to it before its first thread starts (`None`: it keeps
    /// running as it was started).
    pub run_as: Option<crate::jail::User>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_protocol_names_round_trip() {
        for p in [BootProtocol::Auto, BootProtocol::Pvh, BootProtocol::Linux64] {
            assert_eq!(p.as_str().parse::<BootProtocol>(), Ok(p));
        }
        assert!("elf"
            .parse::<BootProtocol>()
            .unwrap_err()
            .contains("auto, pvh or linux64"));
    }
}
