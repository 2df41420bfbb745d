//! Assembles a VM from a config: memory, IRQ chip, devices, the payload (a Linux kernel or a
//! small test program) and vCPU threads, and reports how it ended.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{IoEventAddress, VmFd};
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader, PvhBootCapability};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::boot_params::{self, BootInfo, BootParamsError};
use crate::arch::x86_64::gdt::CpuMode;
use crate::arch::x86_64::layout::{self, CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START};
use crate::arch::x86_64::mptable::{self, MptableError};
use crate::devices::bus::BusError;
use crate::devices::legacy::serial::ConsoleSink;
use crate::devices::legacy::{Console, ConsoleTail, ProbePort, SerialConsole, StatusPort, I8042};
use crate::devices::virtio::block::{Block, BlockError, BlockMetrics, Disk};
use crate::devices::virtio::mmio::SharedDevice;
use crate::devices::virtio::mmio::{MmioTransport, QueueEvents, REG_QUEUE_NOTIFY, WINDOW};
use crate::devices::virtio::vsock::{Vsock, VsockError, VsockMetrics};
use crate::devices::virtio::Interrupt;
use crate::vstate::memory::{self, MemoryError};
use crate::vstate::vcpu::{self, Buses, Vcpu, VcpuError, VcpuSetup};
use crate::vstate::vm::{self, VmError};
use crate::vstate::{ExitReason, ExitState};

/// Event-loop subscribers: devices shared with the vCPU side.
type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;
/// How often the event loop checks whether the VM stopped.
const EVENT_POLL_MS: i32 = 100;

/// Where test programs are loaded and where their stacks start.
pub const PROGRAM_START: u64 = HIMEM_START;
const PROGRAM_STACK: u64 = 0x30_0000;
/// Probe devices for test programs: a PIO port and an MMIO window inside the identity map but
/// outside RAM.
pub const PROBE_PORT: u16 = 0x06f4;
pub const PROBE_MMIO: u64 = 0x3000_0000;

/// Entry protocol for ELF kernels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BootProtocol {
    /// PVH when the kernel has the PVH note, else the 64-bit Linux boot protocol.
    #[default]
    Auto,
    Pvh,
    Linux64,
}

/// What the VM runs.
#[derive(Clone, Debug)]
pub enum Payload {
    Linux {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
        protocol: BootProtocol,
    },
    /// Raw machine code loaded at [`PROGRAM_START`]; every vCPU starts there.
    Program { code: Vec<u8>, mode: CpuMode },
}

/// A disk attached as virtio-blk; the first is /dev/vda in the guest, then /dev/vdb, ...
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
}

/// The vsock device: the guest's CID and the host Unix socket (hybrid vsock).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    pub cid: u64,
    pub uds_path: PathBuf,
}

pub struct VmConfig {
    pub payload: Payload,
    pub mem_mib: u64,
    pub vcpus: u8,
    pub console: ConsoleSink,
    pub disks: Vec<DiskConfig>,
    pub vsock: Option<VsockConfig>,
}

#[derive(Default)]
struct VirtioSet {
    params: Vec<String>,
    block_metrics: Vec<Arc<BlockMetrics>>,
    vsock_metrics: Option<Arc<VsockMetrics>>,
}

#[derive(Debug, Error)]
pub enum StartError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    BootParams(#[from] BootParamsError),
    #[error(transparent)]
    Mptable(#[from] MptableError),
    #[error("kernel image {path}: {msg}")]
    Kernel { path: PathBuf, msg: String },
    #[error("initrd {path}: {msg}")]
    Initrd { path: PathBuf, msg: String },
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("{0} vCPUs requested; vmrun supports 1 to {max}", max = layout::MAX_VCPUS)]
    Vcpus(u8),
    #[error("device setup: {0}")]
    Bus(#[from] BusError),
    #[error("cannot wire IRQ {irq}: {msg}")]
    Irq { irq: u32, msg: String },
    #[error("test program of {0} bytes does not fit below its stack")]
    ProgramTooLarge(usize),
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error("{0} virtio devices requested; vmrun has IRQs for {max}", max = layout::IRQ_MAX - layout::IRQ_BASE + 1)]
    TooManyDevices(usize),
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error("virtio device setup: {0}")]
    Virtio(String),
    #[error("event loop: {0}")]
    EventLoop(String),
}

