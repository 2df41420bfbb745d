//! The vsock connection multiplexer: the state of every connection between guest ports and host
//! Unix streams, vsock credit flow control in both directions, and the packets owed to the
//! guest. Bounded everywhere: connections, buffered bytes per connection, queued control
//! packets, handshake lines.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::num::Wrapping;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use thiserror::Error;
use virtio_vsock::packet::VsockPacket;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError};

use super::{HOST_CID, MAX_PKT_DATA};
use crate::devices::virtio::{FdChange, FdWatch, FIRST_DEVICE_TOKEN};

pub const TYPE_STREAM: u16 = 1;
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;
pub const HEADER_LEN: u32 = 44;

/// Receive buffer vmrun advertises per connection, and the most it buffers for one.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Connections (and pending handshakes) at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Control packets waiting for guest buffers.
pub const MAX_CONTROL: usize = 4096;
/// Longest `CONNECT <port>\n` line accepted.
const MAX_HANDSHAKE: usize = 64;
const LISTENER_TOKEN: u32 = FIRST_DEVICE_TOKEN;
/// Host-side ports for host-initiated connections start here.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

#[derive(Debug, Error)]
pub enum VsockError {
    #[error("vsock socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Counters; guest misbehaviour is counted here, never a panic.
#[derive(Default, Debug)]
pub struct VsockMetrics {
    pub tx_packets: AtomicU64,
    pub rx_packets: AtomicU64,
    pub bad_packets: AtomicU64,
    pub unknown_connection: AtomicU64,
    pub resets_sent: AtomicU64,
    pub control_dropped: AtomicU64,
    pub connections_opened: AtomicU64,
    pub connections_refused: AtomicU64,
    pub credit_violations: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// A packet header, as plain values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    /// From the 44 little-endian header bytes (virtio spec 5.10.6).
    pub fn parse(b: &[u8; HEADER_LEN as usize]) -> Header {
        let u64_at = |o: usize| {
            u64::from_le_bytes([
                b[o],
                b[o + 1],
                b[o + 2],
                b[o + 3],
                b[o + 4],
                b[o + 5],
                b[o + 6],
                b[o + 7],
            ])
        };
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// The 44 little-endian header bytes (what a guest driver writes).
    pub fn to_bytes(&self) -> [u8; HEADER_LEN as usize] {
        let mut b = [0u8; HEADER_LEN as usize];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    fn store<B: BitmapSlice>(&self, p: &mut VsockPacket<'_, B>) {
        p.set_src_cid(self.src_cid)
            .set_dst_cid(self.dst_cid)
            .set_src_port(self.src_port)
            .set_dst_port(self.dst_port)
            .set_len(self.len)
            .set_type(self.type_)
            .set_op(self.op)
            .set_flags(self.flags)
            .set_buf_alloc(self.buf_alloc)
            .set_fwd_cnt(self.fwd_cnt);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated: REQUEST sent, waiting for the guest's RESPONSE.
    Connecting,
    Established,
}

struct Connection {
    local_port: u32,
    peer_port: u32,
    stream: UnixStream,
    state: State,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    /// Bytes from the guest written to the host stream.
    fwd_cnt: Wrapping<u32>,
    last_fwd_reported: Wrapping<u32>,
    /// Guest bytes the host stream has not taken yet (at most BUF_ALLOC: the guest's credit).
    pending: VecDeque<u8>,
    /// The guest will send no more: shut the host stream's write side once `pending` drains.
    shut_write_after_flush: bool,
    /// The guest will read no more.
    peer_no_recv: bool,
    /// The host stream reached EOF (the host shut its writing side, or closed).
    host_eof: bool,
    /// The host stream hung up entirely (it will not read either).
    host_hup: bool,
    /// The guest will send no more.
    peer_no_send: bool,
    watch_in: bool,
    watch_out: bool,
}

impl Connection {
    fn new(
        local_port: u32,
        peer_port: u32,
        stream: UnixStream,
        state: State,
        peer_buf_alloc: u32,
        peer_fwd_cnt: u32,
    ) -> Self {
        Connection {
            local_port,
            peer_port,
            stream,
            state,
            peer_buf_alloc,
            peer_fwd_cnt: Wrapping(peer_fwd_cnt),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_reported: Wrapping(0),
            pending: VecDeque::new(),
            shut_write_after_flush: false,
            peer_no_recv: false,
            host_eof: false,
            host_hup: false,
            peer_no_send: false,
            watch_in: true,
            watch_out: false,
        }
    }

    /// Bytes the guest can still take on this connection.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }
}

struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

pub struct Muxer {
    cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    conns: HashMap<u32, Connection>,
    by_ports: HashMap<(u32, u32), u32>,
    handshakes: HashMap<u32, Handshake>,
    control: VecDeque<Header>,
    ready: VecDeque<u32>,
    next_id: u32,
    next_local_port: u32,
    fd_changes: Vec<FdChange>,
    /// Streams of removed connections, kept open until the loop has unregistered their fds
    /// (closing first would make the removal fail and let a reused fd number collide).
    graveyard: Vec<UnixStream>,
    pub metrics: Arc<VsockMetrics>,
}

fn token(id: u32) -> u32 {
    LISTENER_TOKEN + 1 + id
}

impl Muxer {
    pub fn new(cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        let bind_err = |source| VsockError::Bind {
            path: uds_path.into(),
            source,
        };
        let listener = UnixListener::bind(uds_path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(Muxer {
            cid,
            uds_path: uds_path.into(),
            listener,
            conns: HashMap::new(),
            by_ports: HashMap::new(),
            handshakes: HashMap::new(),
            control: VecDeque::new(),
            ready: VecDeque::new(),
            next_id: 0,
            next_local_port: FIRST_LOCAL_PORT,
            fd_changes: Vec::new(),
            graveyard: Vec::new(),
            metrics: Arc::default(),
        })
    }

    pub fn listener_watch(&self) -> FdWatch {
        FdWatch {
            fd: self.listener.as_raw_fd(),
            token: LISTENER_TOKEN,
            readable: true,
            writable: false,
        }
    }

    pub fn take_fd_changes(&mut self) -> Vec<FdChange> {
        std::mem::take(&mut self.fd_changes)
    }

    /// The loop has applied the changes: the removed streams may close now.
    pub fn fd_changes_applied(&mut self) {
        self.graveyard.clear();
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Drops every connection (device reset).
    pub fn reset(&mut self) {
        let ids: Vec<u32> = self
            .conns
            .keys()
            .chain(self.handshakes.keys())
            .copied()
            .collect();
        for id in ids {
            self.remove(id);
        }
        self.control.clear();
        self.ready.clear();
    }

    pub fn has_rx(&self) -> bool {
        !self.control.is_empty() || !self.ready.is_empty()
    }

    fn alloc_id(&mut self) -> u32 {
        loop {
            let id = self.next_id;
            self.next_id = (self.next_id + 1) % (u32::MAX / 2);
            if !self.conns.contains_key(&id) && !self.handshakes.contains_key(&id) {
                return id;
            }
        }
    }

    fn alloc_local_port(&mut self) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.by_ports.keys().any(|(l, _)| *l == p) {
                return p;
            }
        }
    }

    fn header(&self, c: &Connection, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: c.local_port,
            dst_port: c.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: c.fwd_cnt.0,
        }
    }

    fn push_control(&mut self, h: Header) {
        if self.control.len() >= MAX_CONTROL {
            inc(&self.metrics.control_dropped);
            return;
        }
        if h.op == OP_RST {
            inc(&self.metrics.resets_sent);
        }
        self.control.push_back(h);
    }

    /// An RST answering a packet that belongs to no connection.
    fn reset_reply(&mut self, to: &Header) {
        self.push_control(Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: to.dst_port,
            dst_port: to.src_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Header::default()
        });
    }

    fn watch(&mut self, id: u32, readable: bool, writable: bool) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if c.watch_in == readable && c.watch_out == writable {
            return;
        }
        c.watch_in = readable;
        c.watch_out = writable;
        self.fd_changes.push(FdChange::Modify(FdWatch {
            fd: c.stream.as_raw_fd(),
            token: token(id),
            readable,
            writable,
        }));
    }

