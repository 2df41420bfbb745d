//! Address-range routing for PIO and MMIO exits. An access no device claims is counted and
//! ignored (reads see all-ones, like an empty ISA bus); it is never an error for the VMM.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use thiserror::Error;

/// A device on a bus. `offset` is relative to the device's base address.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    #[error("device range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    #[error("device range at {0:#x} is empty or wraps the address space")]
    BadRange(u64),
}

type Device = Arc<Mutex<dyn BusDevice>>;

/// Ranges keyed by base address.
#[derive(Default)]
pub struct Bus {
    devices: BTreeMap<u64, (u64, Device)>,
    unhandled: AtomicU64,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, device: Device, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange(base))?;
        let overlaps = self
            .devices
            .range(..end)
            .next_back()
            .is_some_and(|(b, (l, _))| b + l > base);
        if overlaps {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(base, (len, device));
        Ok(())
    }

    fn resolve(&self, addr: u64, size: usize) -> Option<(u64, &Device)> {
        let (base, (len, dev)) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset.checked_add(size as u64)? <= *len).then_some((offset, dev))
    }

    /// Routes a read; returns false when no device claims the range.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                // A poisoned lock means a device thread panicked; keep serving the guest.
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                self.count_unhandled(addr, "read");
                false
            }
        }
    }

    /// Routes a write; returns false when no device claims the range.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(offset, data);
                true
            }
            None => {
                self.count_unhandled(addr, "write");
                false
            }
        }
    }

    fn count_unhandled(&self, addr: u64, what: &str) {
        let n = self.unhandled.fetch_add(1, Ordering::Relaxed);
        // Log the first few and then every 1000th, so a guest spinning on a port cannot flood.
        if n < 16 || n.is_multiple_of(1000) {
            log::debug!("unhandled {what} at {addr:#x} ({} so far)", n + 1);
        }
    }

    /// How many accesses no device claimed.
    pub fn unhandled(&self) -> u64 {
        self.unhandled.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_and_offset() {
        let dev = Arc::new(Mutex::new(Echo(vec![])));
        let mut bus = Bus::new();
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b, [2]);
        assert!(bus.write(0x3ff, &[7]));
        assert_eq!(dev.lock().unwrap().0, vec![(7, vec![7])]);
        // An access straddling the end is not the device's.
        let mut w = [0u8; 2];
        assert!(!bus.read(0x3ff, &mut w));
        assert_eq!(w, [0xff, 0xff]);
        assert!(!bus.write(0x400, &[1]));
        assert!(!bus.write(0x3f7, &[1]));
        assert_eq!(bus.unhandled(), 3);
    }

    #[test]
    fn overlapping_and_empty_ranges_are_refused() {
        let mut bus = Bus::new();
        let d = || Arc::new(Mutex::new(Echo(vec![]))) as Device;
        bus.insert(d(), 0x100, 0x10).unwrap();
        assert_eq!(
            bus.insert(d(), 0x10f, 1),
            Err(BusError::Overlap {
                base: 0x10f,
                len: 1
            })
        );
        assert_eq!(
            bus.insert(d(), 0xf8, 0x10),
            Err(BusError::Overlap {
                base: 0xf8,
                len: 0x10
            })
        );
        assert_eq!(bus.insert(d(), 0x200, 0), Err(BusError::BadRange(0x200)));
        assert_eq!(
            bus.insert(d(), u64::MAX, 2),
            Err(BusError::BadRange(u64::MAX))
        );
        bus.insert(d(), 0x110, 1).unwrap();
        bus.insert(d(), 0xf0, 0x10).unwrap();
    }
}
