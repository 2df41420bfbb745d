//! How a VM's end is recorded: the first reason wins, and whoever waits on the VM wakes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use vmrun_protocol::status::Status;

/// Why the VM stopped. The first reason reported wins; later ones are ignored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reported through the status port.
    Status(Status),
    /// The status port saw a kind it does not know.
    BadStatus { kind: u8, code: u8 },
    /// The guest reset the machine (i8042) without reporting a status.
    Reset,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN). What it did before is all there is to go
    /// on: KVM resets a vCPU that shuts down (on AMD its state is undefined by then).
    TripleFault {
        cpu: u8,
        /// Milliseconds since the VM's first KVM_RUN.
        ran_ms: u64,
        /// Exits to the VMM before the fault.
        exits: u64,
        /// The last of them, described.
        last: String,
    },
    /// KVM could not run or emulate guest code.
    InternalError {
        cpu: u8,
        suberror: u32,
        rip: u64,
        data: Vec<u64>,
    },
    /// KVM refused to enter the guest.
    FailEntry { cpu: u8, reason: u64 },
    /// The guest asked KVM for a system event (shutdown/reset/crash).
    SystemEvent { cpu: u8, kind: u32 },
    /// A vCPU thread failed in the VMM.
    VcpuError { cpu: u8, message: String },
    /// The host stopped the VM.
    Stopped,
}

/// Shared between devices, vCPU threads and the owner of the VM.
#[derive(Default)]
pub struct ExitState {
    reason: Mutex<Option<ExitReason>>,
    done: Condvar,
    stop: AtomicBool,
}

impl ExitState {
    /// Records `reason` (unless one is already recorded) and asks every vCPU to stop.
    pub fn request(&self, reason: ExitReason) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
        self.stop.store(true, Ordering::SeqCst);
        self.done.notify_all();
    }

    pub fn should_stop(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits for an exit reason, at most `timeout`.
    pub fn wait(&self, timeout: Option<Duration>) -> Option<ExitReason> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        while r.is_none() {
            match deadline {
                None => r = self.done.wait(r).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    r = self
                        .done
                        .wait_timeout(r, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
        r.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn first_reason_wins_and_wakes_waiters() {
        let s = Arc::new(ExitState::default());
        assert_eq!(s.wait(Some(Duration::from_millis(10))), None);
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.wait(None));
        s.request(ExitReason::Reset);
        s.request(ExitReason::Stopped);
        assert_eq!(t.join().unwrap(), Some(ExitReason::Reset));
        assert!(s.should_stop());
        assert_eq!(s.reason(), Some(ExitReason::Reset));
    }
}
