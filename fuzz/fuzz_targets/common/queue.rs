//! A virtqueue as a hostile driver lays it out, read from the fuzzer's bytes: descriptor
//! table, avail ring heads and the data the descriptors point at, in mock guest memory.

use std::sync::Arc;

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmrun::devices::virtio::Interrupt;

pub const QSIZE: u16 = 16;
/// The mock's avail ring has room for QSIZE / 2 entries before it meets the used ring.
pub const MAX_HEADS: usize = QSIZE as usize / 2;
pub const MEM: u64 = 4 << 20;
pub const DATA: u64 = 0x10_0000;

/// Reads the fuzzer's bytes front to back; missing bytes read as zero.
pub struct Bytes8<'a>(pub &'a [u8]);

impl Bytes8<'_> {
    pub fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    pub fn rest(&mut self) -> &[u8] {
        std::mem::take(&mut self.0)
    }
}

pub struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// One descriptor: mostly inside the data area, sometimes anywhere.
pub fn desc(b: &mut Bytes8) -> Desc {
    let kind = b.u8();
    let raw = b.u32();
    let addr = match kind % 4 {
        0 | 1 => DATA + u64::from(raw % 0x2000),
        2 => u64::from(raw) % (MEM + 0x1000),
        _ => u64::from(raw) << (kind % 32),
    };
    let len = match kind / 4 % 4 {
        0 => u32::from(b.u8()),
        1 => u32::from(b.u16()),
        _ => b.u32(),
    };
    Desc {
        addr,
        len,
        flags: u16::from(b.u8()) | if kind & 0x80 != 0 { 4 } else { 0 },
        next: u16::from(b.u8()) % (QSIZE + 2),
    }
}

/// A queue at `base` with `descs` and `heads`, its data written at DATA by the caller.
pub fn queue<'a>(
    mem: &'a GuestMemoryMmap,
    base: u64,
    descs: &[Desc],
    heads: &[u16],
) -> MockSplitQueue<'a, GuestMemoryMmap> {
    let vq = MockSplitQueue::create(mem, GuestAddress(base), QSIZE);
    for (i, d) in descs.iter().enumerate().take(QSIZE as usize) {
        let _ = vq.desc_table().store(
            i as u16,
            RawDescriptor::from(SplitDescriptor::new(d.addr, d.len, d.flags, d.next)),
        );
    }
    for (i, h) in heads.iter().enumerate() {
        if let Ok(r) = vq.avail().ring().ref_at(i % QSIZE as usize) {
            r.store(*h);
        }
    }
    vq.avail().idx().store(heads.len() as u16);
    vq
}

/// Descriptors and heads for one queue, read from the input.
pub fn layout(b: &mut Bytes8) -> (Vec<Desc>, Vec<u16>) {
    let n = 1 + usize::from(b.u8()) % QSIZE as usize;
    let descs = (0..n).map(|_| desc(b)).collect();
    let h = usize::from(b.u8()) % (MAX_HEADS + 1);
    let heads = (0..h).map(|_| u16::from(b.u8()) % (QSIZE + 4)).collect();
    (descs, heads)
}

pub fn memory(data: &[u8]) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)])
        .expect("4 MiB of mock guest memory");
    let n = data.len().min(0x4000);
    let _ = mem.write_slice(&data[..n], GuestAddress(DATA));
    mem
}

pub fn interrupt() -> Arc<Interrupt> {
    Arc::new(Interrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).expect("an eventfd"),
    ))
}
