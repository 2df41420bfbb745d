//! virtio-blk over a host file: IN, OUT, FLUSH, GET_ID. A read-only disk is opened O_RDONLY,
//! offers VIRTIO_BLK_F_RO and fails writes; a writable disk flushes on FLUSH and when dropped.
//! Requests are parsed from guest-controlled descriptor chains: every malformed request is
//! answered with an error status (or dropped when it has nowhere to put one) and counted.

pub mod request;

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use thiserror::Error;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{ActivateError, Interrupt, VirtioDevice, INT_VRING, TYPE_BLOCK};
use request::execute;

pub const F_RO: u64 = 1 << 5;
pub const F_FLUSH: u64 = 1 << 9;
pub const SECTOR_SIZE: u64 = 512;
const QUEUE_SIZE: u16 = 256;

#[derive(Debug, Error)]
pub enum BlockError {
    #[error("disk {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk {path}: {size} bytes is not a whole number of 512-byte sectors")]
    Size { path: PathBuf, size: u64 },
}

/// Counters a test or an operator can read; guest misbehaviour shows up here, never as a panic.
#[derive(Default, Debug)]
pub struct BlockMetrics {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub invalid: AtomicU64,
    pub io_errors: AtomicU64,
}

/// The backing file and what the requests may do with it.
pub struct Disk {
    pub file: File,
    pub read_only: bool,
    pub sectors: u64,
    pub id: [u8; 20],
    pub metrics: Arc<BlockMetrics>,
}

impl Disk {
    pub fn open(path: &Path, read_only: bool) -> Result<Disk, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.into(),
                source,
            })?;
        let size = file
            .metadata()
            .map_err(|source| BlockError::Open {
                path: path.into(),
                source,
            })?
            .len();
        if !size.is_multiple_of(SECTOR_SIZE) {
            return Err(BlockError::Size {
                path: path.into(),
                size,
            });
        }
        let mut id = [0u8; 20];
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let n = name.len().min(20);
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        Ok(Disk {
            file,
            read_only,
            sectors: size / SECTOR_SIZE,
            id,
            metrics: Arc::default(),
        })
    }
}

pub struct Block {
    disk: Disk,
    interrupt: Arc<Interrupt>,
    mem: Option<GuestMemoryMmap>,
    queue: Option<Queue>,
}

impl Block {
    pub fn new(disk: Disk, interrupt: Arc<Interrupt>) -> Self {
        Block {
            disk,
            interrupt,
            mem: None,
            queue: None,
        }
    }

    pub fn metrics(&self) -> Arc<BlockMetrics> {
        self.disk.metrics.clone()
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        F_FLUSH | if self.disk.read_only { F_RO } else { 0 }
    }

    fn config(&self) -> Vec<u8> {
        // struct virtio_blk_config: capacity (in 512-byte sectors) first; the rest is only read
        // for features vmrun does not offer.
        self.disk.sectors.to_le_bytes().to_vec()
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        mut queues: Vec<Queue>,
        _features: u64,
    ) -> Result<(), ActivateError> {
        if queues.len() != 1 {
            return Err(ActivateError::QueueCount {
                want: 1,
                got: queues.len(),
            });
        }
        self.queue = queues.pop();
        self.mem = Some(mem);
        Ok(())
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.queue.iter().map(|q| q.state()).collect()
    }

    fn reset(&mut self) {
        self.queue = None;
        self.mem = None;
    }