fn kernel_err(path: &Path, msg: impl Into<String>) -> StartError {
    StartError::Kernel {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// A running VM. Dropping it stops the vCPUs and frees the guest.
pub struct Vmm {
    exit: Arc<ExitState>,
    threads: Vec<JoinHandle<()>>,
    tail: ConsoleTail,
    probe: ProbePort,
    mmio_probe: ProbePort,
    block_metrics: Vec<Arc<BlockMetrics>>,
    vsock_metrics: Option<Arc<VsockMetrics>>,
    event_thread: Option<JoinHandle<()>>,
    started: Instant,
    // Kept alive for the vCPU threads: the VM fd and the memory KVM maps.
    _vm: VmFd,
    _mem: GuestMemoryMmap,
}

struct Loaded {
    mode: CpuMode,
    entry: u64,
}

impl Vmm {
    pub fn start(cfg: VmConfig) -> Result<Vmm, StartError> {
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
        let vm = vm::create_vm(&kvm)?;
        let mem = memory::create(mem_size)?;
        memory::register(&vm, &mem)?;

        let exit = Arc::new(ExitState::default());
        let tail = ConsoleTail::default();
        let probe = ProbePort::default();
        let mmio_probe = ProbePort::default();
        let mut buses = Self::devices(&vm, &exit, &tail, cfg.console, &probe, &mmio_probe)?;
        let mut events = EventManager::<Subscriber>::new()
            .map_err(|e| StartError::EventLoop(format!("{e:?}")))?;
        let VirtioSet {
            params: virtio_params,
            block_metrics,
            vsock_metrics,
        } = Self::virtio_devices(
            &vm,
            &mem,
            &mut buses,
            &mut events,
            &cfg.disks,
            cfg.vsock.as_ref(),
        )?;
        let buses = Arc::new(buses);

        let loaded = match &cfg.payload {
            Payload::Linux {
                kernel,
                initrd,
                cmdline,
                protocol,
            } => {
                let mut cmdline = cmdline.clone();
                for p in &virtio_params {
                    cmdline.push(' ');
                    cmdline.push_str(p);
                }
                Self::load_linux(
                    &mem,
                    mem_size,
                    kernel,
                    initrd.as_deref(),
                    cmdline.trim(),
                    *protocol,
                )?
            }
            Payload::Program { code, mode } => {
                if PROGRAM_START + code.len() as u64
                    > PROGRAM_STACK - 0x1000 * u64::from(layout::MAX_VCPUS)
                {
                    return Err(StartError::ProgramTooLarge(code.len()));
                }
                mem.write_slice(code, GuestAddress(PROGRAM_START))
                    .map_err(|e| StartError::Kernel {
                        path: "<test program>".into(),
                        msg: e.to_string(),
                    })?;
                Loaded {
                    mode: *mode,
                    entry: PROGRAM_START,
                }
            }
        };
        mptable::setup(&mem, cfg.vcpus)?;

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
            let mut v = Vcpu::new(&vm, i, buses.clone(), exit.clone())?;
            v.configure(
                &mem,
                &VcpuSetup {
                    mode: loaded.mode,
                    entry: loaded.entry,
                    stack: program.then(|| PROGRAM_STACK - 0x1000 * u64::from(i)),
                    base_cpuid: &base_cpuid,
                    count: cfg.vcpus,
                    all_runnable: program,
                },
            )?;
            vcpus.push(v);
        }
        let mut vmm = Vmm {
            exit: exit.clone(),
            threads: Vec::new(),
            tail,
            probe,
            mmio_probe,
            block_metrics,
            vsock_metrics,
            event_thread: None,
            started,
            _vm: vm,
            _mem: mem,
        };
        vmm.event_thread = Some(
            std::thread::Builder::new()
                .name("vmm-events".into())
                .spawn(move || {
                    while !exit.should_stop() {
                        if let Err(e) = events.run_with_timeout(EVENT_POLL_MS) {
                            log::error!("event loop: {e:?}");
                            break;
                        }
                    }
                })
                .map_err(|e| StartError::EventLoop(e.to_string()))?,
        );
        for v in vcpus {
            // On failure, Drop stops the threads already started.
            vmm.threads.push(v.spawn()?);
        }
        Ok(vmm)
    }

    fn devices(
        vm: &VmFd,
        exit: &Arc<ExitState>,
        tail: &ConsoleTail,
        sink: ConsoleSink,
        probe: &ProbePort,
        mmio_probe: &ProbePort,
    ) -> Result<Buses, StartError> {
        let irq_err = |irq: u32| {
            move |e: std::io::Error| StartError::Irq {
                irq,
                msg: e.to_string(),
            }
        };
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(irq_err(layout::SERIAL_IRQ))?;
        vm.register_irqfd(&serial_irq, layout::SERIAL_IRQ)
            .map_err(|e| StartError::Irq {
                irq: layout::SERIAL_IRQ,
                msg: e.to_string(),
            })?;
        let serial = SerialConsole::new(serial_irq, Console::new(sink, tail.clone()));

        let mut buses = Buses::default();
        buses.pio.insert(
            Arc::new(Mutex::new(serial)),
            u64::from(layout::SERIAL_PORT),
            8,
        )?;
        buses.pio.insert(
            Arc::new(Mutex::new(I8042::new(exit.clone()))),
            u64::from(layout::I8042_PORT),
            5,
        )?;
        buses.pio.insert(
            Arc::new(Mutex::new(StatusPort::new(exit.clone()))),
            u64::from(layout::STATUS_PORT),
            2,
        )?;
        buses.pio.insert(
            Arc::new(Mutex::new(probe.clone())),
            u64::from(PROBE_PORT),
            4,
        )?;
        buses
            .mmio
            .insert(Arc::new(Mutex::new(mmio_probe.clone())), PROBE_MMIO, 0x1000)?;
        Ok(buses)
    }

    /// Creates the virtio-mmio devices (disks in order, then vsock): bus windows, irqfds,
    /// ioeventfds, event-loop subscribers. Returns the kernel parameters that announce them.
    fn virtio_devices(
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        buses: &mut Buses,
        events: &mut EventManager<Subscriber>,
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
            let base = layout::VIRTIO_MMIO_START + slot as u64 * WINDOW;
            let irq = layout::IRQ_BASE + slot as u32;
            let verr = |e: std::io::Error| StartError::Virtio(e.to_string());
            vm.register_irqfd(interrupt.eventfd(), irq)
                .map_err(|e| StartError::Irq {
                    irq,
                    msg: e.to_string(),
                })?;
            let transport = MmioTransport::new(device, mem.clone(), interrupt).map_err(verr)?;
            for (q, e) in transport.queue_evts().iter().enumerate() {
                vm.register_ioevent(e, &IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY), q as u32)
                    .map_err(|e| StartError::Virtio(format!("ioeventfd: {e}")))?;
            }
            let sub: Subscriber = Arc::new(Mutex::new(QueueEvents::new(&transport).map_err(verr)?));
            events.add_subscriber(sub);
            buses
                .mmio
                .insert(Arc::new(Mutex::new(transport)), base, WINDOW)?;
            set.params
                .push(format!("virtio_mmio.device=4K@{base:#x}:{irq}"));
            Ok(())
        };
        let new_interrupt = || -> Result<Arc<Interrupt>, StartError> {
            let evt =
                EventFd::new(libc::EFD_NONBLOCK).map_err(|e| StartError::Virtio(e.to_string()))?;
            Ok(Arc::new(Interrupt::new(evt)))
        };
        for (slot, d) in disks.iter().enumerate() {
            let interrupt = new_interrupt()?;
            let block = Block::new(Disk::open(&d.path, d.read_only)?, interrupt.clone());
            set.block_metrics.push(block.metrics());
            attach(slot, Arc::new(Mutex::new(block)), interrupt)?;
        }
        if let Some(v) = vsock {
            if v.cid < 3 || v.cid >= u64::from(u32::MAX) {
                return Err(StartError::Virtio(format!(
                    "guest CID {} is reserved; use 3 or more",
                    v.cid
                )));
            }
            let interrupt = new_interrupt()?;
            let dev = Vsock::new(v.cid, &v.uds_path, interrupt.clone())?;
            set.vsock_metrics = Some(dev.metrics());
            attach(disks.len(), Arc::new(Mutex::new(dev)), interrupt)?;
        }
        Ok(set)
    }

    fn load_linux(
        mem: &GuestMemoryMmap,
        mem_size: u64,
        kernel: &Path,
        initrd: Option<&Path>,
        cmdline: &str,
        protocol: BootProtocol,
    ) -> Result<Loaded, StartError> {
        let mut f = File::open(kernel).map_err(|e| {
            kernel_err(
                kernel,
                format!("{e}; build the images with `vmrun images build` or pass --kernel"),
            )
        })?;
        let mut magic = [0u8; 4];
        f.read_exact(&mut magic).map_err(|_| {
            kernel_err(kernel, "file is truncated (shorter than any kernel header)")
        })?;
        f.seek(SeekFrom::Start(0))
            .map_err(|e| kernel_err(kernel, e.to_string()))?;
        let himem = Some(GuestAddress(HIMEM_START));
        let (result, is_elf) = if &magic == b"\x7fELF" {
            let r = Elf::load(mem, None, &mut f, himem)
                .map_err(|e| kernel_err(kernel, format!("not a loadable vmlinux: {e}")))?;
            (r, true)
        } else {
            let r = BzImage::load(mem, None, &mut f, himem).map_err(|e| {
                kernel_err(
                    kernel,
                    format!("neither an ELF vmlinux nor a bzImage ({e})"),
                )
            })?;
            (r, false)
        };

        let mut cl =
            Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| StartError::Cmdline(e.to_string()))?;
        cl.insert_str(cmdline).map_err(|e| match e {
            linux_loader::cmdline::Error::TooLarge => StartError::Cmdline(format!(
                "{} bytes; the x86 limit is {} (shorten --cmdline)",
                cmdline.len(),
                CMDLINE_MAX_SIZE - 1
            )),
            other => StartError::Cmdline(other.to_string()),
        })?;
        load_cmdline(mem, GuestAddress(CMDLINE_START), &cl)
            .map_err(|e| StartError::Cmdline(e.to_string()))?;

        let header = result.setup_header;
        let initrd = match initrd {
            None => None,
            Some(path) => {
                let ierr = |msg: String| StartError::Initrd {
                    path: path.to_path_buf(),
                    msg,
                };
                let mut file = File::open(path).map_err(|e| {
                    ierr(format!(
                        "{e}; build the images with `vmrun images build` or pass --initrd"
                    ))
                })?;
                let size = file.metadata().map_err(|e| ierr(e.to_string()))?.len();
                let max = header.map(|h| h.initrd_addr_max);
                let addr = boot_params::initrd_address(mem_size, size, result.kernel_end, max)?;
                let count = usize::try_from(size).map_err(|_| ierr("too large".into()))?;
                mem.read_exact_volatile_from(GuestAddress(addr), &mut file, count)
                    .map_err(|e| ierr(format!("cannot load into guest memory: {e}")))?;
                Some((addr, size))
            }
        };

        let info = BootInfo {
            mem_size,
            cmdline_size: cmdline.len() as u32 + 1,
            initrd,
        };
        let pvh = match (result.pvh_boot_cap, protocol) {
            (PvhBootCapability::PvhEntryPresent(addr), BootProtocol::Auto | BootProtocol::Pvh) => {
                Some(addr.0)
            }
            (_, BootProtocol::Pvh) => {
                return Err(kernel_err(
                    kernel,
                    "has no PVH entry note; boot it with --boot-protocol linux64",
                ))
            }
            _ => None,
        };
        if let Some(entry) = pvh {
            boot_params::write_pvh(mem, &info)?;
            return Ok(Loaded {
                mode: CpuMode::Protected32,
                entry,
            });
        }
        let params = boot_params::zero_page(&info, header)?;
        boot_params::write_zero_page(mem, &params)?;
        // bzImage: the 64-bit entry sits 0x200 past the protected-mode code.
        let entry = if is_elf {
            result.kernel_load.0
        } else {
            result.kernel_load.0 + 0x200
        };
        Ok(Loaded {
            mode: CpuMode::Long64,
            entry,
        })
    }

    /// Waits for the VM to end, at most `timeout`; `None` when it is still running.
    pub fn wait(&self, timeout: Option<Duration>) -> Option<ExitReason> {
        self.exit.wait(timeout)
    }

    /// Stops the VM (if still running) and joins the vCPU threads.
    pub fn stop(&mut self) {
        self.exit.request(ExitReason::Stopped);
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
        self.probe.samples()
    }

    /// Samples written to the MMIO probe window by a test program.
    pub fn mmio_probe_samples(&self) -> Vec<(Instant, u32)> {
        self.mmio_probe.samples()
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

/// How a run ended, for people and exit codes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub reason: Option<ExitReason>,
    /// The process exit code `vmrun` uses.
    pub code: i32,
    /// One line saying what happened.
    pub summary: String,
}

