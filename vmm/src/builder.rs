//! Assembles a VM from a [`VmConfig`], in Firecracker's order: memory → IRQ chip and PIT →
//! legacy devices → virtio devices → payload → MP table → vCPUs; then the event loop and the
//! vCPU threads run until the VM ends.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{IoEventAddress, VmFd};
use thiserror::Error;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::boot_params::{self, BootParamsError};
use crate::arch::x86_64::layout::{self, PROBE_MMIO, PROBE_PORT, PROGRAM_STACK};
use crate::arch::x86_64::mptable::{self, MptableError};
use crate::arch::x86_64::vcpu_state::{self, StateError};
use crate::boot::{self, Entry, LoadError};
use crate::config::{DiskConfig, Payload, VmConfig, VsockConfig};
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::probe::ProbePort;
use crate::devices::legacy::serial::{
    Console, ConsoleSink, ConsoleTail, SerialConsole, SerialSaved,
};
use crate::devices::legacy::status::StatusPort;
use crate::devices::legacy::{GuestSignal, GuestSignals};
use crate::devices::virtio::block::{Block, BlockError, BlockMetrics, Disk};
use crate::devices::virtio::mmio::{
    MmioTransport, QueueEvents, RestoreError, SharedDevice, REG_QUEUE_NOTIFY, WINDOW,
};
use crate::devices::virtio::vsock::{Vsock, VsockError, VsockMetrics};
use crate::devices::virtio::Interrupt;
use crate::snapshot::{
    MachineState, Snapshot, SnapshotError, SnapshotInfo, MEMORY_FILE, STATE_FILE,
};
use crate::vstate::bus::BusError;
use crate::vstate::exit::{ExitReason, ExitState};
use crate::vstate::memory::{self, MemoryError};
use crate::vstate::stats;
use crate::vstate::vcpu::{self, Buses, PauseGate, Vcpu, VcpuError, VcpuSetup};
use crate::vstate::vm::{self, KvmError};

