//! Guest RAM: anonymous mappings split around the MMIO gap and registered with KVM.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use thiserror::Error;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::layout::ram_ranges;

#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("cannot allocate {mib} MiB of guest memory: {source}")]
    Allocate {
        mib: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("guest memory size {0} bytes does not fit this host's address space")]
    TooLarge(u64),
    #[error("KVM refused guest memory region {slot}: {source}")]
    Register {
        slot: u32,
        source: kvm_ioctls::Error,
    },
}

/// What guest RAM is called in `/proc/PID/maps` (and smaps, pmap): `[anon:vmrun-guest-ram]`.
pub const ANON_NAME: &std::ffi::CStr = c"vmrun-guest-ram";

pub fn create(mem_size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges = ram_ranges(mem_size)
        .into_iter()
        .map(|(start, len)| {
            Ok((
                GuestAddress(start),
                usize::try_from(len).map_err(|_| MemoryError::TooLarge(mem_size))?,
            ))
        })
        .collect::<Result<Vec<_>, MemoryError>>()?;
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Allocate {
        mib: mem_size >> 20,
        source,
    })?;
    for region in mem.iter() {
        if let Ok(host) = region.get_host_address(vm_memory::MemoryRegionAddress(0)) {
            // SAFETY: prctl(PR_SET_VMA_ANON_NAME) on a mapping `mem` owns, of the region's
            // length, with a NUL-terminated name that outlives the call. It only labels the
            // mapping (and keeps the kernel from merging it with its neighbours); a kernel
            // without CONFIG_ANON_VMA_NAME refuses it, which is harmless.
            unsafe {
                libc::prctl(
                    libc::PR_SET_VMA,
                    libc::PR_SET_VMA_ANON_NAME,
                    host as libc::c_ulong,
                    region.len() as libc::c_ulong,
                    ANON_NAME.as_ptr(),
                )
            };
        }
    }
    Ok(mem)
}

pub fn register(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| MemoryError::TooLarge(region.len()))?;
        let r = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, of exactly `memory_size` bytes, and
        // the caller keeps `mem` alive for as long as the VM exists.
        unsafe { vm.set_user_memory_region(r) }
            .map_err(|source| MemoryError::Register { slot, source })?;
    }
    Ok(())
}
