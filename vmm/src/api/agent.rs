//! The host side of the agent protocol (`vmrun_protocol::agent`): typed calls, one connection
//! each, over any stream — the VMM's hybrid-vsock socket for a VM, a Unix socket in host tests.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use thiserror::Error;
use vmrun_protocol::agent::frame::CopyError;
use vmrun_protocol::agent::{
    kind, read_frame, write_frame, DataReader, DataWriter, ErrorInfo, ErrorKind, Exec, ExitStatus,
    ProtoError, Reply, Request, StatInfo, Upload, CHUNK, VERSION,
};

#[derive(Debug, Error)]
pub enum AgentError {
    #[error("cannot reach the agent: {0}")]
    Connect(io::Error),
    #[error("agent protocol: {0}")]
    Protocol(#[from] ProtoError),
    /// The connection ended where a reply was due: the agent (or the VM) went away, or the
    /// guest reset the connection. The guest console says which.
    #[error("the agent closed the connection before sending {0}")]
    Closed(&'static str),
    /// The agent reported a failure (with the OS error where there is one).
    #[error("{0}")]
    Remote(ErrorInfo),
    #[error("command output over {0} bytes; use the streaming exec")]
    OutputTooLarge(usize),
    /// Input for a command started without stdin, which would never read it.
    #[error("the command was started without stdin: set `stdin: true` in its Exec to write to it")]
    NoStdin,
    #[error("local {what}: {source}")]
    Local {
        what: &'static str,
        source: io::Error,
    },
}

impl AgentError {
    /// The agent-side error, if that is what this is.
    pub fn remote(&self) -> Option<&ErrorInfo> {
        match self {
            AgentError::Remote(e) => Some(e),
            _ => None,
        }
    }

    /// The connection itself failed (as opposed to the agent reporting an error): the VM may
    /// have stopped.
    pub fn is_connection(&self) -> bool {
        matches!(
            self,
            AgentError::Connect(_)
                | AgentError::Closed(_)
                | AgentError::Protocol(ProtoError::Io(_) | ProtoError::Truncated)
        )
    }
}

/// How to open a stream to the agent.
#[derive(Clone, Debug)]
pub enum Endpoint {
    /// The agent listening on a Unix socket (host tests).
    Unix(PathBuf),
    /// The VMM's hybrid-vsock socket: `CONNECT <port>\n`, `OK <port>\n`.
    Vsock { uds: PathBuf, port: u32 },
}

impl Endpoint {
    pub fn connect(&self) -> io::Result<UnixStream> {
        match self {
            Endpoint::Unix(p) => UnixStream::connect(p),
            Endpoint::Vsock { uds, port } => {
                let mut s = UnixStream::connect(uds)?;
                // A guest still booting cannot answer yet: do not wait on it for long.
                s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
                s.write_all(format!("CONNECT {port}\n").as_bytes())?;
                // The reply is short; read it byte by byte so no agent bytes are consumed.
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while line.len() < 64 {
                    if s.read(&mut b)? == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::ConnectionRefused,
                            format!("vsock port {port}: nothing listens in the guest"),
                        ));
                    }
                    if b[0] == b'\n' {
                        break;
                    }
                    line.push(b[0]);
                }
                s.set_read_timeout(None)?;
                if !line.starts_with(b"OK ") {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        format!("vsock port {port}: {}", String::from_utf8_lossy(&line)),
                    ));
                }
                Ok(s)
            }
        }
    }
}

/// What a finished command produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Events of a running command.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(ExitStatus),
}

/// A running command: send input, resize, signal; read its events until `Exit`.
pub struct Process {
    pid: u32,
    reader: UnixStream,
    input: ProcessInput,
    buf: Vec<u8>,
    done: bool,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends bytes to the command's stdin.
    pub fn write_stdin(&self, data: &[u8]) -> Result<(), AgentError> {
        self.input.write_stdin(data)
    }

