//! Property tests (a bounded fuzzer that runs with `cargo test`): arbitrary descriptor tables,
//! avail rings and packet bytes fed to virtio-blk and virtio-vsock. The devices must return
//! without panicking, never hand back more chains than were offered, and keep serving.
//! `PROPTEST_CASES` raises the case count for a longer run.

use std::sync::Arc;

use proptest::prelude::*;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::block::{Block, Disk};
use super::vsock::Vsock;
use super::{Interrupt, VirtioDevice};

const QSIZE: u16 = 16;
/// The mock's avail ring has room for QSIZE / 2 entries before it runs into the used ring.
const MAX_HEADS: usize = QSIZE as usize / 2;
const MEM: u64 = 4 << 20;
const DATA: u64 = 0x10_0000;

#[derive(Clone, Debug)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn desc() -> impl Strategy<Value = Desc> {
    let addr = prop_oneof![(DATA..DATA + 0x1000u64), (0u64..MEM + 0x1000), any::<u64>(),];
    let len = prop_oneof![0u32..64, 40u32..5000, any::<u32>()];
    // NEXT and WRITE in any combination; INDIRECT now and then.
    let flags = prop_oneof![0u16..4, Just(4u16), any::<u16>()];
    (addr, len, flags, 0u16..QSIZE + 2).prop_map(|(addr, len, flags, next)| Desc {
        addr,
        len,
        flags,
        next,
    })
}

fn setup_queue<'a>(
    mem: &'a GuestMemoryMmap,
    base: u64,
    descs: &[Desc],
    heads: &[u16],
) -> MockSplitQueue<'a, GuestMemoryMmap> {
    let vq = MockSplitQueue::create(mem, GuestAddress(base), QSIZE);
    for (i, d) in descs.iter().enumerate().take(QSIZE as usize) {
        vq.desc_table()
            .store(
                i as u16,
                RawDescriptor::from(SplitDescriptor::new(d.addr, d.len, d.flags, d.next)),
            )
            .unwrap();
    }
    for (i, h) in heads.iter().enumerate() {
        vq.avail()
            .ring()
            .ref_at(i % QSIZE as usize)
            .unwrap()
            .store(*h);
    }
    vq.avail().idx().store(heads.len() as u16);
    vq
}

fn interrupt() -> Arc<Interrupt> {
    Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn block_survives_arbitrary_chains(
        descs in proptest::collection::vec(desc(), 1..QSIZE as usize),
        heads in proptest::collection::vec(0u16..QSIZE + 4, 0..MAX_HEADS),
        bytes in proptest::collection::vec(any::<u8>(), 0..4096),
        read_only in any::<bool>(),
    ) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
        mem.write_slice(&bytes, GuestAddress(DATA)).unwrap();
        let vq = setup_queue(&mem, 0, &descs, &heads);
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(64 * 512).unwrap();
        let mut b = Block::new(Disk::open(file.path(), read_only).unwrap(), interrupt());
        let q: Queue = vq.create_queue().unwrap();
        b.activate(mem.clone(), vec![q], 0).unwrap();
        b.process_queue(0);
        prop_assert!(vq.used().idx().load() <= heads.len() as u16);
        // Still serving afterwards.
        b.process_queue(0);
    }

    #[test]
    fn vsock_survives_arbitrary_chains(
        tx_descs in proptest::collection::vec(desc(), 1..QSIZE as usize),
        tx_heads in proptest::collection::vec(0u16..QSIZE + 4, 0..MAX_HEADS),
        rx_descs in proptest::collection::vec(desc(), 1..QSIZE as usize),
        rx_heads in proptest::collection::vec(0u16..QSIZE + 4, 0..MAX_HEADS),
        bytes in proptest::collection::vec(any::<u8>(), 0..4096),
        cid_ok in any::<bool>(),
    ) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
        // Bias the packet bytes towards plausible headers: our CIDs, stream type.
        let mut bytes = bytes;
        if cid_ok && bytes.len() >= 44 {
            bytes[0..8].copy_from_slice(&3u64.to_le_bytes());
            bytes[8..16].copy_from_slice(&2u64.to_le_bytes());
            bytes[28..30].copy_from_slice(&1u16.to_le_bytes());
        }
        mem.write_slice(&bytes, GuestAddress(DATA)).unwrap();
        let rx = setup_queue(&mem, 0, &rx_descs, &rx_heads);
        let tx = setup_queue(&mem, 0x8000, &tx_descs, &tx_heads);
        let ev = MockSplitQueue::create(&mem, GuestAddress(0x10000), QSIZE);
        let dir = tempfile::tempdir().unwrap();
        let mut v = Vsock::new(3, &dir.path().join("v.sock"), interrupt()).unwrap();
        v.activate(mem.clone(), vec![rx.create_queue().unwrap(), tx.create_queue().unwrap(), ev.create_queue().unwrap()], 0).unwrap();
        v.process_queue(1);
        v.process_queue(0);
        prop_assert!(tx.used().idx().load() <= tx_heads.len() as u16);
        prop_assert!(rx.used().idx().load() <= rx_heads.len() as u16);
    }
}
