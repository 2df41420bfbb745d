//! The virtio-mmio transport, version 2 (virtio 1.x §4.2.2). The guest programs queues and
//! features through these registers from a vCPU; queue notifications arrive through ioeventfds
//! registered with KVM (a notify that misses them is forwarded here), and the device runs on
//! the VMM's event loop.

use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{
    FdChange, FdWatch, Interrupt, VirtioDevice, FIRST_DEVICE_TOKEN, F_VERSION_1, INT_CONFIG,
    STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FAILED,
    STATUS_FEATURES_OK,
};
use crate::vstate::bus::BusDevice;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x4e52_4d56; // "VMRN"

pub const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_CONFIG: u64 = 0x100;
/// Size of the register window each device gets.
pub const WINDOW: u64 = 0x1000;

/// One queue as saved in a snapshot (virtio-queue's `QueueState`, which has no serde).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedQueue {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for SavedQueue {
    fn from(q: QueueState) -> Self {
        SavedQueue {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<SavedQueue> for QueueState {
    fn from(q: SavedQueue) -> Self {
        QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// A transport's registers, its queues and its pending interrupt, as a snapshot holds them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub device_type: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub acked_features: u64,
    pub queue_sel: u32,
    pub status: u32,
    pub config_generation: u32,
    pub active: bool,
    pub queues: Vec<SavedQueue>,
    pub interrupt_status: u32,
}

/// Why a saved transport does not fit the device it is restored into.
#[derive(Debug, Error)]
pub enum RestoreError {
    #[error("the snapshot has a device of type {saved} where this VM has type {here}")]
    DeviceType { saved: u32, here: u32 },
    #[error("device type {device}: the snapshot has {saved} queues, the device {here}")]
    QueueCount {
        device: u32,
        saved: usize,
        here: usize,
    },
    #[error("device type {device}: saved queue {index} is invalid ({reason})")]
    BadQueue {
        device: u32,
        index: usize,
        reason: String,
    },
    #[error("device type {device}: the device refused the saved queues: {source}")]
    Activate {
        device: u32,
        source: super::ActivateError,
    },
}

/// The device model shared between the transport (vCPU side) and the event loop.
pub type SharedDevice = Arc<Mutex<dyn VirtioDevice>>;

pub struct MmioTransport {
    device: SharedDevice,
    mem: GuestMemoryMmap,
    /// The queues as the driver programs them; handed to the device at DRIVER_OK.
    queues: Vec<Queue>,
    queue_max: Vec<u16>,
    queue_evts: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
    config: Vec<u8>,
    /// Cached so no register read waits for the device (which may be busy on the event loop).
    device_type: u32,
    features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    active: bool,
    /// The interrupt status a restore found pending, raised by `after_restore`.
    restored_interrupt: u32,
}

fn new_queues(sizes: &[u16]) -> std::io::Result<Vec<Queue>> {
    sizes
        .iter()
        .map(|s| Queue::new(*s).map_err(|e| std::io::Error::other(e.to_string())))
        .collect()
}

fn lock(d: &SharedDevice) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}

impl MmioTransport {
    pub fn new(
        device: SharedDevice,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
    ) -> std::io::Result<Self> {
        let (sizes, features, config, device_type) = {
            let d = lock(&device);
            (
                d.queue_max_sizes(),
                d.features() | F_VERSION_1,
                d.config(),
                d.device_type(),
            )
        };
        let queues = new_queues(&sizes)?;
        let queue_evts = sizes
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<std::io::Result<_>>()?;
        Ok(MmioTransport {
            device,
            mem,
            queues,
            queue_max: sizes,
            queue_evts,
            interrupt,
            config,
            device_type,
            features,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            active: false,
            restored_interrupt: 0,
        })
    }

    /// The notification eventfds, one per queue, to register as ioeventfds and with the loop.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    pub fn device(&self) -> SharedDevice {
        self.device.clone()
    }

    /// The transport as a snapshot keeps it; the device must be quiet (event loop stopped).
    pub fn save(&self) -> TransportState {
        let queues = if self.active {
            lock(&self.device).queue_states()
        } else {
            self.queues.iter().map(|q| q.state()).collect()
        };
        TransportState {
            device_type: self.device_type,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            status: self.status,
            config_generation: self.config_generation,
            active: self.active,
            queues: queues.into_iter().map(SavedQueue::from).collect(),
            interrupt_status: self.interrupt.status(),
        }
    }

    /// Puts a saved transport into this new one (same device type and queue count); an active
    /// device gets its queues back and is told it was restored. Every saved value is checked
    /// as a driver's write would be: a snapshot file is untrusted input.
    pub fn restore(&mut self, s: &TransportState) -> Result<(), RestoreError> {
        let device = self.device_type;
        if s.device_type != device {
            return Err(RestoreError::DeviceType {
                saved: s.device_type,
                here: device,
            });
        }
        if s.queues.len() != self.queue_max.len() {
            return Err(RestoreError::QueueCount {
                device,
                saved: s.queues.len(),
                here: self.queue_max.len(),
            });
        }
        let mut queues = Vec::with_capacity(s.queues.len());
        for (index, (q, &max)) in s.queues.iter().zip(&self.queue_max).enumerate() {
            let bad = |reason: String| RestoreError::BadQueue {
                device,
                index,
                reason,
            };
            if q.max_size != max {
                return Err(bad(format!(
                    "maximum size {} where the device has {max}",
                    q.max_size
                )));
            }
            let queue = Queue::try_from(QueueState::from(*q)).map_err(|e| bad(e.to_string()))?;
            if s.active && !queue.is_valid(&self.mem) {
                return Err(bad("its rings are not in guest memory".into()));
            }
            queues.push(queue);
        }
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.acked_features = s.acked_features & self.features;
        self.queue_sel = s.queue_sel;
        self.status = s.status;
        self.config_generation = s.config_generation;
        if s.active {
            lock(&self.device)
                .activate(self.mem.clone(), queues, self.acked_features)
                .map_err(|source| RestoreError::Activate { device, source })?;
            self.active = true;
        } else {
            self.queues = queues;
        }
        self.restored_interrupt = s.interrupt_status;
        Ok(())
    }

    /// Once the restored vCPUs exist (an interrupt raised before would reach no LAPIC): the
    /// device tells the guest what it must, and a pending interrupt is raised again.
    pub fn after_restore(&mut self) {
        if self.active {
            lock(&self.device).restored();
        }
        let pending = std::mem::take(&mut self.restored_interrupt);
        if pending != 0 {
            self.interrupt.signal(pending);
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        // Queue registers are only writable while features are settled and the driver is not
        // yet live.
        if self.status & STATUS_FEATURES_OK == 0 || self.status & STATUS_DRIVER_OK != 0 {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        if self.active {
            lock(&self.device).reset();
        }
        match new_queues(&self.queue_max) {
            Ok(q) => self.queues = q,
            Err(e) => log::error!("virtio-mmio: cannot recreate queues: {e}"),
        }
        self.active = false;
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.ack(u32::MAX);
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // Bits may only be added (§3.1.1), FAILED excepted.
        if v & self.status != self.status && v & STATUS_FAILED == 0 {
            log::debug!(
                "virtio-mmio: status {v:#x} drops bits of {:#x}; ignored",
                self.status
            );
            return;
        }
        let new = v & !self.status;
        if new & STATUS_FEATURES_OK != 0 && self.acked_features & !self.features != 0 {
            // Features the device never offered: refuse FEATURES_OK.
            self.status = v & !STATUS_FEATURES_OK;
            return;
        }
        self.status = v;
        if new & STATUS_DRIVER_OK != 0 && !self.active {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let wanted = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        let valid = self
            .queues
            .iter()
            .all(|q| q.ready() && q.is_valid(&self.mem));
        if self.status & wanted != wanted || !valid {
            log::warn!("virtio-mmio: DRIVER_OK with an incomplete setup (status {:#x}, queues valid: {valid})", self.status);
            self.needs_reset();
            return;
        }
        let queues = std::mem::take(&mut self.queues);
        let result = lock(&self.device).activate(self.mem.clone(), queues, self.acked_features);
        match result {
            Ok(()) => self.active = true,
            Err(e) => {
                log::warn!("virtio-mmio: activation failed: {e}");
                self.needs_reset();
            }
        }
    }

    fn needs_reset(&mut self) {
        self.status |= STATUS_DEVICE_NEEDS_RESET;
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.signal(INT_CONFIG);
    }

    fn read_reg(&self, offset: u64) -> u32 {
        // After activation the queues belong to the device and read as absent.
        let q = self.queues.get(self.queue_sel as usize);
        match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => self.device_type,
            0x00c => VENDOR,
            0x010 => match self.device_features_sel {
                0 => self.features as u32,
                1 => (self.features >> 32) as u32,
                _ => 0,
            },
            0x034 => q.map_or(0, |q| u32::from(q.max_size())),
            0x044 => q.map_or(0, |q| u32::from(q.ready())),
            0x060 => self.interrupt.status(),
            0x070 => self.status,
            0x0fc => self.config_generation,
            _ => {
                log::debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            0x014 => self.device_features_sel = v,
            0x020 => {
                if self.status & STATUS_DRIVER != 0 && self.status & STATUS_FEATURES_OK == 0 {
                    match self.driver_features_sel {
                        0 => {
                            self.acked_features =
                                (self.acked_features & !0xffff_ffff) | u64::from(v)
                        }
                        1 => {
                            self.acked_features =
                                (self.acked_features & 0xffff_ffff) | (u64::from(v) << 32)
                        }
                        _ => {}
                    }
                }
            }
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            0x038 => {
                if let Some(q) = self.selected_queue() {
                    // virtio-queue ignores sizes that are zero, too large or not a power of two;
                    // the queue then stays invalid and activation fails cleanly.
                    q.set_size(v as u16);
                }
            }
            0x044 => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            REG_QUEUE_NOTIFY => match self.queue_evts.get(v as usize) {
                Some(e) => {
                    let _ = e.write(1);
                }
                None => log::debug!("virtio-mmio: notify of unknown queue {v}"),
            },
            0x064 => self.interrupt.ack(v),
            0x070 => self.set_status(v),
            0x080 => self
                .selected_queue()
                .into_iter()
                .for_each(|q| q.set_desc_table_address(Some(v), None)),
            0x084 => self
                .selected_queue()
                .into_iter()
                .for_each(|q| q.set_desc_table_address(None, Some(v))),
            0x090 => self
                .selected_queue()
                .into_iter()
                .for_each(|q| q.set_avail_ring_address(Some(v), None)),
            0x094 => self
                .selected_queue()
                .into_iter()
                .for_each(|q| q.set_avail_ring_address(None, Some(v))),
            0x0a0 => self
                .selected_queue()
                .into_iter()
                .for_each(|q| q.set_used_ring_address(Some(v), None)),
            0x0a4 => self
                .selected_queue()
                .into_iter()
                .for_each(|q| q.set_used_ring_address(None, Some(v))),
            _ => log::debug!("virtio-mmio: write of {v:#x} to unknown register {offset:#x}"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            let start = (offset - REG_CONFIG) as usize;
            for (i, b) in data.iter_mut().enumerate() {
                *b = start
                    .checked_add(i)
                    .and_then(|j| self.config.get(j))
                    .copied()
                    .unwrap_or(0);
            }
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            log::debug!(
                "virtio-mmio: {}-byte read at {offset:#x} ignored",
                data.len()
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            // vmrun's device config spaces are read-only.
            log::debug!("virtio-mmio: config write at {offset:#x} ignored");
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(b) if offset.is_multiple_of(4) => self.write_reg(offset, u32::from_le_bytes(b)),
            _ => log::debug!(
                "virtio-mmio: {}-byte write at {offset:#x} ignored",
                data.len()
            ),
        }
    }
}

/// The event-loop side of one device: its queue eventfds.
pub struct QueueEvents {
    device: SharedDevice,
    evts: Vec<EventFd>,
}

impl QueueEvents {
    pub fn new(transport: &MmioTransport) -> std::io::Result<Self> {
        let evts = transport
            .queue_evts()
            .iter()
            .map(EventFd::try_clone)
            .collect::<std::io::Result<_>>()?;
        Ok(QueueEvents {
            device: transport.device(),
            evts,
        })
    }
}

fn watch_events(w: &FdWatch) -> Events {
    let mut set = EventSet::empty();
    if w.readable {
        set |= EventSet::IN;
    }
    if w.writable {
        set |= EventSet::OUT;
    }
    Events::with_data_raw(w.fd, w.token, set)
}

impl QueueEvents {
    fn apply_fd_changes(&mut self, ops: &mut EventOps) {
        let changes = lock(&self.device).take_fd_changes();
        for c in changes {
            let r = match c {
                FdChange::Add(w) => ops.add(watch_events(&w)),
                FdChange::Modify(w) => ops.modify(watch_events(&w)),
                FdChange::Remove(fd) => ops.remove(Events::empty_raw(fd)),
            };
            if let Err(e) = r {
                log::warn!("virtio: event loop refused {c:?}: {e:?}");
            }
        }
        lock(&self.device).fd_changes_applied();
    }
}

impl MutEventSubscriber for QueueEvents {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, e) in self.evts.iter().enumerate() {
            if let Err(err) = ops.add(Events::with_data(e, i as u32, EventSet::IN)) {
                log::error!("virtio: cannot watch queue {i}: {err:?}");
            }
        }
        let fds = lock(&self.device).initial_fds();
        for w in fds {
            if let Err(err) = ops.add(watch_events(&w)) {
                log::error!("virtio: cannot watch fd {}: {err:?}", w.fd);
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let token = events.data();
        if token < FIRST_DEVICE_TOKEN {
            if let Some(e) = self.evts.get(token as usize) {
                // Draining the counter; a spurious wake-up just finds an empty queue.
                let _ = e.read();
                lock(&self.device).process_queue(token as usize);
            }
        } else {
            let set = events.event_set();
            lock(&self.device).process_fd(
                token,
                set.contains(EventSet::IN),
                set.contains(EventSet::OUT),
                set.intersects(EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP),
            );
        }
        self.apply_fd_changes(ops);
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ActivateError, INT_VRING};
    use super::*;
    use vm_memory::GuestAddress;

    #[derive(Default)]
    struct Fake {
        activated: Option<(usize, u64)>,
        resets: u32,
        processed: Vec<usize>,
    }

    impl VirtioDevice for Fake {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![16, 16]
        }
        fn features(&self) -> u64 {
            1 << 3
        }
        fn config(&self) -> Vec<u8> {
            vec![1, 2, 3, 4, 5, 6, 7, 8]
        }
        fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
            Vec::new()
        }
        fn activate(
            &mut self,
            _: GuestMemoryMmap,
            queues: Vec<Queue>,
            features: u64,
        ) -> Result<(), ActivateError> {
            self.activated = Some((queues.len(), features));
            Ok(())
        }
        fn reset(&mut self) {
            self.resets += 1;
            self.activated = None;
        }
        fn process_queue(&mut self, index: usize) {
            self.processed.push(index);
        }
    }

    fn setup() -> (MmioTransport, Arc<Mutex<Fake>>, Arc<Interrupt>) {
        let fake = Arc::new(Mutex::new(Fake::default()));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let t = MmioTransport::new(fake.clone(), mem, irq.clone()).unwrap();
        (t, fake, irq)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// What Linux does: reset, ACK, DRIVER, features, FEATURES_OK, queues, DRIVER_OK.
    fn drive_to_ok(t: &mut MmioTransport, features_hi: u32) {
        w(t, 0x70, 0);
        w(t, 0x70, STATUS_ACKNOWLEDGE);
        w(t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(t, 0x24, 0);
        w(t, 0x20, 1 << 3);
        w(t, 0x24, 1);
        w(t, 0x20, features_hi);
        w(
            t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        for q in 0..2u32 {
            w(t, 0x30, q);
            assert_eq!(r(t, 0x34), 16);
            w(t, 0x38, 16);
            let base = 0x1000 * (q + 1) * 4;
            w(t, 0x80, base);
            w(t, 0x84, 0);
            w(t, 0x90, base + 0x100);
            w(t, 0x94, 0);
            w(t, 0xa0, base + 0x200);
            w(t, 0xa4, 0);
            w(t, 0x44, 1);
        }
        w(
            t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
    }

    #[test]
    fn identity_registers() {
        let (mut t, _, _) = setup();
        assert_eq!(r(&mut t, 0x000), MAGIC);
        assert_eq!(r(&mut t, 0x004), 2);
        assert_eq!(r(&mut t, 0x008), 42);
        w(&mut t, 0x14, 0);
        assert_eq!(r(&mut t, 0x10), 1 << 3);
        w(&mut t, 0x14, 1);
        assert_eq!(r(&mut t, 0x10), 1, "VERSION_1 is offered");
        let mut cfg = [0u8; 3];
        t.read(REG_CONFIG + 2, &mut cfg);
        assert_eq!(cfg, [3, 4, 5]);
        let mut past = [9u8; 4];
        t.read(REG_CONFIG + 6, &mut past);
        assert_eq!(past, [7, 8, 0, 0], "reads past the config are zero");
        t.read(u64::MAX - 0x200, &mut past);
        assert_eq!(past, [0; 4]);
    }

    #[test]
    fn driver_ok_activates_with_the_acked_features() {
        let (mut t, fake, _) = setup();
        drive_to_ok(&mut t, 1);
        assert_eq!(
            fake.lock().unwrap().activated,
            Some((2, (1 << 32) | (1 << 3)))
        );
        assert_eq!(r(&mut t, 0x70) & STATUS_DEVICE_NEEDS_RESET, 0);
        // Queue registers are frozen once live.
        w(&mut t, 0x30, 0);
        w(&mut t, 0x38, 4);
        assert_eq!(r(&mut t, 0x34), 0, "queues now belong to the device");
        // Reset gives the queues back and resets the device.
        w(&mut t, 0x70, 0);
        assert_eq!(fake.lock().unwrap().resets, 1);
        assert_eq!(r(&mut t, 0x70), 0);
        assert_eq!(r(&mut t, 0x34), 16);
    }

    #[test]
    fn unoffered_features_refuse_features_ok() {
        let (mut t, fake, _) = setup();
        w(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(&mut t, 0x24, 0);
        w(&mut t, 0x20, 1 << 7);
        w(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(r(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
        assert!(fake.lock().unwrap().activated.is_none());
    }

    #[test]
    fn driver_ok_with_invalid_queues_asks_for_reset() {
        let (mut t, fake, irq) = setup();
        w(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        w(&mut t, 0x30, 0);
        w(&mut t, 0x38, 3); // not a power of two
        w(&mut t, 0x44, 1);
        w(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert!(fake.lock().unwrap().activated.is_none());
        assert_ne!(r(&mut t, 0x70) & STATUS_DEVICE_NEEDS_RESET, 0);
        assert_ne!(irq.status() & INT_CONFIG, 0);
    }

    #[test]
    fn notify_interrupt_ack_and_odd_accesses() {
        let (mut t, fake, irq) = setup();
        drive_to_ok(&mut t, 1);
        w(&mut t, REG_QUEUE_NOTIFY, 1);
        w(&mut t, REG_QUEUE_NOTIFY, 99); // unknown queue: ignored
        assert_eq!(t.queue_evts()[1].read().unwrap(), 1);
        irq.signal(INT_VRING);
        assert_eq!(r(&mut t, 0x60), INT_VRING);
        w(&mut t, 0x64, INT_VRING);
        assert_eq!(r(&mut t, 0x60), 0);
        // Narrow or unaligned register accesses are ignored, never a panic.
        t.write(0x70, &[0]);
        t.write(0x71, &[0, 0, 0, 0]);
        let mut b = [0u8; 2];
        t.read(0x00, &mut b);
        assert_eq!(b, [0, 0]);
        assert!(
            fake.lock().unwrap().activated.is_some(),
            "status untouched by the odd writes"
        );
        // Status bits cannot be taken back except by reset.
        w(&mut t, 0x70, STATUS_ACKNOWLEDGE);
        assert_ne!(r(&mut t, 0x70) & STATUS_DRIVER_OK, 0);
        assert!(fake.lock().unwrap().processed.is_empty());
    }
}
