//! The typed messages: requests, replies, exit statuses and errors, each with its encoding.

use std::io;

use super::codec::{Dec, Enc};
use super::frame::ProtoError;

/// A command to run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Exec {
    /// Program and arguments; no shell unless the caller asks for one (`sh -c`).
    pub argv: Vec<String>,
    /// Environment, replacing the agent's when `clear_env`, else added to a default PATH/HOME.
    pub env: Vec<(String, String)>,
    pub clear_env: bool,
    pub cwd: Option<String>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Run on a pseudo-terminal of this size (rows, cols); stdout then carries everything.
    pub pty: Option<(u16, u16)>,
    /// Kill the whole process group after this many milliseconds.
    pub timeout_ms: Option<u64>,
    /// Whether the client will send stdin (else the child gets /dev/null).
    pub stdin: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upload {
    pub path: String,
    pub mode: u32,
    pub create_parents: bool,
    pub fsync: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Exec(Exec),
    Upload(Upload),
    Download {
        path: String,
    },
    Stat {
        path: String,
    },
    List {
        path: String,
    },
    Mkdir {
        path: String,
        mode: u32,
        parents: bool,
    },
    Remove {
        path: String,
        recursive: bool,
    },
    Capture,
    Shutdown,
    /// A file or directory tree as a tar (entries named from the path's last component).
    ArchiveOut {
        path: String,
    },
    /// A tar the client sends, unpacked into the directory `path` (made with its parents).
    ArchiveIn {
        path: String,
    },
    /// Write the guest's dirty pages to its disks (before a snapshot).
    Sync,
    /// After a restore: mix host entropy into the guest's random pool and reseed it (forks of
    /// one snapshot must not share random streams), and set the guest's clock.
    Refresh {
        entropy: Vec<u8>,
        unix_ns: u64,
    },
}

/// Most entropy one `Refresh` carries.
pub const REFRESH_ENTROPY_MAX: usize = 512;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    Exited(i32),
    Signaled(i32),
    /// Killed (process group, SIGKILL) because the timeout passed.
    TimedOut,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatInfo {
    pub kind: FileKind,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Stat(StatInfo),
    List(Vec<(String, StatInfo)>),
    File { size: u64, mode: u32 },
}

/// Error classes the client can act on; `errno` carries the OS detail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    Protocol = 1,
    Version = 2,
    NotFound = 3,
    PermissionDenied = 4,
    AlreadyExists = 5,
    NoSpace = 6,
    IsADirectory = 7,
    NotADirectory = 8,
    InvalidInput = 9,
    Spawn = 10,
    Io = 11,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorInfo {
    pub kind: ErrorKind,
    /// 0 when no OS error is involved.
    pub errno: i32,
    pub message: String,
}

impl ErrorKind {
    fn from_u32(v: u32) -> Result<Self, ProtoError> {
        use ErrorKind::*;
        Ok(match v {
            1 => Protocol,
            2 => Version,
            3 => NotFound,
            4 => PermissionDenied,
            5 => AlreadyExists,
            6 => NoSpace,
            7 => IsADirectory,
            8 => NotADirectory,
            9 => InvalidInput,
            10 => Spawn,
            11 => Io,
            _ => return Err(ProtoError::Invalid(format!("error kind {v}"))),
        })
    }

    /// The class of an OS error number.
    pub fn from_errno(errno: i32) -> Self {
        match errno {
            libc_consts::ENOENT => ErrorKind::NotFound,
            libc_consts::EACCES | libc_consts::EPERM | libc_consts::EROFS => {
                ErrorKind::PermissionDenied
            }
            libc_consts::EEXIST => ErrorKind::AlreadyExists,
            libc_consts::ENOSPC | libc_consts::EDQUOT => ErrorKind::NoSpace,
            libc_consts::EISDIR => ErrorKind::IsADirectory,
            libc_consts::ENOTDIR => ErrorKind::NotADirectory,
            libc_consts::EINVAL => ErrorKind::InvalidInput,
            _ => ErrorKind::Io,
        }
    }
}

/// The Linux errno values the protocol names (both sides are Linux on x86-64).
pub mod libc_consts {
    pub const EPERM: i32 = 1;
    pub const ENOENT: i32 = 2;
    pub const EACCES: i32 = 13;
    pub const EEXIST: i32 = 17;
    pub const ENOTDIR: i32 = 20;
    pub const EISDIR: i32 = 21;
    pub const EINVAL: i32 = 22;
    pub const ENOSPC: i32 = 28;
    pub const EROFS: i32 = 30;
    pub const EDQUOT: i32 = 122;
}