    /// Closes the command's stdin.
    pub fn close_stdin(&self) -> Result<(), AgentError> {
        self.input.close_stdin()
    }

    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), AgentError> {
        self.input.resize(rows, cols)
    }

    /// Signals the command's process group.
    pub fn signal(&self, sig: i32) -> Result<(), AgentError> {
        self.input.signal(sig)
    }

    /// A handle that can send input and signals from another thread.
    pub fn input(&self) -> ProcessInput {
        self.input.clone()
    }

    /// The next event; `None` after `Exit`.
    pub fn next_event(&mut self) -> Result<Option<Event>, AgentError> {
        if self.done {
            return Ok(None);
        }
        match read_frame(&mut self.reader, &mut self.buf)? {
            Some(kind::STDOUT) => Ok(Some(Event::Stdout(std::mem::take(&mut self.buf)))),
            Some(kind::STDERR) => Ok(Some(Event::Stderr(std::mem::take(&mut self.buf)))),
            Some(kind::EXIT) => {
                self.done = true;
                Ok(Some(Event::Exit(ExitStatus::decode(&self.buf)?)))
            }
            Some(kind::ERROR) => Err(AgentError::Remote(ErrorInfo::decode(&self.buf)?)),
            Some(k) => Err(ProtoError::Unexpected {
                got: k,
                want: "STDOUT, STDERR or EXIT",
            }
            .into()),
            None => Err(AgentError::Closed("the command's exit status")),
        }
    }

    /// Reads events to the end, keeping at most `max` bytes of output.
    pub fn wait_output(mut self, max: usize) -> Result<Output, AgentError> {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        while let Some(ev) = self.next_event()? {
            match ev {
                Event::Stdout(b) => stdout.extend_from_slice(&b),
                Event::Stderr(b) => stderr.extend_from_slice(&b),
                Event::Exit(status) => {
                    return Ok(Output {
                        status,
                        stdout,
                        stderr,
                    })
                }
            }
            if stdout.len() + stderr.len() > max {
                return Err(AgentError::OutputTooLarge(max));
            }
        }
        Err(AgentError::Closed("the command's exit status"))
    }
}

/// Input side of a [`Process`], usable from another thread.
#[derive(Clone)]
pub struct ProcessInput {
    writer: Arc<Mutex<UnixStream>>,
    /// Whether the command was started with stdin (`Exec::stdin`); the agent drops input
    /// otherwise, so sending it is refused here instead of lost.
    stdin: bool,
}

impl ProcessInput {
    fn send(&self, k: u8, payload: &[u8]) -> Result<(), AgentError> {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        write_frame(&mut *w, k, payload).map_err(|e| AgentError::Protocol(e.into()))
    }

    /// Sends bytes to the command's stdin, all of it before any other input.
    pub fn write_stdin(&self, data: &[u8]) -> Result<(), AgentError> {
        if !self.stdin {
            return Err(AgentError::NoStdin);
        }
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        for c in data.chunks(CHUNK) {
            write_frame(&mut *w, kind::DATA, c).map_err(|e| AgentError::Protocol(e.into()))?;
        }
        Ok(())
    }

    /// Closes the command's stdin.
    pub fn close_stdin(&self) -> Result<(), AgentError> {
        if !self.stdin {
            return Err(AgentError::NoStdin);
        }
        self.send(kind::EOF, &[])
    }

    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), AgentError> {
        let mut p = rows.to_le_bytes().to_vec();
        p.extend_from_slice(&cols.to_le_bytes());
        self.send(kind::RESIZE, &p)
    }

    /// Signals the command's process group.
    pub fn signal(&self, sig: i32) -> Result<(), AgentError> {
        self.send(kind::SIGNAL, &sig.to_le_bytes())
    }
}

/// Default cap on collected output of [`AgentClient::exec`].
pub const DEFAULT_MAX_OUTPUT: usize = 64 << 20;

#[derive(Clone, Debug)]
pub struct AgentClient {
    endpoint: Endpoint,
}

fn expect(
    got: Option<u8>,
    want_kind: u8,
    want: &'static str,
    buf: &[u8],
) -> Result<(), AgentError> {
    match got {
        Some(k) if k == want_kind => Ok(()),
        Some(kind::ERROR) => Err(AgentError::Remote(ErrorInfo::decode(buf)?)),
        Some(k) => Err(ProtoError::Unexpected { got: k, want }.into()),
        None => Err(AgentError::Closed(want)),
    }
}

