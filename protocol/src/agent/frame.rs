//! Frames: `len: u32 LE`, `kind: u8`, payload; the cap checked before any allocation. And the
//! bulk-data stream both sides speak — `DATA` frames of at most [`CHUNK`] bytes, then `EOF` —
//! as a `Write` ([`DataWriter`]) and a reader ([`DataReader`]), so no side writes that loop
//! by hand.

use std::io::{self, Read, Write};
/// Largest frame (kind + payload) accepted.
pub const MAX_FRAME: usize = 1 << 20;
/// Size of the bulk data frames senders produce.
pub const CHUNK: usize = 256 << 10;

pub mod kind {
    pub const HELLO: u8 = 1;
    pub const HELLO_OK: u8 = 2;
    pub const REQUEST: u8 = 3;
    pub const DATA: u8 = 4;
    pub const EOF: u8 = 5;
    pub const STDOUT: u8 = 6;
    pub const STDERR: u8 = 7;
    pub const RESIZE: u8 = 8;
    pub const SIGNAL: u8 = 9;
    pub const STARTED: u8 = 10;
    pub const EXIT: u8 = 11;
    pub const ERROR: u8 = 12;
    pub const OK: u8 = 13;
    pub const REPLY: u8 = 14;
    pub const LAST: u8 = REPLY;
}

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("frame of {0} bytes is over the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("frame is truncated")]
    Truncated,
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("invalid message: {0}")]
    Invalid(String),
    #[error("unexpected frame kind {got}, expected {want}")]
    Unexpected { got: u8, want: &'static str },
    #[error("protocol version {got} is not supported (this side speaks {ours})")]
    Version { got: u32, ours: u32 },
}

/// Writes one frame.
pub fn write_frame<W: Write + ?Sized>(w: &mut W, kind: u8, payload: &[u8]) -> io::Result<()> {
    let len = payload.len() + 1;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("frame of {len} bytes is over the {MAX_FRAME}-byte limit"),
        ));
    }
    let mut head = [0u8; 5];
    head[..4].copy_from_slice(&(len as u32).to_le_bytes());
    head[4] = kind;
    // Header and payload in one system call where the writer takes both.
    let mut slices = [io::IoSlice::new(&head), io::IoSlice::new(payload)];
    let mut bufs = &mut slices[..];
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads one frame into `buf` (reused) and returns its kind. `Ok(None)` is a clean end of
/// stream before a frame started.
pub fn read_frame<R: Read + ?Sized>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Option<u8>, ProtoError> {
    let mut head = [0u8; 5];
    let mut got = 0;
    while got < head.len() {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(ProtoError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if len > MAX_FRAME {
        return Err(ProtoError::TooLarge(len));
    }
    if len == 0 {
        return Err(ProtoError::Invalid("empty frame".into()));
    }
    let kind = head[4];
    if kind == 0 || kind > kind::LAST {
        return Err(ProtoError::UnknownKind(kind));
    }
    // Reused without zeroing what read_exact overwrites anyway: a memset of every payload
    // cost as much as the copy itself.
    if buf.len() < len - 1 {
        buf.resize(len - 1, 0);
    } else {
        buf.truncate(len - 1);
    }
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ProtoError::Truncated
        } else {
            e.into()
        }
    })?;
    Ok(Some(kind))
}

/// Sends a byte stream as `DATA` frames of at most [`CHUNK`] bytes; [`DataWriter::finish`]
/// sends the `EOF`. Each `write` is one frame: wrap it in a `BufWriter` of `CHUNK` bytes to
/// turn small writes into full frames.
pub struct DataWriter<W: Write> {
    inner: W,
}

impl<W: Write> DataWriter<W> {
    pub fn new(inner: W) -> Self {
        DataWriter { inner }
    }

    /// Ends the stream with `EOF` and hands the writer back.
    pub fn finish(mut self) -> io::Result<W> {
        write_frame(&mut self.inner, kind::EOF, &[])?;
        Ok(self.inner)
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }
}

impl<W: Write> Write for DataWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = buf.len().min(CHUNK);
        write_frame(&mut self.inner, kind::DATA, &buf[..n])?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Reads a `DATA`… `EOF` stream. [`DataReader::next_chunk`] hands out each payload without a
