//! The vsock device model driven through its virtqueues by a guest driver in miniature (split
//! rings in plain memory, Linux's buffer sizes), with a real Unix-socket client on the host
//! side: the VMM's share of vsock cost, without a guest kernel.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::table::{mib_per_s, BenchError, Goal, Row, Scale};
use vmrun::devices::virtio::vsock::packet::{
    Header, HEADER_LEN, HOST_CID, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RW, TYPE_STREAM,
};
use vmrun::devices::virtio::vsock::{Vsock, TXQ};
use vmrun::devices::virtio::{FdChange, Interrupt, VirtioDevice};

const CID: u64 = 3;
const GUEST_PORT: u32 = 1024;
const QSIZE: u16 = 256;
/// Linux's receive buffer: 4 KiB of payload per packet.
const RX_DATA: u32 = 4096;
const RX_SLOT: u64 = 8192;
/// Linux's largest transmit packet.
const TX_DATA: u32 = 64 * 1024;
const TX_SLOT: u64 = 68 * 1024;
/// What the miniature guest advertises as its receive buffer (Linux's default).
const GUEST_BUF: u32 = 256 * 1024;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

const RX_RING: u64 = 0;
const TX_RING: u64 = 0x1_0000;
const EV_RING: u64 = 0x2_0000;
const RX_BUFS: u64 = 0x10_0000;
const TX_BUFS: u64 = 0x40_0000;
const MEM: usize = 32 << 20;

pub fn rows(scale: Scale) -> Vec<Row> {
    let n = scale.reps(10, 3);
    let bytes: u64 = if scale.quick { 64 << 20 } else { 256 << 20 };
    let small: u64 = if scale.quick { 100_000 } else { 400_000 };
    let mut h2g = (Vec::new(), Vec::new());
    let mut g2h = Vec::new();
    let mut pps = Vec::new();
    let mk = |name: &str, unit| Row::new(format!("vsock device {name}"), unit, Goal::None);
    for _ in 0..n {
        let mut round = || -> Result<(), BenchError> {
            let (d, p) = host_to_guest(bytes, Check::Off)?;
            h2g.0.push(mib_per_s(bytes, d));
            h2g.1.push(p as f64 / d.as_secs_f64());
            let (d, _) = guest_to_host(bytes, TX_DATA, Check::Off)?;
            g2h.push(mib_per_s(bytes, d));
            let (d, p) = guest_to_host(small * 64, 64, Check::Off)?;
            pps.push(p as f64 / d.as_secs_f64());
            Ok(())
        };
        if let Err(e) = round() {
            return vec![mk("through its queues", "").absent(e.to_string())];
        }
    }
    vec![
        mk("host→guest, 4 KiB buffers", "MiB/s").samples(&h2g.0),
        mk("host→guest, 4 KiB buffers", "pkt/s").samples(&h2g.1),
        mk("guest→host, 64 KiB packets", "MiB/s").samples(&g2h),
        mk("guest→host, 64 B packets", "pkt/s").samples(&pps),
    ]
}

/// One split virtqueue as a driver sees it.
struct Ring {
    base: u64,
    avail_idx: u16,
    used_seen: u16,
}