/// Exit code for failures of the VM itself (docker's "launcher error").
pub const EXIT_LAUNCHER: i32 = 125;

impl Outcome {
    /// Interprets an exit reason with the console tail (`None` reason: timed out).
    pub fn new(
        reason: Option<ExitReason>,
        tail: &ConsoleTail,
        timeout: Option<Duration>,
    ) -> Outcome {
        use vmrun_protocol::status::Status;
        let (code, summary) = match &reason {
            None => (EXIT_LAUNCHER, format!("guest did not finish within {}s; console tail:\n{}", timeout.map_or(0, |t| t.as_secs()), tail.last_lines(10))),
            Some(ExitReason::Status(Status::Exited(c))) => (i32::from(*c), format!("guest finished, status {c}")),
            Some(ExitReason::Status(Status::Signaled(s))) => (128 + i32::from(*s), format!("guest workload killed by signal {s}")),
            Some(ExitReason::Status(Status::InitFailed(c))) => (
                EXIT_LAUNCHER,
                format!("init failed (class {c}): {}", tail.init_error().unwrap_or_else(|| "no error line on the console".into())),
            ),
            Some(ExitReason::BadStatus { kind, code }) => (EXIT_LAUNCHER, format!("guest wrote an unknown status kind {kind} (code {code})")),
            Some(ExitReason::Reset) => match tail.panic_line() {
                Some(p) => (EXIT_LAUNCHER, format!("guest kernel panicked: {p}")),
                None => (0, "guest reset without reporting a status".into()),
            },
            Some(ExitReason::TripleFault { cpu }) => (EXIT_LAUNCHER, format!("guest crashed: vCPU {cpu} triple-faulted")),
            Some(ExitReason::InternalError { cpu, suberror, rip, data }) => (
                EXIT_LAUNCHER,
                format!("KVM could not run guest code on vCPU {cpu}: internal error {suberror} at rip {rip:#x}, data {data:x?}"),
            ),
            Some(ExitReason::FailEntry { cpu, reason }) => (EXIT_LAUNCHER, format!("KVM refused to enter vCPU {cpu}: reason {reason:#x}")),
            Some(ExitReason::SystemEvent { cpu, kind }) => (EXIT_LAUNCHER, format!("guest vCPU {cpu} raised system event {kind}")),
            Some(ExitReason::VcpuError { cpu, message }) => (EXIT_LAUNCHER, format!("vCPU {cpu}: {message}")),
            Some(ExitReason::Stopped) => (EXIT_LAUNCHER, "VM stopped by the host".into()),
        };
        Outcome {
            reason,
            code,
            summary,
        }
    }
}