/// copy; the `Read` impl serves byte-stream consumers. A frame of any other kind ends the
/// stream with [`ProtoError::Unexpected`], and [`DataReader::payload`] then holds that
/// frame's payload (an `ERROR` frame's details, say).
pub struct DataReader<'a, R: Read + ?Sized> {
    r: &'a mut R,
    buf: &'a mut Vec<u8>,
    /// Bytes of the current payload already handed out through `Read`.
    pos: usize,
    state: StreamState,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum StreamState {
    Open,
    Ended,
    /// Ended by a frame of this kind, whose payload is in `buf`.
    Other(u8),
}

impl<'a, R: Read + ?Sized> DataReader<'a, R> {
    /// Reads from `r`, using `buf` (reused) for payloads.
    pub fn new(r: &'a mut R, buf: &'a mut Vec<u8>) -> Self {
        buf.clear();
        DataReader {
            r,
            buf,
            pos: 0,
            state: StreamState::Open,
        }
    }

    /// The next `DATA` payload, `None` at `EOF`.
    pub fn next_chunk(&mut self) -> Result<Option<&[u8]>, ProtoError> {
        match self.state {
            StreamState::Open => {}
            StreamState::Ended => return Ok(None),
            StreamState::Other(k) => return Err(unexpected(k)),
        }
        self.pos = 0;
        match read_frame(self.r, self.buf)? {
            Some(kind::DATA) => Ok(Some(self.buf.as_slice())),
            Some(kind::EOF) => {
                self.state = StreamState::Ended;
                self.buf.clear();
                Ok(None)
            }
            Some(k) => {
                self.state = StreamState::Other(k);
                Err(unexpected(k))
            }
            None => Err(ProtoError::Truncated),
        }
    }

    /// The frame that ended the stream when it was not `EOF`: its kind and payload.
    pub fn ended_by(&self) -> Option<(u8, &[u8])> {
        match self.state {
            StreamState::Other(k) => Some((k, self.buf.as_slice())),
            _ => None,
        }
    }

    /// The payload of the frame that ended the stream (see [`Self::ended_by`]).
    pub fn payload(&self) -> &[u8] {
        self.buf
    }

    /// Copies the rest of the stream into `dst`; on failure, [`CopyError`] says which side
    /// failed.
    pub fn copy_to(&mut self, dst: &mut impl Write) -> Result<u64, CopyError> {
        let mut total = 0u64;
        if self.pos < self.buf.len() {
            dst.write_all(&self.buf[self.pos..])
                .map_err(CopyError::Sink)?;
            total += (self.buf.len() - self.pos) as u64;
            self.pos = self.buf.len();
        }
        while let Some(chunk) = self.next_chunk().map_err(CopyError::Stream)? {
            dst.write_all(chunk).map_err(CopyError::Sink)?;
            total += chunk.len() as u64;
        }
        Ok(total)
    }
}

fn unexpected(got: u8) -> ProtoError {
    ProtoError::Unexpected {
        got,
        want: "DATA or EOF",
    }
}

/// Which side of a [`DataReader::copy_to`] failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    Stream(ProtoError),
    #[error("writing what was received: {0}")]
    Sink(io::Error),
}

