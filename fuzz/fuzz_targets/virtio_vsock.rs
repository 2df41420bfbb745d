//! virtio-vsock: a hostile driver's tx chains (packet headers and payloads, which drive the
//! muxer's connection state machine) and rx buffers, through the device. It must never hand
//! back more chains than were offered on either queue.
#![no_main]

#[path = "common/queue.rs"]
mod queue;

use libfuzzer_sys::fuzz_target;
use queue::{interrupt, layout, memory, Bytes8, QSIZE};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::GuestAddress;
use vmrun::devices::virtio::vsock::Vsock;
use vmrun::devices::virtio::VirtioDevice;

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes8(data);
    let plausible = b.u8() & 1 == 1;
    let (tx_descs, tx_heads) = layout(&mut b);
    let (rx_descs, rx_heads) = layout(&mut b);
    let mut bytes = b.rest().to_vec();
    // Half the time, headers the muxer accepts far enough to reach its state machine.
    if plausible && bytes.len() >= 44 {
        bytes[0..8].copy_from_slice(&3u64.to_le_bytes());
        bytes[8..16].copy_from_slice(&2u64.to_le_bytes());
        bytes[28..30].copy_from_slice(&1u16.to_le_bytes());
    }
    let mem = memory(&bytes);
    let rx = queue::queue(&mem, 0, &rx_descs, &rx_heads);
    let tx = queue::queue(&mem, 0x8000, &tx_descs, &tx_heads);
    let ev = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), QSIZE);
    let Ok(dir) = tempfile::tempdir() else { return };
    let Ok(mut dev) = Vsock::new(3, &dir.path().join("v.sock"), interrupt()) else {
        return;
    };
    let queues: Result<Vec<Queue>, _> = [&rx, &tx, &ev]
        .iter()
        .map(|q| q.create_queue::<Queue>())
        .collect();
    let Ok(queues) = queues else { return };
    if dev.activate(mem.clone(), queues, 0).is_err() {
        return;
    }
    dev.process_queue(1);
    dev.process_queue(0);
    assert!(tx.used().idx().load() <= tx_heads.len() as u16);
    assert!(rx.used().idx().load() <= rx_heads.len() as u16);
});