    fn process_queue(&mut self, index: usize) {
        let (Some(mem), Some(queue)) = (self.mem.as_ref(), self.queue.as_mut()) else {
            return;
        };
        if index != 0 {
            return;
        }
        let mut used_any = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = execute(chain, mem, &mut self.disk);
            if let Err(e) = queue.add_used(mem, head, len) {
                self.disk.metrics.invalid.fetch_add(1, Ordering::Relaxed);
                log::warn!("virtio-blk: cannot return descriptor {head}: {e}");
            }
            used_any = true;
        }
        if used_any && queue.needs_notification(mem).unwrap_or(true) {
            self.interrupt.signal(INT_VRING);
        }
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        if !self.disk.read_only {
            if let Err(e) = self.disk.file.sync_all() {
                log::error!("virtio-blk: flush at shutdown failed: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::request::*;
    use super::*;
    use std::io::Write as _;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    const R: u16 = 0;
    const W: u16 = 2; // VRING_DESC_F_WRITE
    const NEXT: u16 = 1;
    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;
    const MEM: usize = 8 << 20;

    struct Harness {
        mem: GuestMemoryMmap,
        file: tempfile::NamedTempFile,
        irq: EventFd,
    }

    impl Harness {
        fn new(sectors: u64) -> Self {
            let mut file = tempfile::NamedTempFile::new().unwrap();
            let content: Vec<u8> = (0..sectors * SECTOR_SIZE)
                .map(|i| (i / SECTOR_SIZE) as u8)
                .collect();
            file.write_all(&content).unwrap();
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
            Harness {
                mem,
                file,
                irq: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            }
        }

        fn header(&self, type_: u32, sector: u64) {
            self.mem
                .write_obj(
                    RequestHeader {
                        type_,
                        reserved: 0,
                        sector,
                    },
                    GuestAddress(HDR),
                )
                .unwrap();
        }

        /// Runs one chain of (addr, len, flags) with explicit next links (index + 1 unless
        /// given) and returns (used len, status byte, metrics).
        fn run(
            &self,
            read_only: bool,
            descs: &[(u64, u32, u16, Option<u16>)],
        ) -> (u32, u8, Arc<BlockMetrics>) {
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let vq = MockSplitQueue::new(&self.mem, 16);
            let raw: Vec<RawDescriptor> = descs
                .iter()
                .enumerate()
                .map(|(i, (a, l, f, n))| {
                    RawDescriptor::from(SplitDescriptor::new(*a, *l, *f, n.unwrap_or(i as u16 + 1)))
                })
                .collect();
            vq.add_desc_chains(&raw, 0).unwrap();
            let q: Queue = vq.create_queue().unwrap();
            let disk = Disk::open(self.file.path(), read_only).unwrap();
            let irq = Arc::new(Interrupt::new(self.irq.try_clone().unwrap()));
            let mut b = Block::new(disk, irq);
            b.activate(self.mem.clone(), vec![q], 0).unwrap();
            b.process_queue(0);
            let used = vq.used().ring().ref_at(0).unwrap().load();
            assert_eq!(vq.used().idx().load(), 1, "the chain is always returned");
            let status: u8 = self.mem.read_obj(GuestAddress(STATUS)).unwrap();
            (used.len(), status, b.metrics())
        }
    }

    fn chain(
        hdr_len: u32,
        data: Option<(u32, u16)>,
        status_len: u32,
    ) -> Vec<(u64, u32, u16, Option<u16>)> {
        let mut v = vec![(HDR, hdr_len, R | NEXT, None)];
        if let Some((len, dir)) = data {
            v.push((DATA, len, dir | NEXT, None));
        }
        v.push((STATUS, status_len, W, None));
        v
    }

    #[test]
    fn read_write_flush_round_trip() {
        let h = Harness::new(64);
        h.header(T_IN, 3);
        let (len, status, m) = h.run(false, &chain(16, Some((1024, W)), 1));
        assert_eq!((len, status), (1025, S_OK));
        let mut got = [0u8; 1024];
        h.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert!(got[..512].iter().all(|b| *b == 3) && got[512..].iter().all(|b| *b == 4));
        assert_eq!(m.reads.load(Ordering::Relaxed), 1);

        h.mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
        h.header(T_OUT, 10);
        let (len, status, _) = h.run(false, &chain(16, Some((512, R)), 1));
        assert_eq!((len, status), (1, S_OK));
        let mut back = [0u8; 512];
        std::fs::File::open(h.file.path())
            .unwrap()
            .read_exact_at(&mut back, 10 * 512)
            .unwrap();
        assert_eq!(back, [0xab; 512]);

        h.header(T_FLUSH, 0);
        let (len, status, m) = h.run(false, &chain(16, None, 1));
        assert_eq!(
            (len, status, m.flushes.load(Ordering::Relaxed)),
            (1, S_OK, 1)
        );
        assert!(h.irq.read().unwrap() >= 1, "the guest is interrupted");
    }

    use std::os::unix::fs::FileExt;

    #[test]
    fn read_only_disk_refuses_writes_and_advertises_ro() {
        let h = Harness::new(8);
        h.mem.write_slice(&[0xcd; 512], GuestAddress(DATA)).unwrap();
        h.header(T_OUT, 1);
        let (len, status, m) = h.run(true, &chain(16, Some((512, R)), 1));
        assert_eq!((len, status), (1, S_IOERR));
        assert_eq!(m.invalid.load(Ordering::Relaxed), 1);
        let mut back = [0u8; 512];
        std::fs::File::open(h.file.path())
            .unwrap()
            .read_exact_at(&mut back, 512)
            .unwrap();
        assert_eq!(back, [1; 512], "file unchanged");
        let d = Disk::open(h.file.path(), true).unwrap();
        let irq = Arc::new(Interrupt::new(EventFd::new(0).unwrap()));
        let b = Block::new(d, irq);
        assert_ne!(b.features() & F_RO, 0);
        assert_eq!(b.config(), 8u64.to_le_bytes());
    }

    #[test]
    fn get_id_and_unknown_type() {
        let h = Harness::new(8);
        h.header(T_GET_ID, 0);
        let (len, status, _) = h.run(true, &chain(16, Some((20, W)), 1));
        assert_eq!((len, status), (21, S_OK));
        let mut id = [0u8; 20];
        h.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        let name = h
            .file
            .path()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .as_bytes();
        assert_eq!(&id[..name.len().min(20)], &name[..name.len().min(20)]);
        h.header(77, 0);
        let (_, status, m) = h.run(true, &chain(16, None, 1));
        assert_eq!((status, m.invalid.load(Ordering::Relaxed)), (S_UNSUPP, 1));
    }

    #[test]
    fn hostile_requests_get_an_error_status_and_are_counted() {
        let h = Harness::new(8);
        // Past the end of the disk.
        h.header(T_IN, 7);
        let (_, status, m) = h.run(false, &chain(16, Some((1024, W)), 1));
        assert_eq!((status, m.invalid.load(Ordering::Relaxed)), (S_IOERR, 1));
        // Sector number that overflows.
        h.header(T_IN, u64::MAX);
        assert_eq!(h.run(false, &chain(16, Some((512, W)), 1)).1, S_IOERR);
        // Not whole sectors.
        h.header(T_OUT, 0);
        assert_eq!(h.run(false, &chain(16, Some((100, R)), 1)).1, S_IOERR);
        // Larger than any request may be.
        h.header(T_IN, 0);
        assert_eq!(
            h.run(false, &chain(16, Some(((MAX_TRANSFER + 512) as u32, W)), 1))
                .1,
            S_IOERR
        );
        // Header shorter than 16 bytes.
        h.header(T_IN, 0);
        let (len, status, m) = h.run(false, &chain(8, Some((512, W)), 1));
        assert_eq!(
            (len, status, m.invalid.load(Ordering::Relaxed)),
            (1, S_IOERR, 1)
        );
        // Wrong direction: data for a read that the device may not write.
        h.header(T_IN, 0);
        let (_, status, _) = h.run(
            false,
            &[
                (HDR, 16, R | NEXT, None),
                (DATA, 512, R | NEXT, None),
                (STATUS, 1, W, None),
            ],
        );
        assert_eq!(
            status, S_OK,
            "a read with no writable data is a zero-length read"
        );
    }

    #[test]
    fn chains_that_cannot_be_answered_are_dropped_and_counted() {
        let h = Harness::new(8);
        h.header(T_IN, 0);
        // Data descriptor outside guest memory.
        let (len, status, m) = h.run(
            false,
            &[
                (HDR, 16, R | NEXT, None),
                (MEM as u64 - 16, 512, W | NEXT, None),
                (STATUS, 1, W, None),
            ],
        );
        assert_eq!(
            (len, status, m.invalid.load(Ordering::Relaxed)),
            (0, 0xff, 1)
        );
        // No writable byte for the status.
        let (len, _, m) = h.run(false, &[(HDR, 16, R, None)]);
        assert_eq!((len, m.invalid.load(Ordering::Relaxed)), (0, 1));
        // Zero-length status descriptor.
        let (len, _, m) = h.run(false, &chain(16, None, 0));
        assert_eq!((len, m.invalid.load(Ordering::Relaxed)), (0, 1));
        // A descriptor loop: the chain ends after the queue size, it does not spin.
        let (_, _, m) = h.run(
            false,
            &[(HDR, 16, R | NEXT, None), (DATA, 512, W | NEXT, Some(1))],
        );
        assert!(m.invalid.load(Ordering::Relaxed) + m.reads.load(Ordering::Relaxed) <= 1);
    }
}
