//! Accepting connections and dispatching one operation per connection, each on a thread of
//! its own (from `pool`, which reuses idle ones).

use std::io::{self, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vmrun_protocol::agent::{
    kind, read_frame, write_frame, ErrorInfo, ErrorKind, ProtoError, Reply, Request, VERSION,
};

use crate::config::Config;
use crate::error::resource_error;
use crate::{archive, capture, exec, files, refresh};

/// Where connections come from.
pub enum Listener {
    Unix(UnixListener),
    /// A listening AF_VSOCK socket (owned fd).
    Vsock(std::os::fd::OwnedFd),
}

impl Listener {
    /// Listens on vsock `port` for any CID.
    pub fn vsock(port: u32) -> io::Result<Listener> {
        // SAFETY: plain socket(2); the result is checked and owned below.
        let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh socket nobody else owns.
        let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // SAFETY: all-zero is a valid sockaddr_vm before the fields are set.
        let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        a.svm_port = port;
        a.svm_cid = libc::VMADDR_CID_ANY;
        let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        // SAFETY: a is a valid sockaddr_vm of `len` bytes; fd is ours.
        if unsafe { libc::bind(fd, (&a as *const libc::sockaddr_vm).cast(), len) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: listen(2) on the socket we own; no memory is involved.
        if unsafe { libc::listen(fd, 64) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Listener::Vsock(owned))
    }

    fn accept(&self) -> io::Result<UnixStream> {
        match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| s),
            Listener::Vsock(fd) => {
                use std::os::fd::AsRawFd;
                // SAFETY: fd is a listening socket; null address pointers are allowed.
                let c = unsafe {
                    libc::accept4(
                        fd.as_raw_fd(),
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_CLOEXEC,
                    )
                };
                if c < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: c is a connected stream socket we own. UnixStream only issues
                // read/write/shutdown/dup on it, which work for any stream socket.
                Ok(unsafe { UnixStream::from_raw_fd(c) })
            }
        }
    }
}

/// Sends an ERROR frame (best effort: the peer may be gone). The only writer of ERROR frames.
fn send_error(s: &mut UnixStream, e: &ErrorInfo) {
    let _ = write_frame(s, kind::ERROR, &e.encode());
}

fn proto_error(e: &ProtoError) -> ErrorInfo {
    let kind = if matches!(e, ProtoError::Version { .. }) {
        ErrorKind::Version
    } else {
        ErrorKind::Protocol
    };
    ErrorInfo {
        kind,
        errno: 0,
        message: e.to_string(),
    }
}

/// Serves until a `Shutdown` request (then returns) or the listener fails.
pub fn serve(listener: Listener, mut cfg: Config) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    cfg.open_root()?;
    let cfg = Arc::new(cfg);
    let stop = Arc::new(AtomicBool::new(false));
    let lfd = match &listener {
        Listener::Unix(l) => l.as_raw_fd(),
        Listener::Vsock(fd) => fd.as_raw_fd(),
    };
    // Workers descend from this thread: they share its namespace and root.
    let pool = crate::pool::Pool::new(crate::pool::IDLE);
    loop {
        let stream = match listener.accept() {
            Ok(s) => s,
            Err(_) if stop.load(Ordering::SeqCst) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if transient_accept_error(&e) => {
                // Out of fds or memory, or a peer that left before we accepted: the agent
                // must outlive that, or every later connection fails too.
                eprintln!("vmrun-agent: accept: {e}; retrying");
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
            Err(e) => return Err(e),
        };
        // Kept to report a failed thread start on; the job gets the original.
        let spare = stream.try_clone();
        let (cfg, stop) = (cfg.clone(), stop.clone());
        let spawned = pool.execute(Box::new(move || {
            let mut s = stream;
            if handle(&mut s, &cfg) {
                stop.store(true, Ordering::SeqCst);
                // Wakes the accept above, which then returns. The listener outlives this
                // job's use of the fd: serve() only drops it after accept fails.
                // SAFETY: shutdown(2) on a socket fd; no memory is involved.
                unsafe { libc::shutdown(lfd, libc::SHUT_RDWR) };
            }
        }));
        if let Err(e) = spawned {
            eprintln!("vmrun-agent: cannot start a connection thread: {e}");
            if let Ok(mut s) = spare {
                send_error(&mut s, &resource_error("start a connection thread", &e));
            }
        }
    }
}