impl Ring {
    fn new(base: u64) -> Ring {
        Ring {
            base,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    fn desc(&self) -> u64 {
        self.base
    }
    fn avail(&self) -> u64 {
        self.base + 16 * u64::from(QSIZE)
    }
    fn used(&self) -> u64 {
        self.base + 0x8000
    }

    fn queue(&self) -> Result<Queue, BenchError> {
        let mut q = Queue::new(QSIZE).map_err(|e| BenchError::Setup(e.to_string()))?;
        q.set_size(QSIZE);
        let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (lo, hi) = split(self.desc());
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = split(self.avail());
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(self.used());
        q.set_used_ring_address(lo, hi);
        q.set_ready(true);
        Ok(q)
    }

    fn set_desc(&self, m: &GuestMemoryMmap, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        let _ = m.write_slice(&d, GuestAddress(self.desc() + 16 * u64::from(i)));
    }

    fn publish(&mut self, m: &GuestMemoryMmap, head: u16) {
        let slot = self.avail() + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        let _ = m.write_obj(head, GuestAddress(slot));
        self.avail_idx = self.avail_idx.wrapping_add(1);
        let _ = m.write_obj(self.avail_idx, GuestAddress(self.avail() + 2));
    }

    /// The next used element: (descriptor id, bytes written).
    fn take_used(&mut self, m: &GuestMemoryMmap) -> Option<(u16, u32)> {
        let idx: u16 = m.read_obj(GuestAddress(self.used() + 2)).ok()?;
        if idx == self.used_seen {
            return None;
        }
        let e = self.used() + 4 + 8 * u64::from(self.used_seen % QSIZE);
        let id: u32 = m.read_obj(GuestAddress(e)).ok()?;
        let len: u32 = m.read_obj(GuestAddress(e + 4)).ok()?;
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((id as u16, len))
    }
}

/// A device, its miniature driver and a host client connected to guest port 1024.
struct Rig {
    mem: GuestMemoryMmap,
    dev: Vsock,
    rx: Ring,
    tx: Ring,
    rx_free: Vec<u16>,
    tx_free: Vec<u16>,
    token: u32,
    host_port: u32,
    /// Guest bytes consumed (its fwd_cnt), and the host's view of the guest's credit.
    fwd: u32,
    fwd_reported: u32,
    /// Guest bytes sent, and what the host reported forwarded.
    tx_cnt: u32,
    peer_fwd: u32,
    peer_buf: u32,
    _dir: tempfile::TempDir,
}

fn setup_err(e: impl std::fmt::Display) -> BenchError {
    BenchError::Setup(format!("vsock rig: {e}"))
}

impl Rig {
    fn new() -> Result<(Rig, UnixStream), BenchError> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).map_err(setup_err)?;
        let dir = tempfile::Builder::new()
            .prefix("vmrun-bench-")
            .tempdir()
            .map_err(BenchError::io("temporary directory"))?;
        let path = dir.path().join("v.sock");
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(BenchError::io("eventfd"))?;
        let mut dev = Vsock::new(CID, &path, Arc::new(Interrupt::new(evt))).map_err(setup_err)?;
        let (rx, tx, ev) = (Ring::new(RX_RING), Ring::new(TX_RING), Ring::new(EV_RING));
        dev.activate(mem.clone(), vec![rx.queue()?, tx.queue()?, ev.queue()?], 0)
            .map_err(setup_err)?;
        let mut rig = Rig {
            mem,
            dev,
            rx,
            tx,
            rx_free: (0..QSIZE).rev().collect(),
            tx_free: (0..QSIZE / 2).rev().collect(),
            token: 0,
            host_port: 0,
            fwd: 0,
            fwd_reported: 0,
            tx_cnt: 0,
            peer_fwd: 0,
            peer_buf: 0,
            _dir: dir,
        };
        for i in 0..QSIZE {
            let a = RX_BUFS + RX_SLOT * u64::from(i);
            rig.rx
                .set_desc(&rig.mem, i, a, HEADER_LEN + RX_DATA, F_WRITE, 0);
        }
        for s in 0..QSIZE / 2 {
            let a = TX_BUFS + TX_SLOT * u64::from(s);
            let _ = rig
                .mem
                .write_slice(&vec![0x5a; TX_DATA as usize], GuestAddress(a + 64));
        }
        let mut client = UnixStream::connect(&path).map_err(BenchError::io("connect"))?;
        let listener = rig.dev.initial_fds()[0].token;
        rig.dev.process_fd(listener, true, false, false);
        rig.token = rig
            .fd_changes()
            .into_iter()
            .find_map(|c| match c {
                FdChange::Add(w) => Some(w.token),
                _ => None,
            })
            .ok_or_else(|| setup_err("no connection registered"))?;
        client
            .write_all(format!("CONNECT {GUEST_PORT}\n").as_bytes())
            .map_err(BenchError::io("handshake"))?;
        rig.give_rx();
        rig.dev.process_fd(rig.token, true, false, false);
        let req = rig
            .take_rx()
            .into_iter()
            .find(|h| h.op == OP_REQUEST)
            .ok_or_else(|| setup_err("no REQUEST from the device"))?;
        rig.host_port = req.src_port;
        rig.peer_buf = req.buf_alloc;
        rig.send(OP_RESPONSE, 0);
        rig.dev.process_queue(TXQ);
        client
            .set_read_timeout(Some(STALL))
            .map_err(BenchError::io("handshake"))?;
        let mut line = [0u8; 32];
        let n = client.read(&mut line).map_err(BenchError::io("OK line"))?;
        if !line[..n].starts_with(b"OK ") {
            return Err(setup_err("no OK line"));
        }
        Ok((rig, client))
    }

