//! One vsock stream between a guest port and a host Unix stream: credit flow control in both
//! directions, the guest's bytes the host has not taken yet (bounded by the credit we gave),
//! and the half-close states of both sides. The muxer owns the connections and decides when
//! they are created and ended; a connection only moves bytes and keeps its counters.

use std::collections::VecDeque;
use std::io::{ErrorKind, Write};
use std::num::Wrapping;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice};

use super::packet::{Header, BUF_ALLOC, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent, waiting for the guest's RESPONSE.
    Connecting,
    Established,
}

/// Why a connection must be reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Broken {
    /// The guest sent beyond the credit we gave it.
    CreditViolation,
    /// The host stream refused a write (it closed).
    HostWrite,
    /// The host stream failed a read.
    HostRead,
}

impl Broken {
    pub fn reason(self) -> &'static str {
        match self {
            Broken::CreditViolation => "guest sent beyond its credit",
            Broken::HostWrite => "host stream write failed",
            Broken::HostRead => "host stream read failed",
        }
    }
}

/// What reading the host stream for the guest gave.
pub enum HostRead {
    /// `n` bytes are in the buffer.
    Data(u32),
    /// The host will send no more.
    Eof,
    /// Nothing now.
    WouldBlock,
}

pub struct Connection {
    pub local_port: u32,
    pub peer_port: u32,
    guest_cid: u64,
    pub stream: UnixStream,
    pub state: State,
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
    pub peer_no_recv: bool,
    /// The host stream reached EOF (the host shut its writing side, or closed).
    pub host_eof: bool,
    /// The host stream hung up entirely (it will not read either).
    pub host_hup: bool,
    /// The guest will send no more.
    peer_no_send: bool,
    watch_in: bool,
    watch_out: bool,
}