impl ErrorInfo {
    pub fn io(context: &str, e: &io::Error) -> Self {
        let errno = e.raw_os_error().unwrap_or(0);
        let kind = if errno != 0 {
            ErrorKind::from_errno(errno)
        } else {
            ErrorKind::Io
        };
        ErrorInfo {
            kind,
            errno,
            message: format!("{context}: {e}"),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.u32(self.kind as u32).i32(self.errno).str(&self.message);
        e.0
    }

    pub fn decode(b: &[u8]) -> Result<Self, ProtoError> {
        let mut d = Dec::new(b);
        let r = ErrorInfo {
            kind: ErrorKind::from_u32(d.u32()?)?,
            errno: d.i32()?,
            message: d.str()?,
        };
        d.finish()?;
        Ok(r)
    }
}

impl std::fmt::Display for ErrorInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl ExitStatus {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        match self {
            ExitStatus::Exited(c) => e.u8(0).i32(*c),
            ExitStatus::Signaled(s) => e.u8(1).i32(*s),
            ExitStatus::TimedOut => e.u8(2),
        };
        e.0
    }

    pub fn decode(b: &[u8]) -> Result<Self, ProtoError> {
        let mut d = Dec::new(b);
        let r = match d.u8()? {
            0 => ExitStatus::Exited(d.i32()?),
            1 => ExitStatus::Signaled(d.i32()?),
            2 => ExitStatus::TimedOut,
            t => return Err(ProtoError::Invalid(format!("exit status tag {t}"))),
        };
        d.finish()?;
        Ok(r)
    }
}

fn enc_stat(e: &mut Enc, s: &StatInfo) {
    let k = match s.kind {
        FileKind::File => 0,
        FileKind::Dir => 1,
        FileKind::Symlink => 2,
        FileKind::Other => 3,
    };
    e.u8(k)
        .u64(s.size)
        .u32(s.mode)
        .u32(s.uid)
        .u32(s.gid)
        .i64(s.mtime);
}

fn dec_stat(d: &mut Dec) -> Result<StatInfo, ProtoError> {
    let kind = match d.u8()? {
        0 => FileKind::File,
        1 => FileKind::Dir,
        2 => FileKind::Symlink,
        3 => FileKind::Other,
        t => return Err(ProtoError::Invalid(format!("file kind {t}"))),
    };
    Ok(StatInfo {
        kind,
        size: d.u64()?,
        mode: d.u32()?,
        uid: d.u32()?,
        gid: d.u32()?,
        mtime: d.i64()?,
    })
}

/// Smallest encoding of one listed entry (empty name + stat), to bound the entry count.
const MIN_ENTRY: usize = 4 + 1 + 8 + 4 * 3 + 8;