/// Accept failures that concern one connection or a passing shortage, not the listener.
fn transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EMFILE
                | libc::ENFILE
                | libc::ENOMEM
                | libc::ENOBUFS
                | libc::ECONNABORTED
                | libc::ECONNRESET
                | libc::EPROTO
                | libc::EPERM
                | libc::EAGAIN
        )
    )
}

/// Runs one connection; true when it was a shutdown request.
pub fn handle(s: &mut UnixStream, cfg: &Config) -> bool {
    let mut buf = Vec::new();
    let req = match handshake(s, &mut buf) {
        Ok(Some(r)) => r,
        Ok(None) => return false,
        Err(e) => {
            send_error(s, &proto_error(&e));
            return false;
        }
    };
    let result = match req {
        Request::Exec(x) => exec::run(s, cfg, x),
        Request::Upload(u) => files::upload(s, cfg, &u, &mut buf),
        Request::Download { path } => files::download(s, cfg, &path),
        Request::Stat { path } => files::stat(cfg, &path).and_then(|r| reply(s, Some(r))),
        Request::List { path } => files::list(cfg, &path).and_then(|r| reply(s, Some(r))),
        Request::Mkdir {
            path,
            mode,
            parents,
        } => files::mkdir(cfg, &path, mode, parents).and_then(|()| reply(s, None)),
        Request::Remove { path, recursive } => {
            files::remove(cfg, &path, recursive).and_then(|()| reply(s, None))
        }
        Request::Capture => capture::run(s, cfg),
        Request::ArchiveOut { path } => archive::out(s, cfg, &path),
        Request::ArchiveIn { path } => archive::r#in(s, cfg, &path, &mut buf),
        Request::Sync => {
            refresh::sync();
            reply(s, None)
        }
        Request::Refresh { entropy, unix_ns } => {
            refresh::refresh(&entropy, unix_ns).and_then(|()| reply(s, None))
        }
        Request::Shutdown => {
            // SAFETY: sync has no preconditions.
            unsafe { libc::sync() };
            let _ = write_frame(s, kind::OK, &[]);
            let _ = s.flush();
            if cfg.exit_on_shutdown {
                std::process::exit(0);
            }
            return true;
        }
    };
    if let Err(e) = result {
        send_error(s, &e);
    }
    false
}

/// `REPLY` with `r`, or `OK` when there is nothing to say.
fn reply(s: &mut UnixStream, r: Option<Reply>) -> Result<(), ErrorInfo> {
    let sent = match r {
        Some(r) => write_frame(s, kind::REPLY, &r.encode()),
        None => write_frame(s, kind::OK, &[]),
    };
    sent.map_err(|e| crate::error::connection("reply", &e))
}

/// HELLO/HELLO_OK, then the request.
fn handshake(s: &mut UnixStream, buf: &mut Vec<u8>) -> Result<Option<Request>, ProtoError> {
    match read_frame(s, buf)? {
        None => return Ok(None),
        Some(kind::HELLO) => {}
        Some(k) => {
            return Err(ProtoError::Unexpected {
                got: k,
                want: "HELLO",
            })
        }
    }
    let v = <[u8; 4]>::try_from(buf.as_slice())
        .map(u32::from_le_bytes)
        .map_err(|_| ProtoError::Invalid("HELLO payload".into()))?;
    if v != VERSION {
        return Err(ProtoError::Version {
            got: v,
            ours: VERSION,
        });
    }
    write_frame(s, kind::HELLO_OK, &VERSION.to_le_bytes())?;
    match read_frame(s, buf)? {
        None => Ok(None),
        Some(kind::REQUEST) => Request::decode(buf).map(Some),
        Some(k) => Err(ProtoError::Unexpected {
            got: k,
            want: "REQUEST",
        }),
    }
}
