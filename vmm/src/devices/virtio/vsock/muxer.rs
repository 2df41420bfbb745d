//! The vsock connection multiplexer: which guest ports talk to which host Unix streams, the
//! host side's `CONNECT <port>` handshake, guest connections to `<path>_<port>`, and the
//! packets owed to the guest (control packets first, then data in turn). Bounded everywhere:
//! connections, queued control packets, handshake lines; each connection bounds its buffer.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use thiserror::Error;
use virtio_vsock::packet::VsockPacket;
use vm_memory::bitmap::BitmapSlice;

use super::connection::{Broken, Connection, HostRead, State};
use super::packet::{
    Header, HEADER_LEN, HOST_CID, MAX_PKT_DATA, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST,
    OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use crate::devices::virtio::{FdChange, FdWatch, FIRST_DEVICE_TOKEN};

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

    /// A control packet of `op` on connection `id`, carrying our credit.
    fn push_op(&mut self, id: u32, op: u16) {
        if let Some(h) = self.conns.get(&id).map(|c| c.header(op)) {
            self.push_control(h);
        }
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
        if c.set_watch(readable, writable).is_some() {
            self.fd_changes.push(FdChange::Modify(FdWatch {
                fd: c.fd(),
                token: token(id),
                readable,
                writable,
            }));
        }
    }

    /// Watches for writability exactly while guest bytes wait for the host stream.
    fn watch_pending(&mut self, id: u32) {
        if let Some(c) = self.conns.get(&id) {
            let (readable, _) = c.watching();
            let out = c.has_pending();
            self.watch(id, readable, out);
        }
    }

    fn add_watch(&mut self, id: u32, fd: RawFd) {
        self.fd_changes.push(FdChange::Add(FdWatch {
            fd,
            token: token(id),
            readable: true,
            writable: false,
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
            self.fd_changes.push(FdChange::Remove(s.as_raw_fd()));
            // Shut it now so the host peer sees the end at once; close after unregistering.
            let _ = s.shutdown(std::net::Shutdown::Both);
            self.graveyard.push(s);
        }
        self.ready.retain(|r| *r != id);
    }

    /// Sends RST for `id` and forgets it.
    fn kill(&mut self, id: u32, why: &str) {
        log::debug!("vsock: resetting connection {id}: {why}");
        self.push_op(id, OP_RST);
        self.remove(id);
    }

    fn broken(&mut self, id: u32, b: Broken) {
        if b == Broken::CreditViolation {
            inc(&self.metrics.credit_violations);
        }
        self.kill(id, b.reason());
    }

    fn maybe_credit_update(&mut self, id: u32) {
        if self
            .conns
            .get_mut(&id)
            .is_some_and(Connection::credit_update_due)
        {
            self.push_op(id, OP_CREDIT_UPDATE);
        }
    }

    fn maybe_finish(&mut self, id: u32) {
        if self.conns.get(&id).is_some_and(Connection::finished) {
            self.kill(id, "both sides finished");
        }
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
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let was_stalled = c.peer_credit() == 0;
        c.peer_update(&h);
        match (h.op, c.state) {
            (OP_RESPONSE, State::Connecting) => self.established(id),
            (OP_RW, State::Established) => self.guest_data(id, data),
            (OP_CREDIT_UPDATE, _) => {}
            (OP_CREDIT_REQUEST, _) => {
                c.credit_reported();
                self.push_op(id, OP_CREDIT_UPDATE);
            }
            (OP_SHUTDOWN, _) => {
                c.guest_shutdown(h.flags);
                self.maybe_finish(id);
            }
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
            self.cid,
            stream,
            State::Established,
            h,
        );
        self.add_watch(id, c.fd());
        self.by_ports.insert((c.local_port, c.peer_port), id);
        self.conns.insert(id, c);
        inc(&self.metrics.connections_opened);
        self.push_op(id, OP_RESPONSE);
    }

    fn established(&mut self, id: u32) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if let Err(b) = c.establish() {
            return self.broken(id, b);
        }
        inc(&self.metrics.connections_opened);
        self.watch(id, true, false);
    }

    fn guest_data(&mut self, id: u32, data: &[u8]) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if let Err(b) = c.from_guest(data) {
            return self.broken(id, b);
        }
        self.watch_pending(id);
        self.maybe_credit_update(id);
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
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if hangup {
            c.host_hup = true;
        }
        if writable {
            if let Err(b) = c.flush() {
                return self.broken(id, b);
            }
            self.watch_pending(id);
            self.maybe_credit_update(id);
            self.maybe_finish(id);
        }
        if readable || hangup {
            // Stop watching until the data is delivered: level-triggered readiness would
            // otherwise wake the loop for as long as the guest has no buffers.
            let out = self.conns.get(&id).is_some_and(|c| c.watching().1);
            self.watch(id, false, out);
            if self.conns.contains_key(&id) && !self.ready.contains(&id) {
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
                    self.add_watch(id, stream.as_raw_fd());
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
        let no_credit = Header::default();
        let c = Connection::new(
            local_port,
            port,
            self.cid,
            hs.stream,
            State::Connecting,
            &no_credit,
        );
        self.by_ports.insert((local_port, port), id);
        self.conns.insert(id, c);
        // Nothing is read from the host until the guest accepts.
        self.watch(id, false, false);
        self.push_op(id, OP_REQUEST);
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
            if !c.sends_to_guest() {
                continue;
            }
            let credit = c.peer_credit();
            if credit == 0 {
                // Stalled on the guest's credit: ask for an update; reading resumes on it.
                c.header(OP_CREDIT_REQUEST).store(pkt);
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
            match c.read_for_guest(&mut dst) {
                Ok(HostRead::Eof) => {
                    // The host will send no more. It may still read (a half-close), so only
                    // SEND is shut; if it closed entirely, the next write to it fails and the
                    // connection is reset then.
                    let mut h = c.header(OP_SHUTDOWN);
                    h.flags = SHUTDOWN_SEND | if c.host_hup { SHUTDOWN_RCV } else { 0 };
                    h.store(pkt);
                    inc(&self.metrics.rx_packets);
                    self.maybe_finish(id);
                    return Some(HEADER_LEN);
                }
                Ok(HostRead::Data(n)) => {
                    let mut h = c.header(OP_RW);
                    h.len = n;
                    h.store(pkt);
                    // There may be more; stay in line behind the others.
                    self.ready.push_back(id);
                    inc(&self.metrics.rx_packets);
                    return Some(HEADER_LEN + n);
                }
                Ok(HostRead::WouldBlock) => {
                    let out = c.watching().1;
                    self.watch(id, true, out);
                }
                // The host side failed: reset the connection (the RST goes out next).
                Err(b) => self.broken(id, b),
            }
        }
    }
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
