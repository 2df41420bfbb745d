//! The status port: how the guest's init (or agent) tells the VMM how the guest ended, before it
//! resets the VM, so the host never has to guess from a timeout.
//!
//! Encoding: a byte written at `PORT` latches the *kind*; a byte written at `PORT + 1` is the
//! *code* and commits the report. A 16-bit write at `PORT` (kind in the low byte, code in the
//! high byte) does both at once. Byte-wise writes are what `/dev/port` produces, so a guest
//! program can report with one `pwrite(fd, [kind, code], PORT)`.
//! A committed report is final: the VMM stops the VM at once.

/// The I/O port (two bytes wide). No PC device lives here.
pub const PORT: u16 = 0x06f0;

/// How the guest ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// The workload exited with this code.
    Exited(u8),
    /// The workload was killed by this signal.
    Signaled(u8),
    /// The init failed before the workload ran; the reason is on the console. The code is an
    /// [`InitError`] class.
    InitFailed(u8),
}

const KIND_EXITED: u8 = 0;
const KIND_SIGNALED: u8 = 1;
const KIND_INIT_FAILED: u8 = 2;

/// Classes of init failure carried in the code byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum InitError {
    /// Anything not listed below.
    Other = 1,
    /// A kernel command-line parameter was invalid.
    Cmdline = 2,
    /// A device (root or upper) did not appear.
    Device = 3,
    /// A mount failed.
    Mount = 4,
    /// The workload could not be started.
    Exec = 5,
}

impl Status {
    /// The (kind, code) bytes.
    pub fn encode(self) -> [u8; 2] {
        match self {
            Status::Exited(c) => [KIND_EXITED, c],
            Status::Signaled(s) => [KIND_SIGNALED, s],
            Status::InitFailed(c) => [KIND_INIT_FAILED, c],
        }
    }

    /// Decodes (kind, code); an unknown kind is reported as such, never trusted.
    pub fn decode(kind: u8, code: u8) -> Result<Status, u8> {
        match kind {
            KIND_EXITED => Ok(Status::Exited(code)),
            KIND_SIGNALED => Ok(Status::Signaled(code)),
            KIND_INIT_FAILED => Ok(Status::InitFailed(code)),
            other => Err(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for s in [
            Status::Exited(0),
            Status::Exited(255),
            Status::Signaled(9),
            Status::InitFailed(InitError::Mount as u8),
        ] {
            let [k, c] = s.encode();
            assert_eq!(Status::decode(k, c), Ok(s));
        }
        assert_eq!(Status::decode(7, 0), Err(7));
    }
}
