//! KVM's binary statistics for this VM and its vCPUs (`KVM_GET_STATS_FD`, Linux 5.14+). The
//! VMM opens one stats file per VM and per vCPU at start and keeps them open: KVM refuses its
//! ioctls from any process but the VM's creator, yet a stats file, once open, can be read from
//! outside (`host::kvmstats`, used by `vmrun profile`) without the VMM's help.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

// KVM_GET_STATS_FD = _IO(KVMIO, 0xce); kvm-ioctls 0.25 does not wrap it.
ioctl_io_nr!(KVM_GET_STATS_FD, kvm_bindings::KVMIO, 0xce);

/// A stats file for a KVM VM or vCPU descriptor; `None` where the kernel has none (the VM runs
/// the same without).
pub fn open(kvm_fd: &impl AsRawFd) -> Option<File> {
    // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd or -1; `kvm_fd` is a
    // KVM VM or vCPU descriptor of this process.
    let fd = unsafe { ioctl(kvm_fd, KVM_GET_STATS_FD()) };
    if fd < 0 {
        log::debug!("no KVM statistics: {}", std::io::Error::last_os_error());
        return None;
    }
    // SAFETY: the ioctl returned a fresh descriptor that nothing else owns.
    Some(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}