    fn remove(&mut self, id: u32) {
        let stream = if let Some(c) = self.conns.remove(&id) {
            self.by_ports.remove(&(c.local_port, c.peer_port));
            Some(c.stream)
        } else {
            self.handshakes.remove(&id).map(|h| h.stream)
        };
        if let Some(s) = stream {
            let fd: RawFd = s.as_raw_fd();
            self.fd_changes.push(FdChange::Remove(fd));
            // Shut it now so the host peer sees the end at once; close after unregistering.
            let _ = s.shutdown(std::net::Shutdown::Both);
            self.graveyard.push(s);
        }
        self.ready.retain(|r| *r != id);
    }

    /// Sends RST for `id` and forgets it.
    fn kill(&mut self, id: u32, why: &str) {
        log::debug!("vsock: resetting connection {id}: {why}");
        if let Some(c) = self.conns.get(&id) {
            let h = self.header(c, OP_RST);
            self.push_control(h);
        }
        self.remove(id);
    }

    // ---- guest → host ----

    /// One packet from the guest: its header and its payload (`h.len` bytes, checked by the
    /// caller against what the descriptors hold).
    pub fn on_guest_packet(&mut self, h: &Header, data: &[u8]) {
        inc(&self.metrics.tx_packets);
        let h = *h;
        log::trace!("vsock: guest packet {h:?}");
        if h.dst_cid != HOST_CID || h.src_cid != self.cid {
            inc(&self.metrics.bad_packets);
            return;
        }
        if h.type_ != TYPE_STREAM {
            inc(&self.metrics.bad_packets);
            if h.op != OP_RST {
                self.reset_reply(&h);
            }
            return;
        }
        let Some(&id) = self.by_ports.get(&(h.dst_port, h.src_port)) else {
            match h.op {
                OP_REQUEST => self.guest_connect(&h),
                OP_RST => {}
                _ => {
                    inc(&self.metrics.unknown_connection);
                    self.reset_reply(&h);
                }
            }
            return;
        };
        let was_stalled = self.conns.get(&id).is_some_and(|c| c.peer_credit() == 0);
        if let Some(c) = self.conns.get_mut(&id) {
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = Wrapping(h.fwd_cnt);
        }
        let state = self.conns.get(&id).map(|c| c.state);
        match (h.op, state) {
            (OP_RESPONSE, Some(State::Connecting)) => self.established(id),
            (OP_RW, Some(State::Established)) => self.guest_data(id, data),
            (OP_CREDIT_UPDATE, _) => {}
            (OP_CREDIT_REQUEST, Some(_)) => {
                if let Some(c) = self.conns.get_mut(&id) {
                    c.last_fwd_reported = c.fwd_cnt;
                    let hdr = self.header(&self.conns[&id], OP_CREDIT_UPDATE);
                    self.push_control(hdr);
                }
            }
            (OP_SHUTDOWN, Some(_)) => self.guest_shutdown(id, h.flags),
            (OP_RST, _) => self.remove(id),
            _ => {
                inc(&self.metrics.bad_packets);
                self.kill(id, "bad data slice");
                return;
            }
        }
        // New credit from the guest: resume reading the host side.
        if was_stalled
            && self
                .conns
                .get(&id)
                .is_some_and(|c| c.peer_credit() > 0 && c.state == State::Established)
        {
            self.ready.push_back(id);
        }
    }