impl AgentClient {
    pub fn new(endpoint: Endpoint) -> Self {
        AgentClient { endpoint }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Connects, says HELLO and sends the request.
    fn open(&self, req: &Request) -> Result<(UnixStream, Vec<u8>), AgentError> {
        let mut s = self.endpoint.connect().map_err(AgentError::Connect)?;
        let mut buf = Vec::new();
        write_frame(&mut s, kind::HELLO, &VERSION.to_le_bytes())
            .map_err(|e| AgentError::Protocol(e.into()))?;
        let k = read_frame(&mut s, &mut buf)?;
        expect(k, kind::HELLO_OK, "HELLO_OK", &buf)?;
        write_frame(&mut s, kind::REQUEST, &req.encode())
            .map_err(|e| AgentError::Protocol(e.into()))?;
        Ok((s, buf))
    }

    /// Starts a command and returns it running.
    pub fn spawn(&self, x: Exec) -> Result<Process, AgentError> {
        let stdin = x.stdin;
        let (mut s, mut buf) = self.open(&Request::Exec(x))?;
        let k = read_frame(&mut s, &mut buf)?;
        expect(k, kind::STARTED, "STARTED", &buf)?;
        let pid = <[u8; 4]>::try_from(buf.as_slice())
            .map(u32::from_le_bytes)
            .map_err(|_| ProtoError::Invalid("STARTED payload".into()))?;
        let writer = s.try_clone().map_err(|e| AgentError::Local {
            what: "socket",
            source: e,
        })?;
        Ok(Process {
            pid,
            reader: s,
            input: ProcessInput {
                writer: Arc::new(Mutex::new(writer)),
                stdin,
            },
            buf,
            done: false,
        })
    }

    /// Runs a command to its end with `stdin` as input and collects its output (up to
    /// [`DEFAULT_MAX_OUTPUT`] bytes).
    pub fn exec(&self, mut x: Exec, stdin: Option<&[u8]>) -> Result<Output, AgentError> {
        x.stdin = stdin.is_some();
        let p = self.spawn(x)?;
        if let Some(data) = stdin {
            // Written from a thread so a command that talks back while reading cannot deadlock
            // with us.
            let input = p.input();
            let data = data.to_vec();
            let t = std::thread::spawn(move || {
                let _ = input.write_stdin(&data);
                let _ = input.close_stdin();
            });
            let out = p.wait_output(DEFAULT_MAX_OUTPUT);
            let _ = t.join();
            return out;
        }
        p.wait_output(DEFAULT_MAX_OUTPUT)
    }

    /// Streams `src` into `path` in the guest. Returns the bytes written.
    pub fn upload(
        &self,
        path: &str,
        mode: u32,
        create_parents: bool,
        fsync: bool,
        mut src: impl Read,
    ) -> Result<u64, AgentError> {
        let req = Request::Upload(Upload {
            path: path.into(),
            mode,
            create_parents,
            fsync,
        });
        let (mut s, mut buf) = self.open(&req)?;
        let k = read_frame(&mut s, &mut buf)?;
        expect(k, kind::OK, "OK", &buf)?;
        let mut chunk = vec![0u8; CHUNK];
        let mut out = DataWriter::new(&mut s);
        loop {
            let n = match src.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(AgentError::Local {
                        what: "upload source",
                        source: e,
                    })
                }
            };
            if let Err(e) = out.write_all(&chunk[..n]) {
                // The agent may have stopped reading because it failed (ENOSPC): its error is
                // the better answer.
                return Err(match read_frame(out.get_mut(), &mut buf) {
                    Ok(Some(kind::ERROR)) => AgentError::Remote(ErrorInfo::decode(&buf)?),
                    _ => AgentError::Protocol(e.into()),
                });
            }
        }
        out.finish().map_err(|e| AgentError::Protocol(e.into()))?;
        let k = read_frame(&mut s, &mut buf)?;
        expect(k, kind::OK, "OK", &buf)?;
        <[u8; 8]>::try_from(buf.as_slice())
            .map(u64::from_le_bytes)
            .map_err(|_| ProtoError::Invalid("upload OK payload".into()).into())
    }

    /// Streams `path` from the guest into `dst`. Returns (bytes, mode).
    pub fn download(&self, path: &str, mut dst: impl Write) -> Result<(u64, u32), AgentError> {
        let (mut s, mut buf) = self.open(&Request::Download { path: path.into() })?;
        let k = read_frame(&mut s, &mut buf)?;
        expect(k, kind::REPLY, "REPLY", &buf)?;
        let Reply::File { mode, .. } = Reply::decode(&buf)? else {
            return Err(ProtoError::Invalid("download reply".into()).into());
        };
        let total = copy_data(&mut s, &mut buf, &mut dst)?;
        Ok((total, mode))
    }

    /// Streams a tar of the guest's overlay upper layer into `dst`. Returns its size.
    pub fn capture(&self, mut dst: impl Write) -> Result<u64, AgentError> {
        let (mut s, mut buf) = self.open(&Request::Capture)?;
        copy_data(&mut s, &mut buf, &mut dst)
    }

    /// Streams a tar of a guest file or tree into `dst` (entries named from the path's last
    /// component). Returns its size.
    pub fn archive_out(&self, path: &str, mut dst: impl Write) -> Result<u64, AgentError> {
        let (mut s, mut buf) = self.open(&Request::ArchiveOut { path: path.into() })?;
        copy_data(&mut s, &mut buf, &mut dst)
    }

    /// Unpacks the tar that `fill` writes into the guest directory `path` (made with its
    /// parents). Returns (entries, file bytes) as the agent counted them.
    pub fn archive_in(
        &self,
        path: &str,
        fill: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    ) -> Result<(u64, u64), AgentError> {
        let (mut s, mut buf) = self.open(&Request::ArchiveIn { path: path.into() })?;
        let k = read_frame(&mut s, &mut buf)?;
        expect(k, kind::OK, "OK", &buf)?;
        let mut w = io::BufWriter::with_capacity(CHUNK, DataWriter::new(&mut s));
        let sent = fill(&mut w).and_then(|()| w.flush());
        if let Err(e) = sent {
            // The agent may have refused an entry and stopped reading: its error is better.
            drop(w);
            return Err(match read_frame(&mut s, &mut buf) {
                Ok(Some(kind::ERROR)) => AgentError::Remote(ErrorInfo::decode(&buf)?),
                _ => AgentError::Local {
                    what: "archive source",
                    source: e,
                },
            });
        }
        let w = w
            .into_inner()
            .map_err(|e| AgentError::Protocol(e.into_error().into()))?;
        w.finish().map_err(|e| AgentError::Protocol(e.into()))?;
        let k = read_frame(&mut s, &mut buf)?;
        expect(k, kind::OK, "OK", &buf)?;
        let word = |r: std::ops::Range<usize>| {
            buf.get(r)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_le_bytes)
                .ok_or_else(|| ProtoError::Invalid("unpack OK payload".into()))
        };
        if buf.len() != 16 {
            return Err(ProtoError::Invalid("unpack OK payload".into()).into());
        }
        Ok((word(0..8)?, word(8..16)?))
    }

    pub fn stat(&self, path: &str) -> Result<StatInfo, AgentError> {
        match self.call(Request::Stat { path: path.into() })? {
            Some(Reply::Stat(s)) => Ok(s),
            _ => Err(ProtoError::Invalid("stat reply".into()).into()),
        }
    }

    pub fn list(&self, path: &str) -> Result<Vec<(String, StatInfo)>, AgentError> {
        match self.call(Request::List { path: path.into() })? {
            Some(Reply::List(v)) => Ok(v),
            _ => Err(ProtoError::Invalid("list reply".into()).into()),
        }
    }

    pub fn mkdir(&self, path: &str, mode: u32, parents: bool) -> Result<(), AgentError> {
        self.call(Request::Mkdir {
            path: path.into(),
            mode,
            parents,
        })
        .map(drop)
    }

    pub fn remove(&self, path: &str, recursive: bool) -> Result<(), AgentError> {
        self.call(Request::Remove {
            path: path.into(),
            recursive,
        })
        .map(drop)
    }

    /// Writes the guest's dirty pages to its disks.
    pub fn sync(&self) -> Result<(), AgentError> {
        self.call(Request::Sync).map(drop)
    }

    /// Credits `entropy` to the guest's random pool, reseeds it, and sets the guest clock.
    pub fn refresh(&self, entropy: &[u8], unix_ns: u64) -> Result<(), AgentError> {
        self.call(Request::Refresh {
            entropy: entropy.to_vec(),
            unix_ns,
        })
        .map(drop)
    }

    /// Asks the agent to end (in a VM: the guest then powers off).
    pub fn shutdown(&self) -> Result<(), AgentError> {
        self.call(Request::Shutdown).map(drop)
    }

    fn call(&self, req: Request) -> Result<Option<Reply>, AgentError> {
        let (mut s, mut buf) = self.open(&req)?;
        match read_frame(&mut s, &mut buf)? {
            Some(kind::OK) => Ok(None),
            Some(kind::REPLY) => Ok(Some(Reply::decode(&buf)?)),
            other => expect(other, kind::OK, "OK or REPLY", &buf).map(|_| None),
        }
    }
}

/// DATA frames until EOF into `dst`; an ERROR frame instead is the agent's error.
fn copy_data(
    s: &mut UnixStream,
    buf: &mut Vec<u8>,
    dst: &mut impl Write,
) -> Result<u64, AgentError> {
    let mut data = DataReader::new(s, buf);
    match data.copy_to(dst) {
        Ok(n) => Ok(n),
        Err(CopyError::Sink(source)) => Err(AgentError::Local {
            what: "destination",
            source,
        }),
        Err(CopyError::Stream(ProtoError::Truncated)) => Err(AgentError::Closed("DATA or EOF")),
        Err(CopyError::Stream(e)) => match data.ended_by() {
            Some((kind::ERROR, payload)) => Err(AgentError::Remote(ErrorInfo::decode(payload)?)),
            _ => Err(e.into()),
        },
    }
}

/// Whether an error is the agent saying the disk is full.
pub fn is_no_space(e: &AgentError) -> bool {
    e.remote().is_some_and(|r| r.kind == ErrorKind::NoSpace)
}
