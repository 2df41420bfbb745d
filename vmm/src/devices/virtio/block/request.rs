//! One virtio-blk request: header (readable, 16 bytes), data, status byte (the last writable
//! byte). Everything here is guest-controlled and checked.

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;

use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::{ByteValued, GuestMemoryMmap};

use super::{Disk, SECTOR_SIZE};

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
/// Largest data transfer one request may ask for (Linux sends at most max_sectors, 1 MiB here).
pub const MAX_TRANSFER: usize = 4 << 20;
/// Bounce buffer for moving data between the file and guest memory.
const CHUNK: usize = 64 << 10;

#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct RequestHeader {
    pub type_: u32,
    pub reserved: u32,
    pub sector: u64,
}

// SAFETY: plain old data of three integers with no padding; any byte pattern is valid.
unsafe impl ByteValued for RequestHeader {}

type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

/// Runs the request and returns the used length (bytes written into the chain).
pub fn execute(chain: Chain<'_>, mem: &GuestMemoryMmap, disk: &mut Disk) -> u32 {
    let m = disk.metrics.clone();
    let invalid = || {
        m.invalid.fetch_add(1, Ordering::Relaxed);
    };
    let reader = Reader::new(mem, chain.clone());
    let writer = Writer::new(mem, chain);
    let (mut reader, mut writer) = match (reader, writer) {
        (Ok(r), Ok(w)) => (r, w),
        _ => {
            // A descriptor outside guest memory (or lengths that overflow): nothing can be
            // answered safely.
            invalid();
            return 0;
        }
    };
    let total_w = writer.available_bytes();
    if total_w == 0 {
        invalid();
        return 0;
    }
    // The status byte is the last writable byte; everything before it is data.
    let mut status_w = match writer.split_at(total_w - 1) {
        Ok(s) => s,
        Err(_) => {
            invalid();
            return 0;
        }
    };
    let mut finish = |status: u8, data_len: usize| -> u32 {
        if status_w.write_all(&[status]).is_err() {
            invalid();
            return 0;
        }
        (data_len + 1) as u32
    };
    let hdr: RequestHeader = match reader.read_obj() {
        Ok(h) => h,
        Err(_) => {
            invalid();
            return finish(S_IOERR, 0);
        }
    };
    match hdr.type_ {
        T_IN => {
            let len = writer.available_bytes();
            match check_range(disk, hdr.sector, len) {
                Some(off) => match copy_file_to_guest(disk, off, len, &mut writer) {
                    Ok(()) => {
                        disk.metrics.reads.fetch_add(1, Ordering::Relaxed);
                        finish(S_OK, len)
                    }
                    Err(e) => {
                        log::warn!("virtio-blk: read at sector {}: {e}", hdr.sector);
                        disk.metrics.io_errors.fetch_add(1, Ordering::Relaxed);
                        finish(S_IOERR, 0)
                    }
                },
                None => {
                    invalid();
                    finish(S_IOERR, 0)
                }
            }
        }
        T_OUT => {
            let len = reader.available_bytes();
            if disk.read_only {
                invalid();
                return finish(S_IOERR, 0);
            }
            match check_range(disk, hdr.sector, len) {
                Some(off) => match copy_guest_to_file(disk, off, len, &mut reader) {
                    Ok(()) => {
                        disk.metrics.writes.fetch_add(1, Ordering::Relaxed);
                        finish(S_OK, 0)
                    }
                    Err(e) => {
                        log::warn!("virtio-blk: write at sector {}: {e}", hdr.sector);
                        disk.metrics.io_errors.fetch_add(1, Ordering::Relaxed);
                        finish(S_IOERR, 0)
                    }
                },
                None => {
                    invalid();
                    finish(S_IOERR, 0)
                }
            }
        }
        T_FLUSH => {
            disk.metrics.flushes.fetch_add(1, Ordering::Relaxed);
            if disk.read_only {
                return finish(S_OK, 0);
            }
            match disk.file.sync_data() {
                Ok(()) => finish(S_OK, 0),
                Err(e) => {
                    log::warn!("virtio-blk: flush: {e}");
                    disk.metrics.io_errors.fetch_add(1, Ordering::Relaxed);
                    finish(S_IOERR, 0)
                }
            }
        }
        T_GET_ID => {
            let n = writer.available_bytes().min(disk.id.len());
            if writer.write_all(&disk.id[..n]).is_err() {
                invalid();
                return finish(S_IOERR, 0);
            }
            finish(S_OK, n)
        }
        _ => {
            invalid();
            finish(S_UNSUPP, 0)
        }
    }
}

/// The byte offset for a transfer of `len` bytes at `sector`, if it is whole sectors, not too
/// large and inside the disk.
fn check_range(disk: &Disk, sector: u64, len: usize) -> Option<u64> {
    if !len.is_multiple_of(SECTOR_SIZE as usize) || len > MAX_TRANSFER {
        return None;
    }
    let end = sector.checked_add(len as u64 / SECTOR_SIZE)?;
    // Lazily, and checked: a sector past the disk may be any u64 (found by the fuzzer).
    if end > disk.sectors {
        return None;
    }
    sector.checked_mul(SECTOR_SIZE)
}

fn copy_file_to_guest(
    disk: &Disk,
    mut off: u64,
    mut len: usize,
    w: &mut Writer<'_>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK.min(len)];
    while len > 0 {
        let n = len.min(buf.len());
        disk.file.read_exact_at(&mut buf[..n], off)?;
        w.write_all(&buf[..n])?;
        off += n as u64;
        len -= n;
    }
    Ok(())
}

fn copy_guest_to_file(
    disk: &Disk,
    mut off: u64,
    mut len: usize,
    r: &mut Reader<'_>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK.min(len)];
    while len > 0 {
        let n = len.min(buf.len());
        r.read_exact(&mut buf[..n])?;
        disk.file.write_all_at(&buf[..n], off)?;
        off += n as u64;
        len -= n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the virtio_block fuzz target: a sector number so large that its byte offset
    /// overflows was multiplied before the range check refused it (a panic in debug builds).
    #[test]
    fn a_huge_sector_is_refused_not_overflowed() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(64 * SECTOR_SIZE).unwrap();
        let disk = Disk::open(f.path(), false).unwrap();
        assert_eq!(check_range(&disk, u64::MAX / 2, 0), None);
        assert_eq!(check_range(&disk, u64::MAX, 512), None);
        assert_eq!(check_range(&disk, 0, 512), Some(0));
        assert_eq!(check_range(&disk, 63, 512), Some(63 * SECTOR_SIZE));
        assert_eq!(check_range(&disk, 64, 512), None);
        assert_eq!(check_range(&disk, 0, 100), None);
    }
}