    fn guest_connect(&mut self, h: &Header) {
        if self.conns.len() + self.handshakes.len() >= MAX_CONNECTIONS {
            inc(&self.metrics.connections_refused);
            self.reset_reply(h);
            return;
        }
        let path = format!("{}_{}", self.uds_path.display(), h.dst_port);
        let stream =
            match UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|_| s)) {
                Ok(s) => s,
                Err(e) => {
                    log::debug!(
                        "vsock: guest connect to host port {}: {path}: {e}",
                        h.dst_port
                    );
                    inc(&self.metrics.connections_refused);
                    self.reset_reply(h);
                    return;
                }
            };
        let id = self.alloc_id();
        let c = Connection::new(
            h.dst_port,
            h.src_port,
            stream,
            State::Established,
            h.buf_alloc,
            h.fwd_cnt,
        );
        let hdr = self.header(&c, OP_RESPONSE);
        self.fd_changes.push(FdChange::Add(FdWatch {
            fd: c.stream.as_raw_fd(),
            token: token(id),
            readable: true,
            writable: false,
        }));
        self.by_ports.insert((c.local_port, c.peer_port), id);
        self.conns.insert(id, c);
        inc(&self.metrics.connections_opened);
        self.push_control(hdr);
    }

    fn established(&mut self, id: u32) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let line = format!("OK {}\n", c.local_port);
        if c.stream.write_all(line.as_bytes()).is_err() {
            self.kill(id, "host stream refused the OK line");
            return;
        }
        c.state = State::Established;
        inc(&self.metrics.connections_opened);
        self.watch(id, true, false);
    }

    fn guest_data(&mut self, id: u32, data: &[u8]) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if data.is_empty() {
            return;
        }
        if c.pending.len() + data.len() > BUF_ALLOC as usize {
            // The guest sent beyond the credit we gave it.
            inc(&self.metrics.credit_violations);
            self.kill(id, "guest sent beyond its credit");
            return;
        }
        let mut written = 0;
        if c.pending.is_empty() {
            match c.stream.write(data) {
                Ok(n) => written = n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => {
                    self.kill(id, "host stream write failed");
                    return;
                }
            }
        }
        c.pending.extend(&data[written..]);
        c.fwd_cnt += Wrapping(written as u32);
        let out = !c.pending.is_empty();
        let watch_in = c.watch_in;
        self.watch(id, watch_in, out);
        self.maybe_credit_update(id);
    }

    fn maybe_credit_update(&mut self, id: u32) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if (c.fwd_cnt - c.last_fwd_reported).0 >= BUF_ALLOC / 4 {
            c.last_fwd_reported = c.fwd_cnt;
            let h = self.header(&self.conns[&id], OP_CREDIT_UPDATE);
            self.push_control(h);
        }
    }

    fn guest_shutdown(&mut self, id: u32, flags: u32) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if flags & SHUTDOWN_RCV != 0 {
            c.peer_no_recv = true;
        }
        if flags & SHUTDOWN_SEND != 0 {
            c.peer_no_send = true;
            if c.pending.is_empty() {
                let _ = c.stream.shutdown(std::net::Shutdown::Write);
            } else {
                // What the guest sent before closing still reaches the host.
                c.shut_write_after_flush = true;
            }
        }
        self.maybe_finish(id);
    }

    /// Ends a connection once neither side has anything left to say: the guest sends no more
    /// and all it sent is flushed, and the host sends no more or the guest reads no more.
    fn maybe_finish(&mut self, id: u32) {
        let Some(c) = self.conns.get(&id) else { return };
        if c.peer_no_send && c.pending.is_empty() && (c.host_eof || c.peer_no_recv) {
            self.kill(id, "both sides finished");
        }
    }

    // ---- host → guest ----

    pub fn on_host_event(&mut self, tok: u32, readable: bool, writable: bool, hangup: bool) {
        if tok == LISTENER_TOKEN {
            self.accept_all();
            return;
        }
        let Some(id) = tok.checked_sub(LISTENER_TOKEN + 1) else {
            return;
        };
        if self.handshakes.contains_key(&id) {
            self.handshake(id);
            return;
        }
        if !self.conns.contains_key(&id) {
            return;
        }
        if hangup {
            if let Some(c) = self.conns.get_mut(&id) {
                c.host_hup = true;
            }
        }
        if writable {
            self.flush(id);
        }
        if readable || hangup {
            // Stop watching until the data is delivered: level-triggered readiness would
            // otherwise wake the loop for as long as the guest has no buffers.
            let out = self.conns.get(&id).is_some_and(|c| c.watch_out);
            self.watch(id, false, out);
            if !self.ready.contains(&id) {
                self.ready.push_back(id);
            }
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() + self.handshakes.len() >= MAX_CONNECTIONS
                        || stream.set_nonblocking(true).is_err()
                    {
                        inc(&self.metrics.connections_refused);
                        continue;
                    }
                    let id = self.alloc_id();
                    self.fd_changes.push(FdChange::Add(FdWatch {
                        fd: stream.as_raw_fd(),
                        token: token(id),
                        readable: true,
                        writable: false,
                    }));
                    self.handshakes.insert(
                        id,
                        Handshake {
                            stream,
                            line: Vec::new(),
                        },
                    );
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("vsock: accept: {e}");
                    return;
                }
            }
        }
    }

    /// Reads the `CONNECT <port>\n` line one byte at a time, so no stream data is consumed.
    fn handshake(&mut self, id: u32) {
        let Some(hs) = self.handshakes.get_mut(&id) else {
            return;
        };
        let mut byte = [0u8; 1];
        let port = loop {
            match hs.stream.read(&mut byte) {
                Ok(0) => return self.remove(id),
                Ok(_) if byte[0] == b'\n' => break parse_connect(&hs.line),
                Ok(_) if hs.line.len() >= MAX_HANDSHAKE => break None,
                Ok(_) => hs.line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(_) => return self.remove(id),
            }
        };
        let Some(port) = port else {
            inc(&self.metrics.connections_refused);
            let _ = hs.stream.write_all(b"ERR expected CONNECT <port>\n");
            return self.remove(id);
        };
        let Some(hs) = self.handshakes.remove(&id) else {
            return;
        };
        let local_port = self.alloc_local_port();
        let c = Connection::new(local_port, port, hs.stream, State::Connecting, 0, 0);
        let h = self.header(&c, OP_REQUEST);
        self.by_ports.insert((local_port, port), id);
        self.conns.insert(id, c);
        // Nothing is read from the host until the guest accepts.
        self.watch(id, false, false);
        self.push_control(h);
    }

    fn flush(&mut self, id: u32) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        while !c.pending.is_empty() {
            let (a, _) = c.pending.as_slices();
            match c.stream.write(a) {
                Ok(0) => break,
                Ok(n) => {
                    c.pending.drain(..n);
                    c.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => return self.kill(id, "host stream write failed"),
            }
        }
        let done = c.pending.is_empty();
        if done && c.shut_write_after_flush {
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
            c.shut_write_after_flush = false;
        }
        let watch_in = c.watch_in;
        self.watch(id, watch_in, !done);
        self.maybe_credit_update(id);
        self.maybe_finish(id);
    }

    /// Fills one guest RX buffer; `None` when there is nothing to send after all.
    pub fn fill_rx<B: BitmapSlice>(&mut self, pkt: &mut VsockPacket<'_, B>) -> Option<u32> {
        loop {
            if let Some(h) = self.control.pop_front() {
                log::trace!("vsock: to guest {h:?}");
                h.store(pkt);
                inc(&self.metrics.rx_packets);
                return Some(HEADER_LEN);
            }
            let id = self.ready.pop_front()?;
            let Some(c) = self.conns.get_mut(&id) else {
                continue;
            };
            if c.state != State::Established || c.peer_no_recv || c.host_eof {
                continue;
            }
            let credit = c.peer_credit();
            if credit == 0 {
                // Stalled on the guest's credit: ask for an update; reading resumes on it.
                let h = self.header(&self.conns[&id], OP_CREDIT_REQUEST);
                h.store(pkt);
                inc(&self.metrics.rx_packets);
                return Some(HEADER_LEN);
            }
            let Some(data) = pkt.data_slice() else {
                // A buffer with no room for data: keep the connection first in line.
                self.ready.push_front(id);
                return None;
            };
            let max = (credit as usize).min(data.len()).min(MAX_PKT_DATA as usize);
            let Ok(mut dst) = data.subslice(0, max) else {
                self.ready.push_front(id);
                return None;
            };
            match c.stream.read_volatile(&mut dst) {
                Ok(0) => {
                    // EOF: the host will send no more. It may still read (a half-close), so
                    // only SEND is shut; if it closed entirely, the next write to it fails and
                    // the connection is reset then.
                    c.host_eof = true;
                    let hup = c.host_hup;
                    let mut h = self.header(&self.conns[&id], OP_SHUTDOWN);
                    h.flags = SHUTDOWN_SEND | if hup { SHUTDOWN_RCV } else { 0 };
                    h.store(pkt);
                    inc(&self.metrics.rx_packets);
                    self.maybe_finish(id);
                    return Some(HEADER_LEN);
                }
                Ok(n) => {
                    c.rx_cnt += Wrapping(n as u32);
                    c.last_fwd_reported = c.fwd_cnt;
                    let mut h = self.header(&self.conns[&id], OP_RW);
                    h.len = n as u32;
                    h.store(pkt);
                    // There may be more; stay in line behind the others.
                    self.ready.push_back(id);
                    inc(&self.metrics.rx_packets);
                    return Some(HEADER_LEN + n as u32);
                }
                Err(e) if would_block(&e) => {
                    let out = c.watch_out;
                    self.watch(id, true, out);
                }
                // The host side failed: reset the connection (the RST goes out next).
                Err(_) => self.kill(id, "host stream read failed"),
            }
        }
    }
}

fn would_block(e: &VolatileMemoryError) -> bool {
    matches!(e, VolatileMemoryError::IOError(io) if io.kind() == ErrorKind::WouldBlock)
}

/// `CONNECT <port>` (trailing CR tolerated).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let port = s.strip_prefix("CONNECT ")?;
    port.parse().ok()
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 1024"), Some(1024));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        for bad in [
            &b"CONNECT"[..],
            b"CONNECT -1",
            b"connect 5",
            b"CONNECT 99999999999",
            b"CONNECT 5 6",
            b"\xff",
        ] {
            assert_eq!(parse_connect(bad), None, "{bad:?}");
        }
    }
}
