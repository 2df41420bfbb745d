//! virtio-blk: descriptor chains of a hostile driver, walked and served by the device against
//! a small disk file (read-only or not). The device must never hand back more chains than were
//! offered, and must keep serving.
#![no_main]

#[path = "common/queue.rs"]
mod queue;

use libfuzzer_sys::fuzz_target;
use queue::{interrupt, layout, memory, Bytes8};
use virtio_queue::Queue;
use vmrun::devices::virtio::block::{Block, Disk};
use vmrun::devices::virtio::VirtioDevice;

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes8(data);
    let read_only = b.u8() & 1 == 1;
    let (descs, heads) = layout(&mut b);
    let mem = memory(b.rest());
    let vq = queue::queue(&mem, 0, &descs, &heads);
    let Ok(file) = tempfile::NamedTempFile::new() else {
        return;
    };
    if file.as_file().set_len(64 * 512).is_err() {
        return;
    }
    let Ok(disk) = Disk::open(file.path(), read_only) else {
        return;
    };
    let mut dev = Block::new(disk, interrupt());
    let Ok(q) = vq.create_queue::<Queue>() else {
        return;
    };
    if dev.activate(mem.clone(), vec![q], 0).is_err() {
        return;
    }
    dev.process_queue(0);
    assert!(vq.used().idx().load() <= heads.len() as u16);
    dev.process_queue(0);
});
