//! The virtio-vsock device: moves packets between its queues and the muxer. Guest → host
//! chains are read as byte streams (Linux may split a payload over several descriptors);
//! host → guest packets fill the guest's receive buffers while the muxer has something to say.

use std::io::Read;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Reader};
use virtio_vsock::packet::VsockPacket;
use vm_memory::{Bytes, GuestMemoryMmap};

use super::muxer::{Muxer, VsockError, VsockMetrics};
use super::packet::{Header, HEADER_LEN, MAX_PKT_DATA};
use crate::devices::virtio::{
    ActivateError, FdChange, FdWatch, Interrupt, VirtioDevice, INT_VRING, TYPE_VSOCK,
};

pub const RXQ: usize = 0;
pub const TXQ: usize = 1;
/// The event queue: the device's only message is a transport reset.
const EVQ: usize = 2;
const EVENT_TRANSPORT_RESET: u32 = 0;
const QUEUE_SIZE: u16 = 256;

pub struct Vsock {
    cid: u64,
    /// One packet's payload, reused.
    scratch: Vec<u8>,
    muxer: Muxer,
    interrupt: Arc<Interrupt>,
    mem: Option<GuestMemoryMmap>,
    queues: Vec<Queue>,
    /// After a restore: nothing goes to the guest until it has handled the transport reset
    /// (it refills and kicks the event queue then); a connection delivered earlier would be
    /// reset along with the ones the snapshot left behind.
    awaiting_reset: bool,
}

impl Vsock {
    /// Binds the host socket at `uds_path` for guest `cid`.
    pub fn new(cid: u64, uds_path: &Path, interrupt: Arc<Interrupt>) -> Result<Self, VsockError> {
        Ok(Vsock {
            cid,
            scratch: Vec::with_capacity(MAX_PKT_DATA as usize),
            muxer: Muxer::new(cid, uds_path)?,
            interrupt,
            mem: None,
            queues: Vec::new(),
            awaiting_reset: false,
        })
    }

    pub fn metrics(&self) -> Arc<VsockMetrics> {
        self.muxer.metrics.clone()
    }

    /// Guest → host packets. Every chain is returned to the guest, valid or not.
    fn process_tx(&mut self) -> bool {
        let (Some(mem), Some(q)) = (self.mem.as_ref(), self.queues.get_mut(TXQ)) else {
            return false;
        };
        let mut used = false;
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            // Linux may split a payload over several descriptors (non-linear skbs), so the
            // chain is read as a byte stream: header, then exactly `len` bytes of payload.
            match read_tx_packet(mem, chain, &mut self.scratch) {
                Ok(h) => self
                    .muxer
                    .on_guest_packet(&h, &self.scratch[..h.len as usize]),
                Err(e) => {
                    count_bad(&self.muxer.metrics);
                    log::debug!("vsock: malformed tx chain: {e}");
                }
            }
            if q.add_used(mem, head, 0).is_err() {
                count_bad(&self.muxer.metrics);
            }
            used = true;
        }
        used
    }

    /// Host → guest packets, while the guest has buffers and the muxer has something to say.
    fn process_rx(&mut self) -> bool {
        if self.awaiting_reset {
            return false;
        }
        let (Some(mem), Some(q)) = (self.mem.as_ref(), self.queues.get_mut(RXQ)) else {
            return false;
        };
        let mut used = false;
        while self.muxer.has_rx() {
            let Some(mut chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let len = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(mut pkt) => match self.muxer.fill_rx(&mut pkt) {
                    Some(len) => len,
                    None => {
                        // Nothing to send after all: give the buffer back for later.
                        q.go_to_previous_position();
                        break;
                    }
                },
                Err(e) => {
                    count_bad(&self.muxer.metrics);
                    log::debug!("vsock: malformed rx chain: {e}");
                    0
                }
            };
            if q.add_used(mem, head, len).is_err() {
                count_bad(&self.muxer.metrics);
            }
            used = true;
        }
        used
    }

    /// Puts one event (virtio 1.2 §5.10.6.6) into the guest's next event buffer.
    fn post_event(&mut self, id: u32) -> bool {
        let (Some(mem), Some(q)) = (self.mem.as_ref(), self.queues.get_mut(EVQ)) else {
            return false;
        };
        let Some(mut chain) = q.pop_descriptor_chain(mem) else {
            return false;
        };
        let head = chain.head_index();
        let written = match chain.next() {
            Some(d) if d.is_write_only() && d.len() >= 4 => {
                mem.write_obj(id.to_le(), d.addr()).is_ok()
            }
            _ => false,
        };
        if !written {
            count_bad(&self.muxer.metrics);
        }
        if q.add_used(mem, head, if written { 4 } else { 0 }).is_err() {
            count_bad(&self.muxer.metrics);
        }
        self.interrupt.signal(INT_VRING);
        written
    }

    fn kick(&mut self, used: bool) {
        let Some(mem) = self.mem.as_ref() else { return };
        let notify = used
            && self
                .queues
                .iter_mut()
                .take(2)
                .any(|q| q.needs_notification(mem).unwrap_or(true));
        if notify {
            self.interrupt.signal(INT_VRING);
        }
    }
}