impl Reply {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        match self {
            Reply::Stat(s) => {
                e.u8(0);
                enc_stat(&mut e, s);
            }
            Reply::List(v) => {
                e.u8(1).u32(v.len() as u32);
                for (n, s) in v {
                    e.str(n);
                    enc_stat(&mut e, s);
                }
            }
            Reply::File { size, mode } => {
                e.u8(2).u64(*size).u32(*mode);
            }
        }
        e.0
    }

    pub fn decode(b: &[u8]) -> Result<Self, ProtoError> {
        let mut d = Dec::new(b);
        let r = match d.u8()? {
            0 => Reply::Stat(dec_stat(&mut d)?),
            1 => {
                let n = d.u32()? as usize;
                if n > d.remaining() / MIN_ENTRY {
                    return Err(ProtoError::Truncated);
                }
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    let name = d.str()?;
                    v.push((name, dec_stat(&mut d)?));
                }
                Reply::List(v)
            }
            2 => Reply::File {
                size: d.u64()?,
                mode: d.u32()?,
            },
            t => return Err(ProtoError::Invalid(format!("reply tag {t}"))),
        };
        d.finish()?;
        Ok(r)
    }
}

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        match self {
            Request::Exec(x) => {
                e.u8(0).strs(&x.argv).u32(x.env.len() as u32);
                for (k, v) in &x.env {
                    e.str(k).str(v);
                }
                e.bool(x.clear_env)
                    .opt_str(x.cwd.as_deref())
                    .opt_u32(x.uid)
                    .opt_u32(x.gid);
                match x.pty {
                    Some((r, c)) => e.u8(1).u16(r).u16(c),
                    None => e.u8(0),
                };
                e.opt_u64(x.timeout_ms).bool(x.stdin);
            }
            Request::Upload(u) => {
                e.u8(1)
                    .str(&u.path)
                    .u32(u.mode)
                    .bool(u.create_parents)
                    .bool(u.fsync);
            }
            Request::Download { path } => {
                e.u8(2).str(path);
            }
            Request::Stat { path } => {
                e.u8(3).str(path);
            }
            Request::List { path } => {
                e.u8(4).str(path);
            }
            Request::Mkdir {
                path,
                mode,
                parents,
            } => {
                e.u8(5).str(path).u32(*mode).bool(*parents);
            }
            Request::Remove { path, recursive } => {
                e.u8(6).str(path).bool(*recursive);
            }
            Request::Capture => {
                e.u8(7);
            }
            Request::Shutdown => {
                e.u8(8);
            }
            Request::ArchiveOut { path } => {
                e.u8(9).str(path);
            }
            Request::ArchiveIn { path } => {
                e.u8(10).str(path);
            }
            Request::Sync => {
                e.u8(11);
            }
            Request::Refresh { entropy, unix_ns } => {
                e.u8(12).bytes(entropy).u64(*unix_ns);
            }
        }
        e.0
    }

    pub fn decode(b: &[u8]) -> Result<Self, ProtoError> {
        let mut d = Dec::new(b);
        let r = match d.u8()? {
            0 => {
                let argv = d.strs()?;
                if argv.is_empty() {
                    return Err(ProtoError::Invalid("exec with an empty argv".into()));
                }
                let n = d.u32()? as usize;
                if n > d.remaining() / 8 {
                    return Err(ProtoError::Truncated);
                }
                let env = (0..n)
                    .map(|_| Ok((d.str()?, d.str()?)))
                    .collect::<Result<Vec<_>, ProtoError>>()?;
                let clear_env = d.bool()?;
                let cwd = d.opt_str()?;
                let uid = d.opt_u32()?;
                let gid = d.opt_u32()?;
                let pty = if d.bool()? {
                    Some((d.u16()?, d.u16()?))
                } else {
                    None
                };
                let timeout_ms = d.opt_u64()?;
                let stdin = d.bool()?;
                Request::Exec(Exec {
                    argv,
                    env,
                    clear_env,
                    cwd,
                    uid,
                    gid,
                    pty,
                    timeout_ms,
                    stdin,
                })
            }
            1 => Request::Upload(Upload {
                path: d.str()?,
                mode: d.u32()?,
                create_parents: d.bool()?,
                fsync: d.bool()?,
            }),
            2 => Request::Download { path: d.str()? },
            3 => Request::Stat { path: d.str()? },
            4 => Request::List { path: d.str()? },
            5 => Request::Mkdir {
                path: d.str()?,
                mode: d.u32()?,
                parents: d.bool()?,
            },
            6 => Request::Remove {
                path: d.str()?,
                recursive: d.bool()?,
            },
            7 => Request::Capture,
            8 => Request::Shutdown,
            9 => Request::ArchiveOut { path: d.str()? },
            10 => Request::ArchiveIn { path: d.str()? },
            11 => Request::Sync,
            12 => {
                let entropy = d.bytes()?;
                if entropy.len() > REFRESH_ENTROPY_MAX {
                    return Err(ProtoError::Invalid(format!(
                        "{} bytes of entropy (at most {REFRESH_ENTROPY_MAX})",
                        entropy.len()
                    )));
                }
                Request::Refresh {
                    entropy: entropy.to_vec(),
                    unix_ns: d.u64()?,
                }
            }
            t => return Err(ProtoError::Invalid(format!("request tag {t}"))),
        };
        d.finish()?;
        Ok(r)
    }
}

