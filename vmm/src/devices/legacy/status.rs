//! The status port (encoding in `vmrun_protocol::status`): the init and agent report how the
//! guest ended before they reset it.

use std::sync::Arc;

use vmrun_protocol::status::Status;

use super::{GuestSignal, GuestSignals};
use crate::vstate::bus::BusDevice;

pub struct StatusPort {
    kind: u8,
    sink: Arc<dyn GuestSignals>,
}

impl StatusPort {
    pub fn new(sink: Arc<dyn GuestSignals>) -> Self {
        StatusPort { kind: 0, sink }
    }

    fn commit(&mut self, code: u8) {
        let signal = match Status::decode(self.kind, code) {
            Ok(s) => GuestSignal::Status(s),
            Err(kind) => GuestSignal::BadStatus { kind, code },
        };
        self.sink.signal(signal);
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

#[cfg(test)]
mod tests {
    use super::super::tests::Recorder;
    use super::*;

    #[test]
    fn byte_writes_latch_then_commit() {
        let rec = Recorder::new();
        let mut p = StatusPort::new(rec.clone());
        p.write(0, &[0]);
        assert!(rec.first().is_none());
        p.write(1, &[42]);
        assert_eq!(rec.first(), Some(GuestSignal::Status(Status::Exited(42))));
    }

    #[test]
    fn word_write_commits_and_first_report_wins() {
        let rec = Recorder::new();
        let mut p = StatusPort::new(rec.clone());
        p.write(0, &[2, 4]);
        p.write(0, &[0, 0]);
        assert_eq!(
            rec.first(),
            Some(GuestSignal::Status(Status::InitFailed(4)))
        );
    }

    #[test]
    fn unknown_kind_is_reported_not_trusted() {
        let rec = Recorder::new();
        let mut p = StatusPort::new(rec.clone());
        p.write(0, &[9, 1]);
        assert_eq!(
            rec.first(),
            Some(GuestSignal::BadStatus { kind: 9, code: 1 })
        );
    }
}