    fn fd_changes(&mut self) -> Vec<FdChange> {
        let c = self.dev.take_fd_changes();
        self.dev.fd_changes_applied();
        c
    }

    fn hdr(&self, op: u16, len: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: GUEST_PORT,
            dst_port: self.host_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: GUEST_BUF,
            fwd_cnt: self.fwd,
        }
    }

    fn give_rx(&mut self) {
        while let Some(i) = self.rx_free.pop() {
            self.rx.publish(&self.mem, i);
        }
    }

    /// Headers of the packets the device delivered; RW payloads count as consumed.
    fn take_rx(&mut self) -> Vec<Header> {
        self.take_rx_with_ids()
            .into_iter()
            .map(|(h, _)| h)
            .collect()
    }

    /// As `take_rx`, with the buffer each packet arrived in (valid until the next `give_rx`).
    fn take_rx_with_ids(&mut self) -> Vec<(Header, u16)> {
        let mut out = Vec::new();
        while let Some((id, _len)) = self.rx.take_used(&self.mem) {
            let mut raw = [0u8; HEADER_LEN as usize];
            let a = RX_BUFS + RX_SLOT * u64::from(id);
            if self.mem.read_slice(&mut raw, GuestAddress(a)).is_ok() {
                let h = Header::parse(&raw);
                self.peer_fwd = h.fwd_cnt;
                self.peer_buf = h.buf_alloc;
                if h.op == OP_RW {
                    self.fwd = self.fwd.wrapping_add(h.len);
                }
                out.push((h, id));
            }
            self.rx_free.push(id);
        }
        out
    }

    fn reclaim_tx(&mut self) {
        while let Some((id, _)) = self.tx.take_used(&self.mem) {
            self.tx_free.push(id / 2);
        }
    }

    /// Queues one packet (header, and `len` payload bytes from the slot's prefilled data) and
    /// lets the device take it. False when no slot is free.
    fn send(&mut self, op: u16, len: u32) -> bool {
        self.send_with(op, len, None)
    }

    /// As `send`; with `Some(offset)` the payload is first rewritten with the check pattern
    /// for that stream offset.
    fn send_with(&mut self, op: u16, len: u32, offset: Option<u64>) -> bool {
        let Some(s) = self.tx_free.pop() else {
            return false;
        };
        let a = TX_BUFS + TX_SLOT * u64::from(s);
        if let Some(off) = offset {
            let mut data = vec![0u8; len as usize];
            fill_pattern(&mut data, off);
            let _ = self.mem.write_slice(&data, GuestAddress(a + 64));
        }
        let _ = self
            .mem
            .write_slice(&self.hdr(op, len).to_bytes(), GuestAddress(a));
        let d = 2 * s;
        if len == 0 {
            self.tx.set_desc(&self.mem, d, a, HEADER_LEN, 0, 0);
        } else {
            self.tx.set_desc(&self.mem, d, a, HEADER_LEN, F_NEXT, d + 1);
            self.tx.set_desc(&self.mem, d + 1, a + 64, len, 0, 0);
        }
        self.tx.publish(&self.mem, d);
        true
    }

    /// Tells the host what the guest consumed once a quarter of its buffer is free again.
    fn maybe_credit(&mut self) {
        if self.fwd.wrapping_sub(self.fwd_reported) >= GUEST_BUF / 4 {
            self.fwd_reported = self.fwd;
            self.reclaim_tx();
            if self.send(OP_CREDIT_UPDATE, 0) {
                self.dev.process_queue(TXQ);
            }
        }
    }
}

const STALL: Duration = Duration::from_secs(20);

/// Whether a run checks the bytes it moves (tests) or only counts them (the bench, where
/// checking would be measured too).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Check {
    Off,
    Content,
}

