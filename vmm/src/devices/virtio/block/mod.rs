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