fn count_bad(m: &VsockMetrics) {
    m.bad_packets.fetch_add(1, Ordering::Relaxed);
}

/// Reads one guest packet: a 44-byte header and `len` payload bytes into `payload`, from the
/// chain's readable descriptors in order, however they are split.
fn read_tx_packet(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    payload: &mut Vec<u8>,
) -> Result<Header, String> {
    let mut r = Reader::new(mem, chain).map_err(|e| e.to_string())?;
    let mut raw = [0u8; HEADER_LEN as usize];
    r.read_exact(&mut raw)
        .map_err(|_| "shorter than a packet header".to_string())?;
    let h = Header::parse(&raw);
    if h.len > MAX_PKT_DATA {
        return Err(format!(
            "payload of {} bytes is over the {MAX_PKT_DATA}-byte limit",
            h.len
        ));
    }
    if (r.available_bytes() as u64) < u64::from(h.len) {
        return Err(format!(
            "header says {} payload bytes, the descriptors hold {}",
            h.len,
            r.available_bytes()
        ));
    }
    payload.resize(h.len as usize, 0);
    r.read_exact(payload).map_err(|e| e.to_string())?;
    Ok(h)
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        0
    }

    fn config(&self) -> Vec<u8> {
        self.cid.to_le_bytes().to_vec()
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        _features: u64,
    ) -> Result<(), ActivateError> {
        if queues.len() != 3 {
            return Err(ActivateError::QueueCount {
                want: 3,
                got: queues.len(),
            });
        }
        self.queues = queues;
        self.mem = Some(mem);
        Ok(())
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.queues.iter().map(|q| q.state()).collect()
    }

    /// Connections did not survive the snapshot: a transport-reset event makes the guest drop
    /// them (its listeners stay) and re-read its CID.
    fn restored(&mut self) {
        if self.post_event(EVENT_TRANSPORT_RESET) {
            self.awaiting_reset = true;
        } else {
            log::warn!("vsock: no event buffer for the transport reset after a restore");
        }
    }

    fn reset(&mut self) {
        self.awaiting_reset = false;
        self.muxer.reset();
        self.queues.clear();
        self.mem = None;
    }

    fn process_queue(&mut self, index: usize) {
        let used = match index {
            TXQ => {
                let tx = self.process_tx();
                self.process_rx() | tx
            }
            RXQ => self.process_rx(),
            EVQ => {
                // The guest refilled the event queue: it has handled the reset.
                self.awaiting_reset = false;
                self.process_rx()
            }
            _ => false,
        };
        self.kick(used);
    }

    fn initial_fds(&mut self) -> Vec<FdWatch> {
        vec![self.muxer.listener_watch()]
    }

    fn process_fd(&mut self, token: u32, readable: bool, writable: bool, hangup: bool) {
        self.muxer.on_host_event(token, readable, writable, hangup);
        // Without an active driver nothing is delivered; the muxer keeps it (bounded) or the
        // host waits.
        let used = self.process_rx();
        self.kick(used);
    }

    fn take_fd_changes(&mut self) -> Vec<FdChange> {
        self.muxer.take_fd_changes()
    }

    fn fd_changes_applied(&mut self) {
        self.muxer.fd_changes_applied();
    }
}