/// The byte at stream offset `i` when content is checked: each aligned 4-byte word holds its
/// own index, so a dropped, repeated or reordered run of bytes (any length that is not a
/// multiple of 2^34) shows up at its first byte.
fn pattern(i: u64) -> u8 {
    ((i / 4) as u32).to_le_bytes()[(i % 4) as usize]
}

fn fill_pattern(buf: &mut [u8], offset: u64) {
    for (k, b) in buf.iter_mut().enumerate() {
        *b = pattern(offset + k as u64);
    }
}

/// The first offset where `buf` (starting at stream offset `offset`) differs from the pattern.
fn pattern_mismatch(buf: &[u8], offset: u64) -> Option<u64> {
    (0..buf.len())
        .find(|&k| buf[k] != pattern(offset + k as u64))
        .map(|k| offset + k as u64)
}

/// Host writes `total` bytes; the guest receives them in 4 KiB buffers. (elapsed, packets)
fn host_to_guest(total: u64, check: Check) -> Result<(Duration, u64), BenchError> {
    let (mut rig, client) = Rig::new()?;
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut c = client;
        c.set_nonblocking(false)?;
        let mut buf = vec![0xa5u8; 256 << 10];
        let mut left = total;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            if check == Check::Content {
                fill_pattern(&mut buf[..n], total - left);
            }
            c.write_all(&buf[..n])?;
            left -= n as u64;
        }
        // Held open until the guest has it all, so EOF does not race the data.
        let mut b = [0u8; 1];
        let _ = c.read(&mut b);
        Ok(())
    });
    let t = Instant::now();
    let (mut got, mut packets) = (0u64, 0u64);
    let mut last_progress = Instant::now();
    while got < total {
        rig.give_rx();
        rig.dev.process_fd(rig.token, true, false, false);
        rig.fd_changes();
        let before = got;
        for (h, id) in rig.take_rx_with_ids() {
            if h.op != OP_RW {
                continue;
            }
            if h.len == 0 || h.len > RX_DATA {
                return Err(setup_err(format!(
                    "a {}-byte packet in a {RX_DATA}-byte buffer",
                    h.len
                )));
            }
            if check == Check::Content {
                let mut data = vec![0u8; h.len as usize];
                let a = RX_BUFS + RX_SLOT * u64::from(id) + u64::from(HEADER_LEN);
                rig.mem
                    .read_slice(&mut data, GuestAddress(a))
                    .map_err(setup_err)?;
                if let Some(at) = pattern_mismatch(&data, got) {
                    return Err(setup_err(format!("host→guest byte {at} is wrong")));
                }
            }
            got += u64::from(h.len);
            packets += 1;
        }
        if got > total {
            return Err(setup_err(format!(
                "host→guest delivered {got} of {total} bytes"
            )));
        }
        rig.maybe_credit();
        rig.fd_changes();
        if got != before {
            last_progress = Instant::now();
        } else if last_progress.elapsed() > STALL {
            return Err(setup_err(format!(
                "host→guest stalled at {got} of {total} bytes"
            )));
        }
    }
    let d = t.elapsed();
    drop(rig);
    let _ = writer.join();
    Ok((d, packets))
}

