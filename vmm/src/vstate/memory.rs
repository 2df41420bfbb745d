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
///
/// Pages the guest never touched are not read at all: the kernel's page map tells which pages
/// are backed by a page of this VM's own (anonymous, or swapped out). In a cold-booted VM the
/// others are zero; in a VM restored from `source` (the memory file it was mapped from) they
/// still hold the file's bytes, which are copied file to file, holes kept. Reading everything
/// took most of a minute for 256 MiB where the host CPU is emulated. Without a page map (a
/// kernel that hides it), every page is read.
pub fn dump(mem: &GuestMemoryMmap, file: &File, source: Option<&File>) -> Result<u64, MemoryError> {
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    file.set_len(total).map_err(MemoryError::Dump)?;
    let pagemap = File::open("/proc/self/pagemap").ok();
    let mut buf = vec![0u8; DUMP_CHUNK];
    let mut entries = vec![0u8; DUMP_CHUNK / PAGE * 8];
    let mut offset = 0u64;
    let (mut read, mut copied) = (0u64, 0u64);
    for region in mem.iter() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| MemoryError::Dump(std::io::Error::other(e.to_string())))?
            as u64;
        let mut done = 0u64;
        while done < region.len() {
            let n = (region.len() - done).min(DUMP_CHUNK as u64) as usize;
            let pages = n.div_ceil(PAGE);
            let kinds = page_kinds(pagemap.as_ref(), host + done, &mut entries[..pages * 8]);
            // Without a page map every page counts as the guest's own.
            let own_page = |p: usize| kinds.as_ref().is_none_or(|k| k[p]);
            let mut i = 0;
            while i < pages {
                // A run of pages of one kind: [i, j).
                let own = own_page(i);
                let mut j = i + 1;
                while j < pages && own_page(j) == own {
                    j += 1;
                }
                let at = done + (i * PAGE) as u64;
                let len = ((j - i) * PAGE).min(n - i * PAGE);
                if own {
                    read += len as u64;
                    let chunk = &mut buf[..len];
                    mem.read_slice(chunk, region.start_addr().unchecked_add(at))
                        .map_err(|e| MemoryError::Dump(std::io::Error::other(e.to_string())))?;
                    for (k, page) in chunk.chunks(PAGE).enumerate() {
                        if !is_zero(page) {
                            file.write_all_at(page, offset + at + (k * PAGE) as u64)
                                .map_err(MemoryError::Dump)?;
                        }
                    }
                } else if let Some(src) = source {
                    copied += len as u64;
                    copy_data(src, file, offset + at, len as u64).map_err(MemoryError::Dump)?;
                }
                i = j;
            }
            done += n as u64;
        }
        offset += region.len();
    }
    log::info!(
        "memory dump: {} MiB read from the guest, {} MiB copied from the source snapshot, the rest of {} MiB never touched",
        read >> 20,
        copied >> 20,
        total >> 20
    );
    Ok(total)
}

/// Page map bits (Documentation/admin-guide/mm/pagemap.rst).
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE_OR_SHARED: u64 = 1 << 61;

/// For each page from host address `addr`, whether it is backed by a page of this process's
/// own (anonymous and present, or swapped out): the pages whose bytes can differ from what
/// the mapping started with. `None` when the page map cannot be read.
fn page_kinds(pagemap: Option<&File>, addr: u64, entries: &mut [u8]) -> Option<Vec<bool>> {
    let pm = pagemap?;
    pm.read_exact_at(entries, addr / PAGE as u64 * 8).ok()?;
    Some(
        entries
            .chunks_exact(8)
            .map(|e| {
                let v = u64::from_le_bytes(e.try_into().unwrap_or([0xff; 8]));
                v & PM_SWAPPED != 0 || (v & PM_PRESENT != 0 && v & PM_FILE_OR_SHARED == 0)
            })
            .collect(),
    )
}

/// Copies the data of `src` in [off, off + len) to the same offsets of `dst`, leaving its
/// holes as holes (`SEEK_DATA`/`SEEK_HOLE`, then `copy_file_range`).
fn copy_data(src: &File, dst: &File, off: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let end = off + len;
    let mut at = off;
    while at < end {
        // SAFETY: lseek on a descriptor this function borrows; no memory is involved.
        let data = unsafe { libc::lseek(src.as_raw_fd(), at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            // ENXIO: no data after `at`; the rest is a hole.
            return if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(())
            } else {
                Err(e)
            };
        }
        let data = data as u64;
        if data >= end {
            return Ok(());
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(src.as_raw_fd(), data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stop = (hole as u64).min(end);
        let mut from = data as libc::loff_t;
        let mut to = data as libc::loff_t;
        while (from as u64) < stop {
            // SAFETY: both offsets point at locals this call updates; the descriptors are
            // borrowed and stay open for the call.
            let n = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut from,
                    dst.as_raw_fd(),
                    &mut to,
                    (stop - from as u64) as usize,
                    0,
                )
            };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if n == 0 {
                return Err(std::io::Error::other("the source memory file ended early"));
            }
        }
        at = stop;
    }
    Ok(())
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
        assert_eq!(dump(&mem, &f, None).unwrap(), size);
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
    fn a_restored_vm_dumps_its_own_writes_and_the_rest_from_its_source() {
        let size = 16u64 << 20;
        let mem = create(size).unwrap();
        mem.write_slice(b"kept", GuestAddress(8192)).unwrap();
        mem.write_slice(b"far away", GuestAddress(size - 4096))
            .unwrap();
        let first = tempfile::tempfile().unwrap();
        dump(&mem, &first, None).unwrap();

        let restored = map_file(size, &first).unwrap();
        // One page rewritten, one read (a file page now mapped), one written where there was
        // a hole, one rewritten to zeros.
        restored.write_slice(b"new", GuestAddress(0)).unwrap();
        let mut buf = [0u8; 4];
        restored.read_slice(&mut buf, GuestAddress(8192)).unwrap();
        restored
            .write_slice(b"hole", GuestAddress(1 << 20))
            .unwrap();
        restored
            .write_slice(&[0u8; 8], GuestAddress(size - 4096))
            .unwrap();
        let second = tempfile::tempfile().unwrap();
        assert_eq!(dump(&restored, &second, Some(&first)).unwrap(), size);

        let back = map_file(size, &second).unwrap();
        let read = |at: u64, n: usize| {
            let mut v = vec![0u8; n];
            back.read_slice(&mut v, GuestAddress(at)).unwrap();
            v
        };
        assert_eq!(read(0, 3), b"new");
        assert_eq!(read(8192, 4), b"kept");
        assert_eq!(read(1 << 20, 4), b"hole");
        assert_eq!(read(size - 4096, 8), [0u8; 8]);
        let m = second.metadata().unwrap();
        assert!(
            m.blocks() * 512 <= 64 << 10,
            "{} bytes on disk",
            m.blocks() * 512
        );
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
