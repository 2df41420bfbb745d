//! PC legacy devices: the serial console, the i8042 (for reset), vmrun's status port, and the
//! probe port of test programs. What the guest asks of the machine through them (a reset, an
//! exit status) goes to whoever owns the VM through [`GuestSignals`].

pub mod i8042;
pub mod probe;
pub mod serial;
pub mod status;

use vmrun_protocol::status::Status;

/// What the guest tells the machine through a legacy device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestSignal {
    /// A reset through the keyboard controller.
    Reset,
    /// A status reported through the status port.
    Status(Status),
    /// The status port saw a kind it does not know.
    BadStatus { kind: u8, code: u8 },
}

/// Where guest signals go: the VM's owner turns them into its end.
pub trait GuestSignals: Send + Sync {
    fn signal(&self, s: GuestSignal);
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::{Arc, Mutex};

    use super::{GuestSignal, GuestSignals};

    /// Records signals, for device tests.
    #[derive(Default)]
    pub struct Recorder(Mutex<Vec<GuestSignal>>);

    impl Recorder {
        pub fn new() -> Arc<Recorder> {
            Arc::default()
        }

        pub fn first(&self) -> Option<GuestSignal> {
            self.0.lock().unwrap().first().copied()
        }
    }

    impl GuestSignals for Recorder {
        fn signal(&self, s: GuestSignal) {
            self.0.lock().unwrap().push(s);
        }
    }
}