/// The guest sends `total` bytes in `pkt`-byte packets within the host's credit; a host
/// client reads them. (elapsed, packets)
fn guest_to_host(total: u64, pkt: u32, check: Check) -> Result<(Duration, u64), BenchError> {
    let (mut rig, client) = Rig::new()?;
    let reader = std::thread::spawn(move || -> std::io::Result<u64> {
        let mut c = client;
        c.set_nonblocking(false)?;
        let mut buf = vec![0u8; 256 << 10];
        let mut n = 0u64;
        while n < total {
            match c.read(&mut buf)? {
                0 => break,
                k => {
                    if check == Check::Content {
                        if let Some(at) = pattern_mismatch(&buf[..k], n) {
                            return Err(std::io::Error::other(format!(
                                "guest→host byte {at} is wrong"
                            )));
                        }
                    }
                    n += k as u64;
                }
            }
        }
        // Anything past `total` is a duplicate: wait briefly for it.
        c.set_read_timeout(Some(Duration::from_millis(50)))?;
        if check == Check::Content {
            if let Ok(k @ 1..) = c.read(&mut buf) {
                n += k as u64;
            }
        }
        Ok(n)
    });
    let t = Instant::now();
    let (mut sent, mut packets) = (0u64, 0u64);
    let mut last_progress = Instant::now();
    while sent < total {
        rig.reclaim_tx();
        rig.give_rx();
        rig.take_rx();
        let mut queued = false;
        loop {
            let in_flight = rig.tx_cnt.wrapping_sub(rig.peer_fwd);
            let credit = rig.peer_buf.saturating_sub(in_flight);
            let len = (pkt as u64).min(total - sent) as u32;
            let offset = (check == Check::Content).then_some(sent);
            if len == 0 || credit < len || !rig.send_with(OP_RW, len, offset) {
                break;
            }
            rig.tx_cnt = rig.tx_cnt.wrapping_add(len);
            sent += u64::from(len);
            packets += 1;
            queued = true;
        }
        if queued {
            rig.dev.process_queue(TXQ);
            last_progress = Instant::now();
        } else {
            // Stalled on credit: let the device flush to the host socket.
            rig.dev.process_fd(rig.token, false, true, false);
            if last_progress.elapsed() > STALL {
                return Err(setup_err(format!(
                    "guest→host stalled at {sent} of {total} bytes"
                )));
            }
        }
        rig.fd_changes();
    }
    // Done when the host has read it all.
    while !reader.is_finished() {
        rig.dev.process_fd(rig.token, false, true, false);
        rig.fd_changes();
        rig.give_rx();
        rig.take_rx();
        if t.elapsed() > STALL * 2 {
            return Err(setup_err("the host reader never finished"));
        }
    }
    let d = t.elapsed();
    match reader.join() {
        Ok(Ok(n)) if n == total => Ok((d, packets)),
        Ok(Ok(n)) => Err(setup_err(format!("the host read {n} of {total} bytes"))),
        Ok(Err(e)) => Err(BenchError::io("host reader")(e)),
        Err(_) => Err(setup_err("the host reader panicked")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Host → guest, the packet count depends on how the host's reads split the stream (the
    /// writer's pace, scheduling), so only its bounds are fixed: at least one packet per full
    /// 4 KiB buffer, and at most twice that (the stated ceiling: buffers at least half full on
    /// average). A short packet happens only where the device caught up with the writer in the
    /// middle of one of its 256 KiB writes, a few times per run even under load. The bytes
    /// themselves must arrive exactly once and in order.
    #[test]
    fn the_rig_moves_every_byte_both_ways() {
        let total: u64 = 1 << 20;
        let (_, packets) = host_to_guest(total, Check::Content).unwrap();
        let floor = total.div_ceil(u64::from(RX_DATA));
        assert!(
            (floor..=2 * floor).contains(&packets),
            "{packets} packets for {total} bytes (bounds {floor}..={})",
            2 * floor
        );
        // Guest → host, the rig itself sizes every packet: the count is exact.
        let (_, packets) = guest_to_host(3 << 20, TX_DATA, Check::Content).unwrap();
        assert_eq!(packets, 48);
        let (_, packets) = guest_to_host(64 * 1000, 64, Check::Content).unwrap();
        assert_eq!(packets, 1000);
    }

    #[test]
    fn the_pattern_catches_a_dropped_or_repeated_run() {
        let mut buf = vec![0u8; 3 * 4096];
        fill_pattern(&mut buf, 0);
        assert_eq!(pattern_mismatch(&buf, 0), None);
        // A repeated 4 KiB packet: the stream continues with bytes it already had.
        let mut dup = buf[..4096].to_vec();
        dup.extend_from_slice(&buf[..4096]);
        let first_word =
            |at: Option<u64>, start: u64| matches!(at, Some(a) if (start..start + 4).contains(&a));
        assert!(first_word(pattern_mismatch(&dup, 0), 4096));
        // A dropped packet: the next bytes belong further on.
        let mut gap = buf[..4096].to_vec();
        gap.extend_from_slice(&buf[8192..]);
        assert!(first_word(pattern_mismatch(&gap, 0), 4096));
        // Two packets swapped.
        let mut swapped = buf[4096..8192].to_vec();
        swapped.extend_from_slice(&buf[..4096]);
        assert!(first_word(pattern_mismatch(&swapped, 0), 0));
        // A byte shifted by one.
        assert!(first_word(pattern_mismatch(&buf[1..], 0), 0));
    }
}