#[cfg(test)]
mod fuzz {
    use super::super::frame::{read_frame, MAX_FRAME};
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// Arbitrary bytes never panic any decoder, and a frame reader never allocates past
        /// the cap.
        #[test]
        fn hostile_bytes_are_errors_not_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Request::decode(&bytes);
            let _ = Reply::decode(&bytes);
            let _ = ExitStatus::decode(&bytes);
            let _ = ErrorInfo::decode(&bytes);
            let mut r = bytes.as_slice();
            let mut buf = Vec::new();
            while let Ok(Some(_)) = read_frame(&mut r, &mut buf) {
                prop_assert!(buf.len() < MAX_FRAME);
            }
        }

        /// Valid requests with arbitrary contents survive the round trip.
        #[test]
        fn exec_round_trips(argv in proptest::collection::vec(".{0,20}", 1..5), cwd in proptest::option::of(".{0,10}"), t in proptest::option::of(any::<u64>())) {
            let r = Request::Exec(Exec { argv, cwd, timeout_ms: t, ..Default::default() });
            prop_assert_eq!(Request::decode(&r.encode()).unwrap(), r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Request> {
        vec![
            Request::Exec(Exec {
                argv: vec!["/bin/sh".into(), "-c".into(), "echo ü".into()],
                env: vec![("A".into(), "b=c".into())],
                clear_env: true,
                cwd: Some("/tmp".into()),
                uid: Some(1000),
                gid: None,
                pty: Some((24, 80)),
                timeout_ms: Some(5000),
                stdin: true,
            }),
            Request::Exec(Exec {
                argv: vec!["true".into()],
                ..Default::default()
            }),
            Request::Upload(Upload {
                path: "/a/b".into(),
                mode: 0o644,
                create_parents: true,
                fsync: false,
            }),
            Request::Download {
                path: "/etc/hostname".into(),
            },
            Request::Stat { path: "/".into() },
            Request::List {
                path: "/tmp".into(),
            },
            Request::Mkdir {
                path: "/x/y".into(),
                mode: 0o755,
                parents: true,
            },
            Request::Remove {
                path: "/x".into(),
                recursive: true,
            },
            Request::Capture,
            Request::Shutdown,
            Request::ArchiveOut {
                path: "/etc".into(),
            },
            Request::ArchiveIn {
                path: "/work/in".into(),
            },
            Request::Sync,
            Request::Refresh {
                entropy: vec![7; 64],
                unix_ns: 1_800_000_000_000_000_000,
            },
        ]
    }

    #[test]
    fn requests_round_trip() {
        for r in samples() {
            assert_eq!(Request::decode(&r.encode()).unwrap(), r);
        }
    }

    #[test]
    fn replies_and_statuses_round_trip() {
        let s = StatInfo {
            kind: FileKind::Dir,
            size: 4096,
            mode: 0o40755,
            uid: 0,
            gid: 0,
            mtime: -5,
        };
        for r in [
            Reply::Stat(s.clone()),
            Reply::List(vec![("a".into(), s.clone()), ("".into(), s)]),
            Reply::File {
                size: 9,
                mode: 0o600,
            },
        ] {
            assert_eq!(Reply::decode(&r.encode()).unwrap(), r);
        }
        for x in [
            ExitStatus::Exited(3),
            ExitStatus::Signaled(9),
            ExitStatus::TimedOut,
        ] {
            assert_eq!(ExitStatus::decode(&x.encode()).unwrap(), x);
        }
        let e = ErrorInfo {
            kind: ErrorKind::NoSpace,
            errno: 28,
            message: "write /x: No space left on device".into(),
        };
        assert_eq!(ErrorInfo::decode(&e.encode()).unwrap(), e);
        assert_eq!(ErrorKind::from_errno(28), ErrorKind::NoSpace);
        assert_eq!(ErrorKind::from_errno(2), ErrorKind::NotFound);
    }

    #[test]
    fn truncated_or_lying_messages_are_errors() {
        for r in samples() {
            let b = r.encode();
            for cut in 0..b.len() {
                assert!(Request::decode(&b[..cut]).is_err(), "{r:?} cut at {cut}");
            }
            let mut extra = b.clone();
            extra.push(0);
            assert!(Request::decode(&extra).is_err());
        }
        // A count far larger than the bytes present.
        let mut lie = vec![0u8];
        lie.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(Request::decode(&lie), Err(ProtoError::Truncated)));
        let mut lie = vec![1u8];
        lie.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(Reply::decode(&lie), Err(ProtoError::Truncated)));
        assert!(Request::decode(&[42]).is_err());
        assert!(Request::decode(&[0, 0, 0, 0, 0]).is_err(), "empty argv");
    }
}
