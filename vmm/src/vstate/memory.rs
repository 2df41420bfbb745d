//! Guest RAM: anonymous mappings split around the MMIO gap and registered with KVM.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use std::fs::File;
use std::os::unix::fs::FileExt;
use thiserror::Error;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion, GuestRegionMmap,
};

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
    #[error("cannot write guest memory to the snapshot: {0}")]
    Dump(std::io::Error),
    #[error("the snapshot's memory file holds {have} bytes, the VM needs {want}: it is truncated or not this snapshot's; take the snapshot again")]
    FileSize { have: u64, want: u64 },
    #[error("cannot map the snapshot's memory file: {0}")]
    MapFile(String),
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

/// Bytes compared at a time when a dump looks for pages it can leave as holes.
const PAGE: usize = 4096;
/// Bytes copied out of guest memory per step of a dump.
const DUMP_CHUNK: usize = 1 << 20;

/// Writes guest RAM to `file`, region after region from offset 0, leaving all-zero pages as
/// holes: a guest that has touched little of its memory makes a small file, and the holes read
/// back as zeros. The vCPUs and devices must be stopped.
pub fn dump(mem: &GuestMemoryMmap, file: &File) -> Result<u64, MemoryError> {
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    file.set_len(total).map_err(MemoryError::Dump)?;
    let mut buf = vec![0u8; DUMP_CHUNK];
    let mut offset = 0u64;
    for region in mem.iter() {
        let mut done = 0u64;
        while done < region.len() {
            let n = (region.len() - done).min(DUMP_CHUNK as u64) as usize;
            let chunk = &mut buf[..n];
            mem.read_slice(chunk, region.start_addr().unchecked_add(done))
                .map_err(|e| MemoryError::Dump(std::io::Error::other(e.to_string())))?;
            for (i, page) in chunk.chunks(PAGE).enumerate() {
                if !is_zero(page) {
                    file.write_all_at(page, offset + done + (i * PAGE) as u64)
                        .map_err(MemoryError::Dump)?;
                }
            }
            done += n as u64;
        }
        offset += region.len();
    }
    Ok(total)
}

/// Whether a page holds only zeros (compared a u64 at a time: fast enough unoptimised too).
fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: every bit pattern is a valid u64; align_to only reinterprets the aligned
        // middle of the slice.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && tail.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0)
}

/// Guest RAM of `mem_size` bytes mapped privately from a dump made by [`dump`]: pages are read
/// from the file when first touched and copied when first written, so nothing is read up front
/// and VMs restored from one file share its unwritten pages through the page cache.
pub fn map_file(mem_size: u64, file: &File) -> Result<GuestMemoryMmap, MemoryError> {
    let have = file
        .metadata()
        .map_err(|e| MemoryError::MapFile(e.to_string()))?
        .len();
    let ranges = ram_ranges(mem_size);
    let want: u64 = ranges.iter().map(|r| r.1).sum();
    if have != want {
        return Err(MemoryError::FileSize { have, want });
    }
    let mut regions = Vec::with_capacity(ranges.len());
    let mut offset = 0u64;
    for (start, len) in ranges {
        let size = usize::try_from(len).map_err(|_| MemoryError::TooLarge(mem_size))?;
        let fd = file
            .try_clone()
            .map_err(|e| MemoryError::MapFile(e.to_string()))?;
        let mapping = MmapRegionBuilder::new(size)
            .with_file_offset(FileOffset::new(fd, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| MemoryError::MapFile(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| MemoryError::MapFile(format!("region at {start:#x} overflows")))?;
        regions.push(region);
        offset += len;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::MapFile(e.to_string()))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_dump_maps_back_privately_with_holes_for_zero_pages() {
        let size = 16u64 << 20;
        let mem = create(size).unwrap();
        mem.write_slice(b"first page", GuestAddress(0)).unwrap();
        mem.write_slice(b"far away", GuestAddress(size - 4096))
            .unwrap();
        let f = tempfile::tempfile().unwrap();
        assert_eq!(dump(&mem, &f).unwrap(), size);
        let m = f.metadata().unwrap();
        assert_eq!(m.len(), size);
        assert!(
            m.blocks() * 512 <= 64 << 10,
            "{} bytes on disk",
            m.blocks() * 512
        );

        let back = map_file(size, &f).unwrap();
        let mut buf = [0u8; 10];
        back.read_slice(&mut buf, GuestAddress(0)).unwrap();
        assert_eq!(&buf, b"first page");
        back.read_slice(&mut buf[..8], GuestAddress(size - 4096))
            .unwrap();
        assert_eq!(&buf[..8], b"far away");
        // Copy-on-write: a write to the mapping never reaches the file.
        back.write_slice(b"changed", GuestAddress(0)).unwrap();
        let mut on_disk = [0u8; 10];
        f.read_exact_at(&mut on_disk, 0).unwrap();
        assert_eq!(&on_disk, b"first page");
        // A file of another size is refused.
        assert!(matches!(
            map_file(size * 2, &f),
            Err(MemoryError::FileSize { .. })
        ));
    }

    #[test]
    fn zero_pages_are_found_whatever_their_alignment() {
        let mut v = vec![0u8; 4097];
        assert!(is_zero(&v[1..]));
        v[4096] = 1;
        assert!(!is_zero(&v[1..]));
        assert!(is_zero(&v[..4096]));
    }
}