/// Event-loop subscribers: devices shared with the vCPU side.
type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;
type Events = EventManager<Subscriber>;
/// How often the event loop checks whether the VM stopped.
const EVENT_POLL_MS: i32 = 100;
/// How long the vCPUs get to park for a snapshot.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum StartError {
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    BootParams(#[from] BootParamsError),
    #[error(transparent)]
    Mptable(#[from] MptableError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("{0} vCPUs requested; vmrun supports 1 to {max}", max = layout::MAX_VCPUS)]
    Vcpus(u8),
    #[error("device setup: {0}")]
    Bus(#[from] BusError),
    #[error("cannot create the eventfd of IRQ {irq}: {source}")]
    IrqEvent { irq: u32, source: std::io::Error },
    #[error("cannot wire IRQ {irq}: {source}")]
    Irq { irq: u32, source: kvm_ioctls::Error },
    #[error("cannot wire the queue-notify eventfd of the virtio device at {addr:#x}: {source}")]
    Ioevent {
        addr: u64,
        source: kvm_ioctls::Error,
    },
    #[error("virtio transport at {addr:#x}: {source}")]
    Transport { addr: u64, source: std::io::Error },
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error("{0} virtio devices requested; vmrun has IRQs for {max}", max = layout::IRQ_MAX - layout::IRQ_BASE + 1)]
    TooManyDevices(usize),
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error("guest CID {0} is reserved; use 3 or more (below 2^32 - 1)")]
    ReservedCid(u64),
    #[error("cannot create the device event loop: {0:?}")]
    EventLoop(event_manager::Error),
    #[error("cannot start the device event-loop thread: {0}")]
    EventThread(std::io::Error),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("restoring the snapshot: {0}")]
    State(#[from] StateError),
    #[error("restoring the snapshot: {0}")]
    Device(#[from] RestoreError),
    #[error("the snapshot does not fit this VM: {0}")]
    Mismatch(String),
}

/// Why a snapshot could not be taken. The VM is left paused (resume or stop it).
#[derive(Debug, Error)]
pub enum SaveError {
    #[error("the VM is not running (it ended or is already paused)")]
    NotRunning,
    #[error("the vCPUs did not pause within {0:?}")]
    PauseTimeout(Duration),
    #[error(transparent)]
    Vcpu(#[from] StateError),
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    File(#[from] SnapshotError),
    #[error("cannot restart the device event loop: {0}")]
    EventThread(std::io::Error),
}

/// Turns what the guest signals through legacy devices into the VM's end.
struct ExitOnSignal(Arc<ExitState>);

impl GuestSignals for ExitOnSignal {
    fn signal(&self, s: GuestSignal) {
        self.0.request(match s {
            GuestSignal::Reset => ExitReason::Reset,
            GuestSignal::Status(st) => ExitReason::Status(st),
            GuestSignal::BadStatus { kind, code } => ExitReason::BadStatus { kind, code },
        });
    }
}

#[derive(Default)]
struct VirtioSet {
    params: Vec<String>,
    block_metrics: Vec<Arc<BlockMetrics>>,
    vsock_metrics: Option<Arc<VsockMetrics>>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
}

/// The probe port and window of a test program.
struct Probes {
    pio: ProbePort,
    mmio: ProbePort,
}

/// A running VM. Dropping it stops the vCPUs and frees the guest.
pub struct Vmm {
    exit: Arc<ExitState>,
    threads: Vec<JoinHandle<()>>,
    tail: ConsoleTail,
    probes: Option<Probes>,
    block_metrics: Vec<Arc<BlockMetrics>>,
    vsock_metrics: Option<Arc<VsockMetrics>>,
    first_run: Arc<AtomicU64>,
    event_thread: Option<JoinHandle<Events>>,
    /// The event loop while paused (its thread handed it back).
    events: Option<Events>,
    hold_events: Arc<AtomicBool>,
    pause: Arc<PauseGate>,
    msr_list: Arc<Vec<u32>>,
    serial: Arc<Mutex<SerialConsole>>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    vcpu_count: u8,
    mem_mib: u64,
    seccomp: Option<Arc<crate::seccomp::Filters>>,
    started: Instant,
    // The VM fd and the memory KVM maps, kept alive for the vCPU threads.
    vm: VmFd,
    mem: GuestMemoryMmap,
    /// The snapshot memory file a restored VM's RAM is mapped from: a later snapshot copies
    /// the pages the guest never wrote from it instead of reading them.
    mem_source: Option<std::fs::File>,
    _stats: Vec<std::fs::File>,
}

/// Where a snapshot goes: its state and memory files, open and empty, with their paths for
/// messages.
pub struct SnapshotFiles<'a> {
    pub state: (&'a Path, &'a std::fs::File),
    pub memory: (&'a Path, &'a std::fs::File),
}

/// The devices `assemble` made, for the VM and for snapshots.
struct Devices {
    buses: Buses,
    serial: Arc<Mutex<SerialConsole>>,
}

impl Vmm {
    /// Boots `cfg`'s payload.
    pub fn start(cfg: VmConfig) -> Result<Vmm, StartError> {
        Self::assemble(cfg, None)
    }

    /// Starts the VM a snapshot holds. `cfg` describes the same machine (memory, vCPUs, the
    /// disks in the same order, vsock or not) with this VM's own files (its vsock socket, its
    /// upper disk); its payload is not loaded: guest memory is the snapshot's, mapped
    /// copy-on-write.
    pub fn restore(cfg: VmConfig, snapshot: &Snapshot) -> Result<Vmm, StartError> {
        let info = &snapshot.info;
        if info.vcpus != cfg.vcpus || info.mem_mib != cfg.mem_mib {
            return Err(StartError::Mismatch(format!(
                "it holds {} vCPUs and {} MiB, the VM asks for {} and {}",
                info.vcpus, info.mem_mib, cfg.vcpus, cfg.mem_mib
            )));
        }
        let devices = cfg.disks.len() + usize::from(cfg.vsock.is_some());
        if snapshot.machine.transports.len() != devices {
            return Err(StartError::Mismatch(format!(
                "it holds {} virtio devices, the VM has {devices}",
                snapshot.machine.transports.len()
            )));
        }
        Self::assemble(cfg, Some(snapshot))
    }

    fn assemble(mut cfg: VmConfig, from: Option<&Snapshot>) -> Result<Vmm, StartError> {
        let started = Instant::now();
        if cfg.vcpus == 0 || cfg.vcpus > layout::MAX_VCPUS {
            return Err(StartError::Vcpus(cfg.vcpus));
        }
        let mem_size = cfg
            .mem_mib
            .checked_mul(1 << 20)
            .ok_or(MemoryError::TooLarge(u64::MAX))?;
        if mem_size < boot_params::MIN_MEMORY {
            return Err(BootParamsError::MemoryTooSmall(cfg.mem_mib).into());
        }
        let kvm = vm::open_kvm()?;
        let msr_list = Arc::new(
            kvm.get_msr_index_list()
                .map(|l| l.as_slice().to_vec())
                .map_err(|source| VcpuError::Setup {
                    cpu: 0,
                    what: "KVM_GET_MSR_INDEX_LIST",
                    source,
                })?,
        );
        let vm = vm::create_vm(&kvm)?;
        let (mem, mem_source) = match from {
            None => (memory::create(mem_size)?, None),
            Some(s) => {
                let path = s.memory_path();
                let file = std::fs::File::open(&path).map_err(|source| SnapshotError::Io {
                    path: path.clone(),
                    source,
                })?;
                (memory::map_file(mem_size, &file)?, Some(file))
            }
        };
        memory::register(&vm, &mem)?;
        if let Some(s) = from {
            vm::restore_state(&vm, &s.machine.vm)?;
        }

        let exit = Arc::new(ExitState::default());
        let tail = ConsoleTail::default();
        let console = std::mem::replace(&mut cfg.console, ConsoleSink::None);
        let Devices { mut buses, serial } =
            Self::legacy_devices(&vm, &exit, &tail, console, from.map(|s| &s.machine.serial))?;
        let probes = if cfg.probes {
            Some(Self::probe_devices(&mut buses)?)
        } else {
            None
        };
        let mut events = Events::new().map_err(StartError::EventLoop)?;
        let VirtioSet {
            params: virtio_params,
            block_metrics,
            vsock_metrics,
            transports,
        } = Self::virtio_devices(
            &vm,
            &mem,
            &mut buses,
            &mut events,
            &cfg.disks,
            cfg.vsock.as_ref(),
        )?;
        let buses = Arc::new(buses);
        let pause = Arc::new(PauseGate::default());
        let first_run = Arc::new(AtomicU64::new(0));

        let vcpus = match from {
            None => {
                let entry = Self::load_payload(&mem, mem_size, &cfg, &virtio_params)?;
                mptable::setup(&mem, cfg.vcpus)?;
                Self::create_vcpus(
                    &kvm, &vm, &mem, &cfg, &entry, &buses, &exit, &pause, &first_run,
                )?
            }
            Some(s) => {
                for (t, saved) in transports.iter().zip(&s.machine.transports) {
                    t.lock().unwrap_or_else(|e| e.into_inner()).restore(saved)?;
                }
                let mut v = Vec::with_capacity(cfg.vcpus as usize);
                for (i, state) in s.machine.vcpus.iter().enumerate() {
                    let vcpu = Vcpu::new(
                        &vm,
                        i as u8,
                        buses.clone(),
                        exit.clone(),
                        pause.clone(),
                        first_run.clone(),
                    )?;
                    vcpu.restore(state)?;
                    v.push(vcpu);
                }
                for t in &transports {
                    t.lock().unwrap_or_else(|e| e.into_inner()).after_restore();
                }
                v
            }
        };
        // Kept open for readers outside this process (`vmrun profile`).
        let stats = std::iter::once(stats::open(&vm))
            .chain(vcpus.iter().map(|v| stats::open(&v.fd)))
            .flatten()
            .collect();
        let hold_events = Arc::new(AtomicBool::new(false));
        let mut vmm = Vmm {
            exit: exit.clone(),
            threads: Vec::new(),
            tail,
            probes,
            block_metrics,
            vsock_metrics,
            first_run,
            event_thread: None,
            events: None,
            hold_events,
            pause,
            msr_list,
            serial,
            transports,
            vcpu_count: cfg.vcpus,
            mem_mib: cfg.mem_mib,
            seccomp: cfg.seccomp.clone(),
            started,
            vm,
            mem,
            mem_source,
            _stats: stats,
        };
        // The last step as root in a jail: every thread from here on, and so every guest
        // instruction, runs as the jail's unprivileged user.
        if let Some(user) = cfg.run_as {
            user.become_it(cfg.vcpus)?;
        }
        vmm.event_thread = Some(vmm.spawn_events(events).map_err(StartError::EventThread)?);
        for mut v in vcpus {
            v.set_seccomp(vmm.seccomp.clone());
            // On failure, Drop stops the threads already started.
            vmm.threads.push(v.spawn()?);
        }
        Ok(vmm)
    }

    /// Runs the device event loop on its own thread until the VM stops or a pause holds it;
    /// the thread hands the loop back.
    fn spawn_events(&self, mut events: Events) -> std::io::Result<JoinHandle<Events>> {
        let exit = self.exit.clone();
        let hold = self.hold_events.clone();
        let seccomp = self.seccomp.clone();
        std::thread::Builder::new()
            .name("vmm-events".into())
            .spawn(move || {
                if let Some(f) = seccomp {
                    if let Err(e) = crate::seccomp::apply("event-loop", &f.events) {
                        log::error!("{e}");
                        exit.request(ExitReason::Stopped);
                        return events;
                    }
                }
                while !exit.should_stop() && !hold.load(Ordering::SeqCst) {
                    if let Err(e) = events.run_with_timeout(EVENT_POLL_MS) {
                        log::error!("event loop: {e:?}");
                        break;
                    }
                }
                events
            })
    }

    /// Loads the kernel (with the virtio devices added to its command line) or test program.
    fn load_payload(
        mem: &GuestMemoryMmap,
        mem_size: u64,
        cfg: &VmConfig,
        virtio_params: &[String],
    ) -> Result<Entry, StartError> {
        let entry = match &cfg.payload {
            Payload::Linux {
                kernel,
                initrd,
                cmdline,
                protocol,
            } => {
                let mut cmdline = cmdline.clone();
                for p in virtio_params {
                    cmdline.push(' ');
                    cmdline.push_str(p);
                }
                boot::load_linux(
                    mem,
                    mem_size,
                    kernel,
                    initrd.as_deref(),
                    cmdline.trim(),
                    *protocol,
                )?
            }
            Payload::Program { code, mode } => boot::load_program(mem, code, *mode)?,
        };
        Ok(entry)
    }

    /// The vCPUs, configured to start at `entry` (application processors wait for INIT/SIPI
    /// unless the payload is a test program).
    #[allow(clippy::too_many_arguments)]
    fn create_vcpus(
        kvm: &kvm_ioctls::Kvm,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        cfg: &VmConfig,
        entry: &Entry,
        buses: &Arc<Buses>,
        exit: &Arc<ExitState>,
        pause: &Arc<PauseGate>,
        first_run: &Arc<AtomicU64>,
    ) -> Result<Vec<Vcpu>, StartError> {
        let base_cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VcpuError::Setup {
                cpu: 0,
                what: "KVM_GET_SUPPORTED_CPUID",
                source: e,
            })?;
        let program = matches!(cfg.payload, Payload::Program { .. });
        let mut vcpus = Vec::with_capacity(cfg.vcpus as usize);
        for i in 0..cfg.vcpus {
            let mut v = Vcpu::new(
                vm,
                i,
                buses.clone(),
                exit.clone(),
                pause.clone(),
                first_run.clone(),
            )?;
            v.configure(
                mem,
                &VcpuSetup {
                    mode: entry.mode,
                    entry: entry.addr,
                    stack: program.then(|| PROGRAM_STACK - 0x1000 * u64::from(i)),
                    base_cpuid: &base_cpuid,
                    count: cfg.vcpus,
                    all_runnable: program,
                    hide_pv_hypercalls: cfg.hide_pv_hypercalls,
                },
            )?;
            vcpus.push(v);
        }
        Ok(vcpus)
    }

    fn irq_event(irq: u32) -> Result<EventFd, StartError> {
        EventFd::new(libc::EFD_NONBLOCK).map_err(|source| StartError::IrqEvent { irq, source })
    }

    /// Serial console, i8042 and status port on the PIO bus.
    fn legacy_devices(
        vm: &VmFd,
        exit: &Arc<ExitState>,
        tail: &ConsoleTail,
        sink: ConsoleSink,
        saved_serial: Option<&SerialSaved>,
    ) -> Result<Devices, StartError> {
        let serial_irq = Self::irq_event(layout::SERIAL_IRQ)?;
        vm.register_irqfd(&serial_irq, layout::SERIAL_IRQ)
            .map_err(|source| StartError::Irq {
                irq: layout::SERIAL_IRQ,
                source,
            })?;
        let console = Console::new(sink, tail.clone());
        let serial = match saved_serial {
            None => SerialConsole::new(serial_irq, console),
            Some(saved) => {
                SerialConsole::from_saved(serial_irq, console, saved).ok_or_else(|| {
                    StartError::Mismatch("its serial port state is not one a UART can be in".into())
                })?
            }
        };
        let serial = Arc::new(Mutex::new(serial));
        let signals: Arc<dyn GuestSignals> = Arc::new(ExitOnSignal(exit.clone()));

        let mut buses = Buses::default();
        buses
            .pio
            .insert(serial.clone(), u64::from(layout::SERIAL_PORT), 8)?;
        buses.pio.insert(
            Arc::new(Mutex::new(I8042::new(signals.clone()))),
            u64::from(layout::I8042_PORT),
            5,
        )?;
        buses.pio.insert(
            Arc::new(Mutex::new(StatusPort::new(signals))),
            u64::from(layout::STATUS_PORT),
            2,
        )?;
        Ok(Devices { buses, serial })
    }

    /// The probe port and window, for test programs only.
    fn probe_devices(buses: &mut Buses) -> Result<Probes, StartError> {
        let probes = Probes {
            pio: ProbePort::default(),
            mmio: ProbePort::default(),
        };
        buses.pio.insert(
            Arc::new(Mutex::new(probes.pio.clone())),
            u64::from(PROBE_PORT),
            4,
        )?;
        buses.mmio.insert(
            Arc::new(Mutex::new(probes.mmio.clone())),
            PROBE_MMIO,
            0x1000,
        )?;
        Ok(probes)
    }

    /// Creates the virtio-mmio devices (disks in order, then vsock): bus windows, irqfds,
    /// ioeventfds, event-loop subscribers. Returns the kernel parameters that announce them.
    fn virtio_devices(
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        buses: &mut Buses,
        events: &mut Events,
        disks: &[DiskConfig],
        vsock: Option<&VsockConfig>,
    ) -> Result<VirtioSet, StartError> {
        let slots = (layout::IRQ_MAX - layout::IRQ_BASE + 1) as usize;
        let count = disks.len() + usize::from(vsock.is_some());
        if count > slots {
            return Err(StartError::TooManyDevices(count));
        }
        let mut set = VirtioSet::default();
        let mut attach = |slot: usize,
                          device: SharedDevice,
                          interrupt: Arc<Interrupt>|
         -> Result<(), StartError> {
            let addr = layout::VIRTIO_MMIO_START + slot as u64 * WINDOW;
            let irq = layout::IRQ_BASE + slot as u32;
            vm.register_irqfd(interrupt.eventfd(), irq)
                .map_err(|source| StartError::Irq { irq, source })?;
            let transport = MmioTransport::new(device, mem.clone(), interrupt)
                .map_err(|source| StartError::Transport { addr, source })?;
            for (q, e) in transport.queue_evts().iter().enumerate() {
                vm.register_ioevent(e, &IoEventAddress::Mmio(addr + REG_QUEUE_NOTIFY), q as u32)
                    .map_err(|source| StartError::Ioevent { addr, source })?;
            }
            let sub: Subscriber = Arc::new(Mutex::new(
                QueueEvents::new(&transport)
                    .map_err(|source| StartError::Transport { addr, source })?,
            ));
            events.add_subscriber(sub);
            let transport = Arc::new(Mutex::new(transport));
            set.transports.push(transport.clone());
            buses.mmio.insert(transport, addr, WINDOW)?;
            set.params
                .push(format!("virtio_mmio.device=4K@{addr:#x}:{irq}"));
            Ok(())
        };
        let new_interrupt = |slot: usize| -> Result<Arc<Interrupt>, StartError> {
            let evt = Self::irq_event(layout::IRQ_BASE + slot as u32)?;
            Ok(Arc::new(Interrupt::new(evt)))
        };
        for (slot, d) in disks.iter().enumerate() {
            let interrupt = new_interrupt(slot)?;
            let block = Block::new(Disk::open(&d.path, d.read_only)?, interrupt.clone());
            set.block_metrics.push(block.metrics());
            attach(slot, Arc::new(Mutex::new(block)), interrupt)?;
        }
        if let Some(v) = vsock {
            if v.cid < 3 || v.cid >= u64::from(u32::MAX) {
                return Err(StartError::ReservedCid(v.cid));
            }
            let interrupt = new_interrupt(disks.len())?;
            let dev = Vsock::new(v.cid, &v.uds_path, interrupt.clone())?;
            set.vsock_metrics = Some(dev.metrics());
            attach(disks.len(), Arc::new(Mutex::new(dev)), interrupt)?;
        }
        Ok(set)
    }

    /// Waits for the VM to end, at most `timeout`; `None` when it is still running.
    pub fn wait(&self, timeout: Option<Duration>) -> Option<ExitReason> {
        self.exit.wait(timeout)
    }

    /// Pauses the VM: every vCPU parks outside KVM_RUN with its state saved, and the device
    /// event loop stops, so guest memory and device state hold still. Returns the saved vCPU
    /// states in index order.
    fn pause(&mut self) -> Result<Vec<vcpu_state::VcpuState>, SaveError> {
        if self.exit.should_stop() || self.event_thread.is_none() {
            return Err(SaveError::NotRunning);
        }
        let has_xcrs = vcpu_state::has_xcrs(&self.vm);
        self.pause.request(self.msr_list.clone(), has_xcrs);
        let n = self.threads.len();
        let pause = self.pause.clone();
        let parked = vcpu::kick_until(&self.threads, PAUSE_TIMEOUT, || pause.parked() == n);
        // The event loop stops either way: resume() restarts it.
        self.hold_events.store(true, Ordering::SeqCst);
        if let Some(t) = self.event_thread.take() {
            match t.join() {
                Ok(events) => self.events = Some(events),
                Err(_) => log::error!("the event-loop thread panicked"),
            }
        }
        if !parked {
            return Err(if self.exit.should_stop() {
                SaveError::NotRunning
            } else {
                SaveError::PauseTimeout(PAUSE_TIMEOUT)
            });
        }
        self.pause
            .take_saved()
            .into_iter()
            .map(|r| r.map_err(SaveError::from))
            .collect()
    }

    /// Lets a paused VM run on.
    pub fn resume(&mut self) -> Result<(), SaveError> {
        if let Some(events) = self.events.take() {
            self.hold_events.store(false, Ordering::SeqCst);
            self.event_thread = Some(self.spawn_events(events).map_err(SaveError::EventThread)?);
        }
        self.pause.release();
        Ok(())
    }

    /// Pauses the VM and writes a snapshot of it into the existing, empty directory `dir`:
    /// `memory` (guest RAM, sparse) and `state` (`info` and the machine state). The VM stays
    /// paused: [`Vmm::resume`] it or drop it. Returns the bytes of RAM the dump covers.
    pub fn snapshot(&mut self, dir: &Path, info: &SnapshotInfo) -> Result<u64, SaveError> {
        let create = |name: &str| {
            let path = dir.join(name);
            std::fs::File::create(&path)
                .map(|f| (path.clone(), f))
                .map_err(|source| SnapshotError::Io { path, source })
        };
        let (state_path, state) = create(STATE_FILE)?;
        let (memory_path, memory) = create(MEMORY_FILE)?;
        self.snapshot_into(
            SnapshotFiles {
                state: (&state_path, &state),
                memory: (&memory_path, &memory),
            },
            info,
        )
    }

    /// As [`Vmm::snapshot`], into files the caller opened (a jailed VMM cannot create them).
    pub fn snapshot_into(
        &mut self,
        files: SnapshotFiles,
        info: &SnapshotInfo,
    ) -> Result<u64, SaveError> {
        let vcpus = self.pause()?;
        let transports = self
            .transports
            .iter()
            .map(|t| t.lock().unwrap_or_else(|e| e.into_inner()).save())
            .collect();
        let serial = self.serial.lock().unwrap_or_else(|e| e.into_inner()).save();
        let machine = MachineState {
            vm: vm::save_state(&self.vm)?,
            vcpus,
            serial,
            transports,
        };
        let info = SnapshotInfo {
            vcpus: self.vcpu_count,
            mem_mib: self.mem_mib,
            ..info.clone()
        };
        let (path, file) = files.memory;
        let bytes = memory::dump(&self.mem, file, self.mem_source.as_ref())?;
        file.sync_all().map_err(|source| SnapshotError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Snapshot::write_state_to(files.state.0, files.state.1, &info, &machine)?;
        Ok(bytes)
    }

    /// Stops the VM (if still running) and joins the vCPU threads.
    pub fn stop(&mut self) {
        self.exit.request(ExitReason::Stopped);
        self.pause.release();
        for t in self.threads.drain(..) {
            vcpu::stop_and_join(t);
        }
        if let Some(t) = self.event_thread.take() {
            if t.join().is_err() {
                log::error!("the event-loop thread panicked");
            }
        }
    }

    /// Counters of the vsock device, when there is one.
    pub fn vsock_metrics(&self) -> Option<&Arc<VsockMetrics>> {
        self.vsock_metrics.as_ref()
    }

    /// Counters of each disk, in attachment order.
    pub fn block_metrics(&self) -> &[Arc<BlockMetrics>] {
        &self.block_metrics
    }

    pub fn console(&self) -> &ConsoleTail {
        &self.tail
    }

    /// Samples written to the PIO probe port by a test program.
    pub fn probe_samples(&self) -> Vec<(Instant, u32)> {
        self.probes
            .as_ref()
            .map(|p| p.pio.samples())
            .unwrap_or_default()
    }

    /// Samples written to the MMIO probe window by a test program.
    pub fn mmio_probe_samples(&self) -> Vec<(Instant, u32)> {
        self.probes
            .as_ref()
            .map(|p| p.mmio.samples())
            .unwrap_or_default()
    }

    /// CLOCK_MONOTONIC ns at which the first vCPU entered KVM_RUN, once one has.
    pub fn first_run_ns(&self) -> Option<u64> {
        Some(self.first_run.load(Ordering::SeqCst)).filter(|&t| t != 0)
    }

    pub fn started(&self) -> Instant {
        self.started
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.stop();
    }
}
