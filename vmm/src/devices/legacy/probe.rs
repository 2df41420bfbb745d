//! The probe port test guests write to: each write is timestamped on the host, so a test (or
//! `vmrun doctor`'s timing probe) can time points of a guest's run. Wired only for test
//! programs, never into a Linux guest.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::vstate::bus::BusDevice;

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

/// Written to a probe by a test program, makes the vCPU thread call `uname`, which its seccomp
/// filter forbids (the probes exist only for test programs, never for a Linux guest).
pub const FORBIDDEN_CALL: u32 = 0x5ecc_0bad;

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
        if u32::from_le_bytes(v) == FORBIDDEN_CALL {
            // What a compromised device model would do: a system call no vCPU thread makes.
            // SAFETY: uname writes into the struct we own.
            unsafe {
                let mut u: libc::utsname = std::mem::zeroed();
                libc::uname(&mut u);
            }
        }
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