impl<R: Read + ?Sized> Read for DataReader<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos >= self.buf.len() {
            match self.next_chunk() {
                Ok(Some(_)) => {}
                Ok(None) => return Ok(0),
                Err(ProtoError::Io(e)) => return Err(e),
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_hostile_bytes_are_errors() {
        let mut wire = Vec::new();
        write_frame(&mut wire, kind::DATA, b"hello").unwrap();
        write_frame(&mut wire, kind::EOF, b"").unwrap();
        let mut r = &wire[..];
        let mut buf = Vec::new();
        assert_eq!(read_frame(&mut r, &mut buf).unwrap(), Some(kind::DATA));
        assert_eq!(buf, b"hello");
        assert_eq!(read_frame(&mut r, &mut buf).unwrap(), Some(kind::EOF));
        assert_eq!(read_frame(&mut r, &mut buf).unwrap(), None);

        // Over the cap: refused before any allocation.
        let mut big = ((MAX_FRAME + 1) as u32).to_le_bytes().to_vec();
        big.push(kind::DATA);
        assert!(matches!(
            read_frame(&mut &big[..], &mut buf),
            Err(ProtoError::TooLarge(_))
        ));
        let mut huge = u32::MAX.to_le_bytes().to_vec();
        huge.push(kind::DATA);
        assert!(matches!(
            read_frame(&mut &huge[..], &mut buf),
            Err(ProtoError::TooLarge(_))
        ));
        // Truncated header and body.
        assert!(matches!(
            read_frame(&mut &[5u8, 0, 0][..], &mut buf),
            Err(ProtoError::Truncated)
        ));
        assert!(matches!(
            read_frame(&mut &[9u8, 0, 0, 0, kind::DATA, 1, 2][..], &mut buf),
            Err(ProtoError::Truncated)
        ));
        // Unknown kind, empty frame.
        assert!(matches!(
            read_frame(&mut &[1u8, 0, 0, 0, 99][..], &mut buf),
            Err(ProtoError::UnknownKind(99))
        ));
        assert!(matches!(
            read_frame(&mut &[0u8, 0, 0, 0, 1][..], &mut buf),
            Err(ProtoError::Invalid(_))
        ));
        // A writer refuses to produce an over-cap frame.
        assert!(write_frame(&mut Vec::new(), kind::DATA, &vec![0; MAX_FRAME]).is_err());
    }

    #[test]
    fn data_streams_round_trip_through_the_adapters() {
        let big: Vec<u8> = (0..CHUNK * 2 + 100).map(|i| (i % 253) as u8).collect();
        let mut w = DataWriter::new(Vec::new());
        w.write_all(&big).unwrap();
        w.write_all(b"").unwrap();
        let wire = w.finish().unwrap();
        // Three DATA frames (two full, one of 100 bytes) and EOF.
        let mut r = &wire[..];
        let mut buf = Vec::new();
        let mut sizes = Vec::new();
        let mut d = DataReader::new(&mut r, &mut buf);
        while let Some(c) = d.next_chunk().unwrap() {
            sizes.push(c.len());
        }
        assert_eq!(sizes, vec![CHUNK, CHUNK, 100]);
        // Through Read, in small pieces.
        let mut r = &wire[..];
        let mut got = Vec::new();
        let mut small = [0u8; 1000];
        let mut d = DataReader::new(&mut r, &mut buf);
        loop {
            let n = d.read(&mut small).unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&small[..n]);
        }
        assert!(got == big);
        // copy_to
        let mut r = &wire[..];
        let mut out = Vec::new();
        assert_eq!(
            DataReader::new(&mut r, &mut buf).copy_to(&mut out).unwrap(),
            big.len() as u64
        );
        assert!(out == big);
    }

    #[test]
    fn a_data_stream_ended_by_another_frame_or_cut_is_an_error() {
        let mut wire = Vec::new();
        write_frame(&mut wire, kind::DATA, b"part").unwrap();
        write_frame(&mut wire, kind::ERROR, b"details").unwrap();
        let mut r = &wire[..];
        let mut buf = Vec::new();
        let mut d = DataReader::new(&mut r, &mut buf);
        let mut out = Vec::new();
        assert!(matches!(
            d.copy_to(&mut out),
            Err(CopyError::Stream(ProtoError::Unexpected {
                got: kind::ERROR,
                ..
            }))
        ));
        assert_eq!(out, b"part");
        assert_eq!(d.ended_by(), Some((kind::ERROR, &b"details"[..])));
        // Cut before EOF.
        let mut wire = Vec::new();
        write_frame(&mut wire, kind::DATA, b"part").unwrap();
        let mut r = &wire[..];
        let mut d = DataReader::new(&mut r, &mut buf);
        assert_eq!(d.next_chunk().unwrap(), Some(&b"part"[..]));
        assert!(matches!(d.next_chunk(), Err(ProtoError::Truncated)));
        // A sink that fails is the sink's error, not the stream's.
        let mut wire = Vec::new();
        write_frame(&mut wire, kind::DATA, b"x").unwrap();
        let mut r = &wire[..];
        let mut full = [0u8; 0];
        let mut sink = &mut full[..];
        assert!(matches!(
            DataReader::new(&mut r, &mut buf).copy_to(&mut sink),
            Err(CopyError::Sink(_))
        ));
    }
}
