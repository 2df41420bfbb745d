//! The VMM process's control socket (`control.sock` in the VM's runtime directory): what the
//! library asks of a running VMM besides the guest's agent. One request line per connection,
//! one reply line back. The peer is treated as hostile: lines are bounded, only the uid that
//! started the VMM is served, and every malformed request gets an error reply.
//!
//! Requests: `snapshot resume|stop DIR` (DIR absolute: where the files live, for messages),
//! with the snapshot's files passed open beside the line (SCM_RIGHTS): `state`, `memory` and,
//! for a VM with a disk upper layer, `upper`. The caller creates them, so a jailed VMM, which
//! can open nothing on the host, still writes them. Replies: `ok BYTES` or `error MESSAGE`.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::Duration;

use thiserror::Error;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Longest request or reply line.
const LINE_MAX: u64 = 8192;

#[derive(Debug, Error)]
pub enum ControlError {
    #[error("cannot reach the VMM's control socket {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the VMM's control socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("the VMM refused: {0}")]
    Refused(String),
    #[error("the VMM answered something that is not a reply: {0:?}")]
    BadReply(String),
    #[error("{0}: a snapshot directory must be an absolute path without a newline")]
    BadPath(PathBuf),
}

/// What the VM does after its snapshot is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Then {
    Resume,
    Stop,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Snapshot { dir: PathBuf, then: Then },
}

impl Request {
    fn encode(&self) -> Result<Vec<u8>, ControlError> {
        match self {
            Request::Snapshot { dir, then } => {
                let bytes = dir.as_os_str().as_bytes();
                if !dir.is_absolute() || bytes.contains(&b'\n') {
                    return Err(ControlError::BadPath(dir.clone()));
                }
                let mut line = match then {
                    Then::Resume => b"snapshot resume ".to_vec(),
                    Then::Stop => b"snapshot stop ".to_vec(),
                };
                line.extend_from_slice(bytes);
                line.push(b'\n');
                Ok(line)
            }
        }
    }

    pub fn parse(line: &[u8]) -> Result<Request, String> {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let (then, rest) = if let Some(r) = line.strip_prefix(b"snapshot resume ") {
            (Then::Resume, r)
        } else if let Some(r) = line.strip_prefix(b"snapshot stop ") {
            (Then::Stop, r)
        } else {
            return Err("unknown request (use `snapshot resume|stop DIR`)".into());
        };
        let dir = PathBuf::from(std::ffi::OsStr::from_bytes(rest));
        if !dir.is_absolute() || rest.contains(&b'\n') {
            return Err(format!("{}: not an absolute path", dir.display()));
        }
        Ok(Request::Snapshot { dir, then })
    }
}

/// Sends one request and waits (at most `timeout`) for its reply: `ok` with its number, or
/// the VMM's error.
pub fn call(
    socket: &Path,
    req: &Request,
    files: &[&File],
    timeout: Duration,
) -> Result<u64, ControlError> {
    let line = req.encode()?;
    let s = UnixStream::connect(socket).map_err(|source| ControlError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    s.set_read_timeout(Some(timeout))?;
    let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
    let sent = s
        .send_with_fds(&[&line[..]], &fds)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    (&s).write_all(&line[sent..])?;
    let mut reply = String::new();
    BufReader::new(s.take(LINE_MAX)).read_line(&mut reply)?;
    let reply = reply.trim_end();
    if let Some(msg) = reply.strip_prefix("error ") {
        return Err(ControlError::Refused(msg.to_string()));
    }
    reply
        .strip_prefix("ok ")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| ControlError::BadReply(reply.to_string()))
}

/// A request as the VMM's main loop takes it: the files that came with it, and where its
/// answer goes.
pub struct Incoming {
    pub request: Request,
    pub files: Vec<File>,
    pub reply: Reply,
}

/// Where a request's answer goes.
pub struct Reply(UnixStream);

impl Reply {
    pub fn ok(mut self, n: u64) {
        let _ = writeln!(self.0, "ok {n}");
    }
    pub fn error(mut self, msg: &str) {
        let _ = writeln!(self.0, "error {}", msg.replace('\n', " "));
    }
}

/// Files a request may carry (a snapshot's state, memory and upper disk).
const MAX_FILES: usize = 3;

/// The bound socket, before its thread starts: bound while the VMM may still create files in
/// the VM's directory (as root, before the jail drops it), served once the VM runs.
pub struct Bound {
    listener: UnixListener,
    path: PathBuf,
    owner: u32,
}

/// The serving side: a thread accepts and parses; the VMM's main loop takes the requests.
pub struct Server {
    rx: Receiver<Incoming>,
    path: PathBuf,
}

/// The uid of the peer of a Unix socket.
fn peer_uid(s: &UnixStream) -> Option<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes one ucred into the buffer whose size `len` gives.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(cred.uid)
}

