//! The status port (encoding in `vmrun_protocol::status`) and the probe port test guests use
//! to timestamp points of their run.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use vmrun_protocol::status::Status;

use crate::devices::BusDevice;
use crate::vstate::{ExitReason, ExitState};

pub struct StatusPort {
    kind: u8,
    exit: Arc<ExitState>,
}

impl StatusPort {
    pub fn new(exit: Arc<ExitState>) -> Self {
        StatusPort { kind: 0, exit }
    }

    fn commit(&mut self, code: u8) {
        let reason = match Status::decode(self.kind, code) {
            Ok(s) => ExitReason::Status(s),
            Err(kind) => ExitReason::BadStatus { kind, code },
        };
        self.exit.request(reason);
    }
}

impl BusDevice for StatusPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (0, [kind]) => self.kind = *kind,
            (1, [code]) => self.commit(*code),
            (0, [kind, code, ..]) => {
                self.kind = *kind;
                self.commit(*code);
            }
            _ => log::debug!(
                "status port: ignored write of {} bytes at offset {offset}",
                data.len()
            ),
        }
    }
}

/// Most samples kept; a guest writing in a loop cannot grow the VMM.
const PROBE_MAX: usize = 4096;

/// Records (time, value) for each write, for test guests and `vmrun doctor`'s timing probe.
#[derive(Clone, Default)]
pub struct ProbePort {
    samples: Arc<Mutex<Vec<(Instant, u32)>>>,
}

impl ProbePort {
    pub fn samples(&self) -> Vec<(Instant, u32)> {
        self.samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl BusDevice for ProbePort {
    /// Reads answer with the number of samples so far, so a guest can check a round trip.
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        let n = self.samples.lock().unwrap_or_else(|e| e.into_inner()).len() as u32;
        let b = n.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = b.get(i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let now = Instant::now();
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        let mut s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if s.len() < PROBE_MAX {
            s.push((now, u32::from_le_bytes(v)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_writes_latch_then_commit() {
        let exit = Arc::new(ExitState::default());
        let mut p = StatusPort::new(exit.clone());
        p.write(0, &[0]);
        assert!(exit.reason().is_none());
        p.write(1, &[42]);
        assert_eq!(exit.reason(), Some(ExitReason::Status(Status::Exited(42))));
    }

    #[test]
    fn word_write_commits_and_first_report_wins() {
        let exit = Arc::new(ExitState::default());
        let mut p = StatusPort::new(exit.clone());
        p.write(0, &[2, 4]);
        p.write(0, &[0, 0]);
        assert_eq!(
            exit.reason(),
            Some(ExitReason::Status(Status::InitFailed(4)))
        );
    }

    #[test]
    fn unknown_kind_is_reported_not_trusted() {
        let exit = Arc::new(ExitState::default());
        let mut p = StatusPort::new(exit.clone());
        p.write(0, &[9, 1]);
        assert_eq!(
            exit.reason(),
            Some(ExitReason::BadStatus { kind: 9, code: 1 })
        );
    }

    #[test]
    fn probe_is_bounded() {
        let mut p = ProbePort::default();
        for i in 0..(PROBE_MAX as u32 + 10) {
            p.write(0, &i.to_le_bytes());
        }
        let s = p.samples();
        assert_eq!(s.len(), PROBE_MAX);
        let mut r = [0u8; 4];
        p.read(0, &mut r);
        assert_eq!(u32::from_le_bytes(r) as usize, PROBE_MAX);
        assert_eq!(s[5].1, 5);
    }
}