impl Connection {
    pub fn new(
        local_port: u32,
        peer_port: u32,
        guest_cid: u64,
        stream: UnixStream,
        state: State,
        peer: &Header,
    ) -> Self {
        Connection {
            local_port,
            peer_port,
            guest_cid,
            stream,
            state,
            peer_buf_alloc: peer.buf_alloc,
            peer_fwd_cnt: Wrapping(peer.fwd_cnt),
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

    pub fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// A header from the host side of this connection, with our credit in it.
    pub fn header(&self, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// Bytes the guest can still take on this connection.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Every guest packet carries its credit.
    pub fn peer_update(&mut self, h: &Header) {
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = Wrapping(h.fwd_cnt);
    }

    /// The readiness we want from the host stream; `Some` when it changed (the event loop
    /// must be told).
    pub fn set_watch(&mut self, readable: bool, writable: bool) -> Option<(bool, bool)> {
        if self.watch_in == readable && self.watch_out == writable {
            return None;
        }
        self.watch_in = readable;
        self.watch_out = writable;
        Some((readable, writable))
    }

    pub fn watching(&self) -> (bool, bool) {
        (self.watch_in, self.watch_out)
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The guest accepted a host-initiated connection: the host client hears `OK <port>`.
    pub fn establish(&mut self) -> Result<(), Broken> {
        let line = format!("OK {}\n", self.local_port);
        self.stream
            .write_all(line.as_bytes())
            .map_err(|_| Broken::HostWrite)?;
        self.state = State::Established;
        Ok(())
    }

    /// Guest bytes for the host: written at once where the stream takes them, the rest kept
    /// (never more than the credit we gave).
    pub fn from_guest(&mut self, data: &[u8]) -> Result<(), Broken> {
        if data.is_empty() {
            return Ok(());
        }
        if self.pending.len() + data.len() > BUF_ALLOC as usize {
            return Err(Broken::CreditViolation);
        }
        let mut written = 0;
        if self.pending.is_empty() {
            match self.stream.write(data) {
                Ok(n) => written = n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => return Err(Broken::HostWrite),
            }
        }
        self.pending.extend(&data[written..]);
        self.fwd_cnt += Wrapping(written as u32);
        Ok(())
    }

    /// Writes what the host stream will take of the kept guest bytes; shuts the stream's write
    /// side once they are all out and the guest has said it sends no more.
    pub fn flush(&mut self) -> Result<(), Broken> {
        while !self.pending.is_empty() {
            let (a, _) = self.pending.as_slices();
            match self.stream.write(a) {
                Ok(0) => break,
                Ok(n) => {
                    self.pending.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => return Err(Broken::HostWrite),
            }
        }
        if self.pending.is_empty() && self.shut_write_after_flush {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
            self.shut_write_after_flush = false;
        }
        Ok(())
    }

    /// Whether the guest should hear how much we consumed: once a quarter of the buffer was
    /// taken since the last report (which this then records).
    pub fn credit_update_due(&mut self) -> bool {
        if (self.fwd_cnt - self.last_fwd_reported).0 >= BUF_ALLOC / 4 {
            self.last_fwd_reported = self.fwd_cnt;
            return true;
        }
        false
    }

    /// The guest asked for our credit: it is reported now.
    pub fn credit_reported(&mut self) {
        self.last_fwd_reported = self.fwd_cnt;
    }

    pub fn guest_shutdown(&mut self, flags: u32) {
        if flags & SHUTDOWN_RCV != 0 {
            self.peer_no_recv = true;
        }
        if flags & SHUTDOWN_SEND != 0 {
            self.peer_no_send = true;
            if self.pending.is_empty() {
                let _ = self.stream.shutdown(std::net::Shutdown::Write);
            } else {
                // What the guest sent before closing still reaches the host.
                self.shut_write_after_flush = true;
            }
        }
    }

    /// Neither side has anything left to say: the guest sends no more and all it sent is
    /// flushed, and the host sends no more or the guest reads no more.
    pub fn finished(&self) -> bool {
        self.peer_no_send && self.pending.is_empty() && (self.host_eof || self.peer_no_recv)
    }

    /// Whether host bytes may go to the guest now (credit aside).
    pub fn sends_to_guest(&self) -> bool {
        self.state == State::Established && !self.peer_no_recv && !self.host_eof
    }

    /// Reads host bytes into a guest buffer (at most the guest's credit, which the caller
    /// sized `dst` to). At EOF the connection remembers the host's end.
    pub fn read_for_guest(
        &mut self,
        dst: &mut VolatileSlice<'_, impl vm_memory::bitmap::BitmapSlice>,
    ) -> Result<HostRead, Broken> {
        match self.stream.read_volatile(dst) {
            Ok(0) => {
                self.host_eof = true;
                Ok(HostRead::Eof)
            }
            Ok(n) => {
                self.rx_cnt += Wrapping(n as u32);
                // The RW header carries our fwd_cnt: that is a report too.
                self.last_fwd_reported = self.fwd_cnt;
                Ok(HostRead::Data(n as u32))
            }
            Err(e) if would_block(&e) => Ok(HostRead::WouldBlock),
            Err(_) => Err(Broken::HostRead),
        }
    }
}

fn would_block(e: &VolatileMemoryError) -> bool {
    matches!(e, VolatileMemoryError::IOError(io) if io.kind() == ErrorKind::WouldBlock)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let peer = Header {
            buf_alloc: 1000,
            fwd_cnt: 0,
            ..Default::default()
        };
        (Connection::new(5, 1024, 3, a, State::Established, &peer), b)
    }

    #[test]
    fn credit_counts_what_the_guest_has_not_consumed() {
        let (mut c, _peer) = conn();
        assert_eq!(c.peer_credit(), 1000);
        c.rx_cnt += Wrapping(600);
        assert_eq!(c.peer_credit(), 400);
        c.peer_update(&Header {
            buf_alloc: 1000,
            fwd_cnt: 500,
            ..Default::default()
        });
        assert_eq!(c.peer_credit(), 900);
        // Counters wrap; credit never goes negative.
        c.rx_cnt = Wrapping(u32::MAX);
        c.peer_fwd_cnt = Wrapping(u32::MAX - 2000);
        assert_eq!(c.peer_credit(), 0);
    }

    #[test]
    fn guest_bytes_beyond_the_credit_or_to_a_gone_host_break_the_connection() {
        let (mut c, peer) = conn();
        drop(peer);
        assert_eq!(c.from_guest(b"x"), Err(Broken::HostWrite));
        // A host that does not read: bytes are kept up to the credit we gave, then refused.
        let (mut c, _peer) = conn();
        let chunk = vec![0u8; 64 * 1024];
        let mut sent = 0usize;
        let err = loop {
            match c.from_guest(&chunk) {
                Ok(()) => sent += chunk.len(),
                Err(e) => break e,
            }
            assert!(sent < 64 << 20, "never refused");
        };
        assert_eq!(err, Broken::CreditViolation);
        assert!(c.pending.len() <= BUF_ALLOC as usize);
        assert!(c.has_pending());
    }

    #[test]
    fn a_connection_finishes_when_both_sides_are_done() {
        let (mut c, _peer) = conn();
        assert!(!c.finished());
        c.guest_shutdown(SHUTDOWN_SEND);
        assert!(!c.finished(), "the host may still send");
        c.host_eof = true;
        assert!(c.finished());
        let (mut c, _peer) = conn();
        c.guest_shutdown(SHUTDOWN_SEND | SHUTDOWN_RCV);
        assert!(c.finished());
        assert!(!c.sends_to_guest());
    }

    #[test]
    fn credit_updates_are_due_every_quarter_buffer() {
        let (mut c, _peer) = conn();
        assert!(!c.credit_update_due());
        c.fwd_cnt += Wrapping(BUF_ALLOC / 4);
        assert!(c.credit_update_due());
        assert!(!c.credit_update_due());
    }
}