/// Reads the request line (at most [`LINE_MAX`]) and the files sent with it.
fn read_request(s: &UnixStream) -> std::io::Result<(Vec<u8>, Vec<File>)> {
    let mut line = Vec::new();
    let mut files = Vec::new();
    let mut buf = [0u8; 1024];
    while !line.contains(&b'\n') && (line.len() as u64) < LINE_MAX {
        let mut fds = [-1 as RawFd; MAX_FILES];
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: the iovec points at `buf`, which recvmsg may fill with any bytes.
        let (n, nfds) = unsafe { s.recv_with_fds(&mut iov, &mut fds) }?;
        for &fd in fds.iter().take(nfds) {
            // SAFETY: recvmsg gave this process these descriptors; each is owned once here.
            let f = unsafe { File::from_raw_fd(fd) };
            // More than a request takes are closed at once, however many a peer sends.
            if files.len() < MAX_FILES {
                files.push(f);
            }
        }
        if n == 0 {
            break;
        }
        line.extend_from_slice(&buf[..n]);
    }
    Ok((line, files))
}

fn serve_one(s: UnixStream, owner: u32, tx: &Sender<Incoming>) {
    let reply = Reply(match s.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    });
    if peer_uid(&s) != Some(owner) {
        reply.error("only the VM's owner may control it");
        return;
    }
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let Ok((line, files)) = read_request(&s) else {
        return;
    };
    let end = line
        .iter()
        .position(|&b| b == b'\n')
        .map_or(line.len(), |i| i + 1);
    match Request::parse(&line[..end]) {
        Ok(request) => {
            let inc = Incoming {
                request,
                files,
                reply,
            };
            if let Err(mpsc::SendError(inc)) = tx.send(inc) {
                inc.reply.error("the VM is ending");
            }
        }
        Err(e) => reply.error(&e),
    }
}

impl Bound {
    /// Binds `path` (a leftover socket there is replaced). Only the uid that binds it (the
    /// one that starts the VMM, before any jail changes it) may send requests.
    pub fn bind(path: &Path) -> std::io::Result<Bound> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        Ok(Bound {
            listener,
            path: path.to_path_buf(),
            // SAFETY: geteuid has no preconditions and cannot fail.
            owner: unsafe { libc::geteuid() },
        })
    }

    /// Starts accepting, on a thread that installs `seccomp`'s control filter on itself
    /// first.
    pub fn serve(
        self,
        seccomp: Option<std::sync::Arc<crate::seccomp::Filters>>,
    ) -> std::io::Result<Server> {
        let (tx, rx) = mpsc::channel();
        let Bound {
            listener,
            path,
            owner,
        } = self;
        std::thread::Builder::new()
            .name("vmm-control".into())
            .spawn(move || {
                if let Some(f) = seccomp {
                    if let Err(e) = crate::seccomp::apply("control", &f.control) {
                        log::error!("{e}; no control requests are served");
                        return;
                    }
                }
                for s in listener.incoming().flatten() {
                    serve_one(s, owner, &tx);
                }
            })?;
        Ok(Server { rx, path })
    }
}

impl Server {
    /// The next request, if one is waiting.
    pub fn try_next(&self) -> Option<Incoming> {
        self.rx.try_recv().ok()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_junk_is_refused() {
        let r = Request::Snapshot {
            dir: "/var/snap shots/a".into(),
            then: Then::Stop,
        };
        assert_eq!(Request::parse(&r.encode().unwrap()).unwrap(), r);
        assert!(Request::parse(b"snapshot resume relative/dir\n").is_err());
        assert!(Request::parse(b"reboot\n").is_err());
        assert!(Request::parse(&[0xff; 100]).is_err());
        assert!(Request::Snapshot {
            dir: "/a\nb".into(),
            then: Then::Resume
        }
        .encode()
        .is_err());
    }

    #[test]
    fn a_server_answers_and_refuses() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("control.sock");
        let server = Bound::bind(&sock).unwrap().serve(None).unwrap();
        let target = d.path().join("state");
        let t = std::thread::spawn({
            let sock = sock.clone();
            let target = target.clone();
            move || {
                let f = File::create(&target).unwrap();
                call(
                    &sock,
                    &Request::Snapshot {
                        dir: "/x".into(),
                        then: Then::Resume,
                    },
                    &[&f, &f],
                    Duration::from_secs(5),
                )
            }
        });
        let inc = loop {
            if let Some(x) = server.try_next() {
                break x;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(
            inc.request,
            Request::Snapshot {
                dir: "/x".into(),
                then: Then::Resume
            }
        );
        // The files came open: writing one writes the caller's file.
        assert_eq!(inc.files.len(), 2);
        (&inc.files[0]).write_all(b"written by the VMM").unwrap();
        inc.reply.ok(42);
        assert_eq!(t.join().unwrap().unwrap(), 42);
        assert_eq!(std::fs::read(&target).unwrap(), b"written by the VMM");

        // A malformed line gets an error reply, not silence.
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(b"format c:\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("error unknown request"), "{out}");
        drop(server);
        assert!(!sock.exists());
    }
}
