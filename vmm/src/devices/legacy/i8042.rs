//! The i8042 keyboard controller, kept for one job: a guest writing 0xfe to its command port
//! (Linux `reboot=k`) resets the machine, which ends the VM.

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use super::{GuestSignal, GuestSignals};
use crate::vstate::bus::BusDevice;

/// Tells the VM's owner about the reset.
pub struct ResetTrigger(Arc<dyn GuestSignals>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.signal(GuestSignal::Reset);
        Ok(())
    }
}

/// Mapped at ports 0x60-0x64: offset 0 is data, offset 4 is command/status.
pub struct I8042(I8042Device<ResetTrigger>);

impl I8042 {
    pub fn new(sink: Arc<dyn GuestSignals>) -> Self {
        I8042(I8042Device::new(ResetTrigger(sink)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let ([b], Ok(off)) = (&mut *data, u8::try_from(offset)) {
            *b = self.0.read(off);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let ([b], Ok(off)) = (data, u8::try_from(offset)) {
            // Infallible trigger; other writes are accepted and ignored by the device.
            let _ = self.0.write(off, *b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::Recorder;
    use super::*;

    #[test]
    fn reset_command_ends_the_vm() {
        let rec = Recorder::new();
        let mut dev = I8042::new(rec.clone());
        dev.write(4, &[0x20]); // read command byte: harmless
        assert!(rec.first().is_none());
        dev.write(4, &[0xfe]);
        assert_eq!(rec.first(), Some(GuestSignal::Reset));
    }

    #[test]
    fn wide_accesses_are_ignored() {
        let rec = Recorder::new();
        let mut dev = I8042::new(rec.clone());
        dev.write(4, &[0xfe, 0]);
        assert!(rec.first().is_none());
        let mut d = [0u8; 2];
        dev.read(0, &mut d);
        assert_eq!(d, [0xff, 0xff]);
    }
}