#[cfg(test)]
mod tests {
    use super::super::packet::*;
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    // The mock avail ring holds QSIZE / 2 entries before it meets the used ring: keep
    // each test well under that.
    const QSIZE: u16 = 128;
    const CID: u64 = 3;
    const F_WRITE: u16 = 2;
    const F_NEXT: u16 = 1;
    const RX_BUF: u32 = 4096;

    /// A guest driver in miniature: queues in mock guest memory, buffers it hands out, and the
    /// packets it gets back.
    struct Guest<'a> {
        mem: &'a GuestMemoryMmap,
        rx: MockSplitQueue<'a, GuestMemoryMmap>,
        tx: MockSplitQueue<'a, GuestMemoryMmap>,
        next: [u16; 2],
        avail: [u16; 2],
        used_seen: u16,
        buf: u64,
    }

    fn hdr_bytes(h: &Header) -> Vec<u8> {
        h.to_bytes().to_vec()
    }

    impl<'a> Guest<'a> {
        fn new(mem: &'a GuestMemoryMmap) -> Self {
            Guest {
                mem,
                rx: MockSplitQueue::create(mem, GuestAddress(0), QSIZE),
                tx: MockSplitQueue::create(mem, GuestAddress(0x10000), QSIZE),
                next: [0, 0],
                avail: [0, 0],
                used_seen: 0,
                buf: 0x10_0000,
            }
        }

        fn queues(&self) -> Vec<Queue> {
            let evq = MockSplitQueue::create(self.mem, GuestAddress(0x20000), QSIZE);
            vec![
                self.rx.create_queue().unwrap(),
                self.tx.create_queue().unwrap(),
                evq.create_queue().unwrap(),
            ]
        }

        fn alloc(&mut self, len: u32) -> u64 {
            let a = self.buf;
            self.buf += u64::from(len.max(1) + 64);
            if self.buf > 0x70_0000 {
                self.buf = 0x10_0000;
            }
            a
        }

        fn push(&mut self, q: usize, descs: &[(u64, u32, u16)]) {
            let vq = if q == 0 { &self.rx } else { &self.tx };
            let head = self.next[q];
            for (i, (addr, len, flags)) in descs.iter().enumerate() {
                let idx = (head + i as u16) % QSIZE;
                let last = i + 1 == descs.len();
                let next = (idx + 1) % QSIZE;
                let f = if last { *flags } else { *flags | F_NEXT };
                vq.desc_table()
                    .store(
                        idx,
                        RawDescriptor::from(SplitDescriptor::new(*addr, *len, f, next)),
                    )
                    .unwrap();
            }
            self.next[q] = (head + descs.len() as u16) % QSIZE;
            vq.avail()
                .ring()
                .ref_at(usize::from(self.avail[q] % QSIZE))
                .unwrap()
                .store(head);
            self.avail[q] = self.avail[q].wrapping_add(1);
            vq.avail().idx().store(self.avail[q]);
        }

        /// Gives the device `n` receive buffers.
        fn give_rx(&mut self, n: usize) {
            for _ in 0..n {
                let a = self.alloc(RX_BUF + 44);
                self.push(0, &[(a, RX_BUF + 44, F_WRITE)]);
            }
        }

        /// Sends a packet whose header and payload are spread over several descriptors.
        fn send_split(&mut self, dev: &mut Vsock, h: Header, data: &[u8], pieces: usize) {
            let raw = hdr_bytes(&h);
            let a = self.alloc(44);
            self.mem.write_slice(&raw, GuestAddress(a)).unwrap();
            // The header itself split 20 + 24.
            let mut descs = vec![(a, 20, 0), (a + 20, 24, 0)];
            for chunk in data.chunks(data.len().div_ceil(pieces).max(1)) {
                let d = self.alloc(chunk.len() as u32);
                self.mem.write_slice(chunk, GuestAddress(d)).unwrap();
                descs.push((d, chunk.len() as u32, 0));
            }
            self.push(1, &descs);
            dev.process_queue(TXQ);
        }

        fn send(&mut self, dev: &mut Vsock, h: Header, data: &[u8]) {
            let a = self.alloc(44);
            self.mem
                .write_slice(&hdr_bytes(&h), GuestAddress(a))
                .unwrap();
            if data.is_empty() {
                self.push(1, &[(a, 44, 0)]);
            } else {
                let d = self.alloc(data.len() as u32);
                self.mem.write_slice(data, GuestAddress(d)).unwrap();
                self.push(1, &[(a, 44, 0), (d, data.len() as u32, 0)]);
            }
            dev.process_queue(TXQ);
        }

        /// Packets the device has put in receive buffers since the last call.
        fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
            let mut out = vec![];
            let used = self.rx.used().idx().load();
            while self.used_seen != used {
                let e = self
                    .rx
                    .used()
                    .ring()
                    .ref_at(usize::from(self.used_seen % QSIZE))
                    .unwrap()
                    .load();
                let d = self.rx.desc_table().load(e.id() as u16).unwrap();
                let addr = SplitDescriptor::from(d).addr();
                let mut raw = vec![0u8; e.len() as usize];
                self.mem.read_slice(&mut raw, addr).unwrap();
                let h = Header::parse(raw[..44].try_into().unwrap());
                out.push((h, raw[44..].to_vec()));
                self.used_seen = self.used_seen.wrapping_add(1);
            }
            out
        }
    }

    fn guest_hdr(src_port: u32, dst_port: u32, op: u16) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 64 * 1024,
            ..Default::default()
        }
    }

    struct Setup {
        dev: Vsock,
        path: std::path::PathBuf,
        _dir: tempfile::TempDir,
    }

    fn setup(mem: &GuestMemoryMmap, g: &Guest) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let mut dev = Vsock::new(CID, &path, irq).unwrap();
        dev.activate(mem.clone(), g.queues(), 0).unwrap();
        Setup {
            dev,
            path,
            _dir: dir,
        }
    }

    fn tokens_added(dev: &mut Vsock) -> Vec<u32> {
        dev.take_fd_changes()
            .into_iter()
            .filter_map(|c| match c {
                FdChange::Add(w) => Some(w.token),
                _ => None,
            })
            .collect()
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap()
    }

    /// Host connects with CONNECT 1024, the guest accepts; returns (client, token, host port).
    fn host_connect(s: &mut Setup, g: &mut Guest) -> (UnixStream, u32, u32) {
        let mut client = UnixStream::connect(&s.path).unwrap();
        let lt = s.dev.initial_fds()[0].token;
        s.dev.process_fd(lt, true, false, false);
        let tok = tokens_added(&mut s.dev)[0];
        client.write_all(b"CONNECT 1024\n").unwrap();
        s.dev.process_fd(tok, true, false, false);
        let got = g.received();
        assert_eq!(got.len(), 1);
        let (req, _) = got[0];
        assert_eq!(
            (req.op, req.src_cid, req.dst_cid, req.dst_port, req.type_),
            (OP_REQUEST, HOST_CID, CID, 1024, TYPE_STREAM)
        );
        g.send(&mut s.dev, guest_hdr(1024, req.src_port, OP_RESPONSE), &[]);
        let mut ok = [0u8; 64];
        let n = client.read(&mut ok).unwrap();
        assert_eq!(
            std::str::from_utf8(&ok[..n]).unwrap(),
            format!("OK {}\n", req.src_port)
        );
        client.set_nonblocking(true).unwrap();
        (client, tok, req.src_port)
    }

    #[test]
    fn host_connect_accept_data_both_ways_and_shutdown() {
        let m = mem();
        let mut g = Guest::new(&m);
        g.give_rx(16);
        let mut s = setup(&m, &g);
        assert_eq!(s.dev.config(), CID.to_le_bytes());
        let (mut client, tok, port) = host_connect(&mut s, &mut g);

        client.write_all(b"hello").unwrap();
        s.dev.process_fd(tok, true, false, false);
        let got = g.received();
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].0.op, got[0].0.len, got[0].1.as_slice()),
            (OP_RW, 5, &b"hello"[..])
        );

        g.send(
            &mut s.dev,
            Header {
                len: 5,
                ..guest_hdr(1024, port, OP_RW)
            },
            b"world",
        );
        let mut buf = [0u8; 5];
        client.set_nonblocking(false).unwrap();
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"world");
        // A payload spread over several descriptors (Linux's non-linear skbs).
        let big: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let h = Header {
            len: big.len() as u32,
            ..guest_hdr(1024, port, OP_RW)
        };
        g.send_split(&mut s.dev, h, &big, 3);
        let mut got = vec![0u8; big.len()];
        client.read_exact(&mut got).unwrap();
        assert!(got == big);

        g.send(&mut s.dev, guest_hdr(1024, port, OP_CREDIT_REQUEST), &[]);
        let got = g.received();
        assert_eq!(got[0].0.op, OP_CREDIT_UPDATE);
        assert_eq!((got[0].0.fwd_cnt, got[0].0.buf_alloc), (10_005, BUF_ALLOC));

        drop(client);
        s.dev.process_fd(tok, true, false, true);
        let got = g.received();
        assert_eq!(
            (got[0].0.op, got[0].0.flags),
            (OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND)
        );
        g.send(&mut s.dev, guest_hdr(1024, port, OP_RST), &[]);
        assert_eq!(s.dev.muxer.connection_count(), 0);
        assert!(s
            .dev
            .take_fd_changes()
            .iter()
            .any(|c| matches!(c, FdChange::Remove(_))));
    }

    #[test]
    fn guest_connects_to_a_host_listener_or_gets_reset() {
        let m = mem();
        let mut g = Guest::new(&m);
        g.give_rx(8);
        let mut s = setup(&m, &g);
        let listener = UnixListener::bind(format!("{}_5000", s.path.display())).unwrap();
        g.send(&mut s.dev, guest_hdr(40000, 5000, OP_REQUEST), &[]);
        let got = g.received();
        assert_eq!(
            (got[0].0.op, got[0].0.src_port, got[0].0.dst_port),
            (OP_RESPONSE, 5000, 40000)
        );
        let (mut host, _) = listener.accept().unwrap();
        g.send(
            &mut s.dev,
            Header {
                len: 3,
                ..guest_hdr(40000, 5000, OP_RW)
            },
            b"abc",
        );
        let mut b = [0u8; 3];
        host.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"abc");
        // Guest shuts its sending side: the host sees EOF.
        g.send(
            &mut s.dev,
            Header {
                flags: SHUTDOWN_SEND,
                ..guest_hdr(40000, 5000, OP_SHUTDOWN)
            },
            &[],
        );
        let mut rest = vec![];
        host.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());

        g.send(&mut s.dev, guest_hdr(40001, 6000, OP_REQUEST), &[]);
        let got = g.received();
        assert_eq!((got[0].0.op, got[0].0.dst_port), (OP_RST, 40001));
        assert_eq!(
            s.dev.metrics().connections_refused.load(Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn hostile_packets_are_counted_or_reset_never_a_panic() {
        let m = mem();
        let mut g = Guest::new(&m);
        g.give_rx(8);
        let mut s = setup(&m, &g);
        let metrics = s.dev.metrics();
        // Header shorter than 44 bytes.
        let a = g.alloc(44);
        g.push(1, &[(a, 20, 0)]);
        s.dev.process_queue(TXQ);
        // Writable descriptor on the TX queue.
        g.push(1, &[(a, 44, F_WRITE)]);
        s.dev.process_queue(TXQ);
        // Descriptor outside guest memory.
        g.push(1, &[(8 << 20, 44, 0)]);
        s.dev.process_queue(TXQ);
        // len larger than the data buffer.
        g.send(
            &mut s.dev,
            Header {
                len: 4000,
                ..guest_hdr(1, 2, OP_RW)
            },
            b"tiny",
        );
        // len beyond the packet size limit.
        let h = g.alloc(44);
        m.write_slice(
            &hdr_bytes(&Header {
                len: MAX_PKT_DATA + 1,
                ..guest_hdr(1, 2, OP_RW)
            }),
            GuestAddress(h),
        )
        .unwrap();
        g.push(1, &[(h, 44 + MAX_PKT_DATA + 1, 0)]);
        s.dev.process_queue(TXQ);
        assert_eq!(metrics.bad_packets.load(Ordering::Relaxed), 5);
        // Wrong CIDs are dropped silently.
        g.send(
            &mut s.dev,
            Header {
                src_cid: 99,
                ..guest_hdr(1, 2, OP_RW)
            },
            &[],
        );
        g.send(
            &mut s.dev,
            Header {
                dst_cid: 7,
                ..guest_hdr(1, 2, OP_REQUEST)
            },
            &[],
        );
        assert!(g.received().is_empty());
        // Unknown op and data for a connection that does not exist: RST.
        g.send(
            &mut s.dev,
            Header {
                len: 1,
                ..guest_hdr(7, 8, OP_RW)
            },
            b"x",
        );
        g.send(&mut s.dev, guest_hdr(7, 8, 99), &[]);
        // Wrong type: RST.
        g.send(
            &mut s.dev,
            Header {
                type_: 2,
                ..guest_hdr(7, 8, OP_REQUEST)
            },
            &[],
        );
        // An RST for nothing gets nothing.
        g.send(&mut s.dev, guest_hdr(7, 8, OP_RST), &[]);
        let got = g.received();
        assert_eq!(got.len(), 3);
        assert!(got
            .iter()
            .all(|(h, _)| h.op == OP_RST && h.dst_port == 7 && h.src_port == 8));
        // Every chain was given back.
        assert_eq!(g.tx.used().idx().load(), g.avail[1]);
    }

    #[test]
    fn bad_handshakes_are_refused() {
        let m = mem();
        let mut g = Guest::new(&m);
        g.give_rx(4);
        let mut s = setup(&m, &g);
        let lt = s.dev.initial_fds()[0].token;
        let mut c = UnixStream::connect(&s.path).unwrap();
        s.dev.process_fd(lt, true, false, false);
        let tok = tokens_added(&mut s.dev)[0];
        c.write_all(b"HELLO 1\n").unwrap();
        s.dev.process_fd(tok, true, false, false);
        let mut line = String::new();
        c.read_to_string(&mut line).unwrap();
        assert!(line.starts_with("ERR"), "{line}");
        let mut long = UnixStream::connect(&s.path).unwrap();
        s.dev.process_fd(lt, true, false, false);
        let tok = tokens_added(&mut s.dev)[0];
        long.write_all(&[b'C'; 200]).unwrap();
        s.dev.process_fd(tok, true, false, false);
        assert!(g.received().is_empty(), "no REQUEST for a bad handshake");
    }

    #[test]
    fn credit_flow_control_both_ways() {
        let m = mem();
        let mut g = Guest::new(&m);
        g.give_rx(32);
        let mut s = setup(&m, &g);
        let (mut a, tok_a, port_a) = host_connect(&mut s, &mut g);
        // The guest gives connection A only 8 bytes of credit.
        g.send(
            &mut s.dev,
            Header {
                buf_alloc: 8,
                ..guest_hdr(1024, port_a, OP_CREDIT_UPDATE)
            },
            &[],
        );
        a.write_all(&[b'a'; 100]).unwrap();
        s.dev.process_fd(tok_a, true, false, false);
        let got = g.received();
        assert_eq!(
            (got[0].0.op, got[0].0.len),
            (OP_RW, 8),
            "no more than the credit"
        );
        assert_eq!(
            got[1].0.op, OP_CREDIT_REQUEST,
            "then the device asks for credit"
        );
        assert_eq!(got.len(), 2, "and A stalls");
        // Another connection keeps flowing while A is stalled.
        let (mut b, tok_b, _) = host_connect(&mut s, &mut g);
        b.write_all(b"bbb").unwrap();
        s.dev.process_fd(tok_b, true, false, false);
        let got = g.received();
        assert_eq!((got[0].0.op, got[0].1.as_slice()), (OP_RW, &b"bbb"[..]));
        // Credit returns: A resumes.
        g.send(
            &mut s.dev,
            Header {
                buf_alloc: 8,
                fwd_cnt: 8,
                ..guest_hdr(1024, port_a, OP_CREDIT_UPDATE)
            },
            &[],
        );
        let got = g.received();
        assert_eq!((got[0].0.op, got[0].0.len), (OP_RW, 8));

        // Guest → host beyond the credit the device gave: reset, counted.
        let chunk = vec![7u8; 60 * 1024];
        for _ in 0..12 {
            g.send(
                &mut s.dev,
                Header {
                    len: chunk.len() as u32,
                    ..guest_hdr(1024, port_a, OP_RW)
                },
                &chunk,
            );
        }
        assert_eq!(s.dev.metrics().credit_violations.load(Ordering::Relaxed), 1);
        assert!(g
            .received()
            .iter()
            .any(|(h, _)| h.op == OP_RST && h.dst_port == 1024));
        drop(a);
    }
}
