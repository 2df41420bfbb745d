//! vCPU setup and run loop. Each vCPU runs on its own thread; PIO and MMIO exits go to the
//! buses, every other exit either continues or ends the VM with a reason. Stopping a vCPU that
//! sits in KVM_RUN is done by a signal that makes the ioctl return EINTR.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_mp_state, CpuId, Msrs, KVM_MP_STATE_RUNNABLE, KVM_SYSTEM_EVENT_RESET};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use thiserror::Error;
use vm_memory::GuestMemoryMmap;

use super::bus::Bus;
use super::exit::{ExitReason, ExitState};
use crate::arch::x86_64::gdt::CpuMode;
use crate::arch::x86_64::vcpu_state::{self, StateError, VcpuState};
use crate::arch::x86_64::{cpuid, msr, regs};

/// LAPIC register offsets and delivery modes for LINT0/LINT1.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

#[derive(Debug, Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {0}: {1}")]
    Create(u8, kvm_ioctls::Error),
    #[error("vCPU {cpu}: {what} failed: {source}")]
    Setup {
        cpu: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {cpu}: KVM accepted {set} of {want} boot MSRs")]
    Msrs { cpu: u8, set: usize, want: usize },
    #[error("vCPU {cpu}: writing boot structures to guest memory failed: {source}")]
    Memory {
        cpu: u8,
        source: vm_memory::GuestMemoryError,
    },
    #[error("cannot start the vCPU thread: {0}")]
    Thread(std::io::Error),
}

/// The PIO and MMIO buses, shared by all vCPUs.
#[derive(Default)]
pub struct Buses {
    pub pio: Bus,
    pub mmio: Bus,
}

/// How a vCPU starts.
pub struct VcpuSetup<'a> {
    pub mode: CpuMode,
    pub entry: u64,
    pub stack: Option<u64>,
    pub base_cpuid: &'a CpuId,
    pub count: u8,
    /// Start application processors running (test guests) instead of waiting for INIT/SIPI.
    pub all_runnable: bool,
    /// Hide the paravirtual features a guest uses through `vmcall` (hosts that emulate
    /// guest ring 0).
    pub hide_pv_hypercalls: bool,
}

/// Pauses the vCPUs of one VM for a snapshot: each parks outside KVM_RUN, with no I/O
/// pending, and leaves its saved state here until it is released.
#[derive(Default)]
pub struct PauseGate {
    inner: Mutex<PauseInner>,
    cv: Condvar,
}

#[derive(Default)]
struct PauseInner {
    requested: bool,
    /// KVM's MSR save list and whether it has XCRs (what each vCPU saves).
    msr_list: Arc<Vec<u32>>,
    has_xcrs: bool,
    saved: BTreeMap<u8, Result<VcpuState, StateError>>,
}

impl PauseGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, PauseInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks every vCPU to park and save; `Vcpu::kick` them until they have.
    pub fn request(&self, msr_list: Arc<Vec<u32>>, has_xcrs: bool) {
        let mut g = self.lock();
        g.requested = true;
        g.msr_list = msr_list;
        g.has_xcrs = has_xcrs;
        g.saved.clear();
    }

    fn requested(&self) -> bool {
        self.lock().requested
    }

    /// How many vCPUs have parked.
    pub fn parked(&self) -> usize {
        self.lock().saved.len()
    }

    /// The saved states, by vCPU index.
    pub fn take_saved(&self) -> Vec<Result<VcpuState, StateError>> {
        std::mem::take(&mut self.lock().saved)
            .into_values()
            .collect()
    }

    /// Lets the parked vCPUs run again.
    pub fn release(&self) {
        self.lock().requested = false;
        self.cv.notify_all();
    }

    /// Parks the calling vCPU until released or the VM stops.
    fn wait(&self, exit: &ExitState) {
        let mut g = self.lock();
        while g.requested && !exit.should_stop() {
            g = self
                .cv
                .wait_timeout(g, Duration::from_millis(20))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

pub struct Vcpu {
    pub(crate) fd: VcpuFd,
    index: u8,
    buses: Arc<Buses>,
    exit: Arc<ExitState>,
    pause: Arc<PauseGate>,
    /// CLOCK_MONOTONIC ns of the VM's first KVM_RUN (0 until then), shared by its vCPUs.
    first_run: Arc<AtomicU64>,
    /// Installed by the vCPU thread on itself before its first KVM_RUN.
    seccomp: Option<Arc<crate::seccomp::Filters>>,
    /// Exits handled, and the last one: what a triple fault report can say of the past.
    exits: u64,
    last_exit: LastExit,
}

/// The last exit a vCPU handled, kept for a crash report.
#[derive(Clone, Copy, Debug, Default)]
enum LastExit {
    #[default]
    None,
    Pio {
        port: u16,
        write: bool,
    },
    Mmio {
        addr: u64,
        write: bool,
    },
    Interrupted,
}

impl std::fmt::Display for LastExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rw = |w: bool| if w { "write" } else { "read" };
        match *self {
            LastExit::None => write!(f, "none"),
            LastExit::Pio { port, write } => write!(f, "port {} at {port:#x}", rw(write)),
            LastExit::Mmio { addr, write } => write!(f, "MMIO {} at {addr:#x}", rw(write)),
            LastExit::Interrupted => write!(f, "an interruption by the VMM"),
        }
    }
}

fn setup_err(cpu: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Setup { cpu, what, source }
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32) {
    let mut raw = [0u8; 4];
    for (i, b) in raw.iter_mut().enumerate() {
        *b = regs[offset + i] as u8;
    }
    let v = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as std::os::raw::c_char;
    }
}

impl Vcpu {
    pub fn new(
        vm: &VmFd,
        index: u8,
        buses: Arc<Buses>,
        exit: Arc<ExitState>,
        pause: Arc<PauseGate>,
        first_run: Arc<AtomicU64>,
    ) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|e| VcpuError::Create(index, e))?;
        Ok(Vcpu {
            fd,
            index,
            buses,
            exit,
            pause,
            first_run,
            seccomp: None,
            exits: 0,
            last_exit: LastExit::None,
        })
    }

    /// The filters this vCPU's thread will install on itself.
    pub fn set_seccomp(&mut self, f: Option<Arc<crate::seccomp::Filters>>) {
        self.seccomp = f;
    }

    /// Puts a snapshot's state into this new vCPU instead of [`Vcpu::configure`].
    pub fn restore(&self, state: &VcpuState) -> Result<(), StateError> {
        vcpu_state::restore(&self.fd, self.index, state)
    }

    /// Saves this vCPU's state and waits while the VM is paused. An exit KVM has not finished
    /// (the data of a port or MMIO read) is completed first by one KVM_RUN that returns at
    /// once, so the saved registers are consistent.
    fn park(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        let pending = self.fd.run().map(|_| ());
        self.fd.set_kvm_immediate_exit(0);
        let (list, has_xcrs) = {
            let g = self.pause.lock();
            (g.msr_list.clone(), g.has_xcrs)
        };
        let state = match pending {
            Err(e) if e.errno() == libc::EINTR => {
                vcpu_state::save(&self.fd, self.index, &list, has_xcrs)
            }
            Err(source) => Err(StateError::Ioctl {
                cpu: self.index,
                what: "KVM_RUN (to complete pending I/O)",
                source,
            }),
            // With immediate_exit set KVM does not enter the guest; anything else is a bug
            // on its side, and the state would not be consistent.
            Ok(()) => Err(StateError::Ioctl {
                cpu: self.index,
                what: "KVM_RUN (to complete pending I/O)",
                source: kvm_ioctls::Error::new(libc::EBUSY),
            }),
        };
        self.pause.lock().saved.insert(self.index, state);
        self.pause.wait(&self.exit);
    }

    pub fn configure(&mut self, mem: &GuestMemoryMmap, s: &VcpuSetup) -> Result<(), VcpuError> {
        let cpu = self.index;
        let mut cpuid = s.base_cpuid.clone();
        cpuid::normalize(cpuid.as_mut_slice(), cpu, s.count);
        if s.hide_pv_hypercalls {
            cpuid::hide_pv_hypercalls(cpuid.as_mut_slice());
        }
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(setup_err(cpu, "KVM_SET_CPUID2"))?;

        let entries = msr::boot_msr_entries();
        let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Msrs {
            cpu,
            set: 0,
            want: entries.len(),
        })?;
        let set = self
            .fd
            .set_msrs(&msrs)
            .map_err(setup_err(cpu, "KVM_SET_MSRS"))?;
        if set != entries.len() {
            return Err(VcpuError::Msrs {
                cpu,
                set,
                want: entries.len(),
            });
        }

        let sregs = self
            .fd
            .get_sregs()
            .map_err(setup_err(cpu, "KVM_GET_SREGS"))?;
        let sregs = regs::initial_sregs(mem, s.mode, sregs)
            .map_err(|source| VcpuError::Memory { cpu, source })?;
        self.fd
            .set_sregs(&sregs)
            .map_err(setup_err(cpu, "KVM_SET_SREGS"))?;
        let mut r = regs::initial_regs(s.mode, s.entry, s.stack);
        // Test guests learn which vCPU they are from RDI.
        r.rdi = u64::from(cpu);
        self.fd
            .set_regs(&r)
            .map_err(setup_err(cpu, "KVM_SET_REGS"))?;
        self.fd
            .set_fpu(&regs::initial_fpu())
            .map_err(setup_err(cpu, "KVM_SET_FPU"))?;

        let mut lapic = self
            .fd
            .get_lapic()
            .map_err(setup_err(cpu, "KVM_GET_LAPIC"))?;
        set_lapic_reg(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
        set_lapic_reg(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
        self.fd
            .set_lapic(&lapic)
            .map_err(setup_err(cpu, "KVM_SET_LAPIC"))?;

        if s.all_runnable && cpu != 0 {
            let st = kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            };
            self.fd
                .set_mp_state(st)
                .map_err(setup_err(cpu, "KVM_SET_MP_STATE"))?;
        }
        Ok(())
    }

    /// Starts the run loop on its own thread.
    pub fn spawn(mut self) -> Result<JoinHandle<()>, VcpuError> {
        install_kick_handler();
        std::thread::Builder::new()
            .name(format!("vcpu{}", self.index))
            .spawn(move || {
                if let Some(f) = self.seccomp.take() {
                    if let Err(e) = crate::seccomp::apply("vCPU", &f.vcpu) {
                        self.exit.request(ExitReason::VcpuError {
                            cpu: self.index,
                            message: e.to_string(),
                        });
                        return;
                    }
                }
                self.run_loop()
            })
            .map_err(VcpuError::Thread)
    }

    fn run_loop(mut self) {
        let _ =
            self.first_run
                .compare_exchange(0, monotonic_ns(), Ordering::SeqCst, Ordering::SeqCst);
        while !self.exit.should_stop() {
            if self.pause.requested() {
                self.park();
                continue;
            }
            if let Some(reason) = self.run_once() {
                self.exit.request(reason);
            }
        }
    }

    /// One KVM_RUN; `Some` ends the VM.
    fn run_once(&mut self) -> Option<ExitReason> {
        let cpu = self.index;
        let exit = self.fd.run();
        self.exits += 1;
        match exit {
            Ok(VcpuExit::IoOut(port, data)) => {
                self.last_exit = LastExit::Pio { port, write: true };
                self.buses.pio.write(u64::from(port), data);
                None
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                self.last_exit = LastExit::Pio { port, write: false };
                self.buses.pio.read(u64::from(port), data);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                self.last_exit = LastExit::Mmio { addr, write: false };
                self.buses.mmio.read(addr, data);
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                self.last_exit = LastExit::Mmio { addr, write: true };
                self.buses.mmio.write(addr, data);
                None
            }
            Ok(VcpuExit::Hlt) => Some(ExitReason::VcpuError {
                cpu,
                message: "halted with the in-kernel IRQ chip off".into(),
            }),
            Ok(VcpuExit::Shutdown) => Some(ExitReason::TripleFault {
                cpu,
                ran_ms: monotonic_ns().saturating_sub(self.first_run.load(Ordering::SeqCst))
                    / 1_000_000,
                exits: self.exits - 1,
                last: self.last_exit.to_string(),
            }),
            Ok(VcpuExit::FailEntry(reason, _)) => Some(ExitReason::FailEntry { cpu, reason }),
            Ok(VcpuExit::InternalError) => Some(self.internal_error()),
            // Shutdown, crash and any other kind end the VM with the kind named.
            Ok(VcpuExit::SystemEvent(kind, _)) => Some(match kind {
                KVM_SYSTEM_EVENT_RESET => ExitReason::Reset,
                _ => ExitReason::SystemEvent { cpu, kind },
            }),
            Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => {
                self.last_exit = LastExit::Interrupted;
                None
            }
            Ok(other) => Some(ExitReason::VcpuError {
                cpu,
                message: format!("unexpected exit {other:?}"),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.last_exit = LastExit::Interrupted;
                None
            }
            Err(e) => Some(ExitReason::VcpuError {
                cpu,
                message: format!("KVM_RUN failed: {e}"),
            }),
        }
    }

    fn internal_error(&mut self) -> ExitReason {
        let cpu = self.index;
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(u64::MAX);
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, for which KVM fills the `internal`
        // member of the exit union; every bit pattern is a valid value of its integer fields.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        ExitReason::InternalError {
            cpu,
            suberror: internal.suberror,
            rip,
            data: internal.data[..n].to_vec(),
        }
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal that interrupts KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler) {
            log::error!("cannot install the vCPU kick handler: {e}");
        }
    });
}

/// Interrupts each vCPU thread until `done` holds (all parked, say), at most `timeout`;
/// whether it held.
pub fn kick_until(handles: &[JoinHandle<()>], timeout: Duration, done: impl Fn() -> bool) -> bool {
    use std::os::unix::thread::JoinHandleExt;
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() > deadline || handles.iter().any(|h| h.is_finished()) {
            return done();
        }
        for h in handles {
            // SAFETY: the thread has not been joined (we hold its handle), so its pthread_t
            // is valid; the signal's handler (`install_kick_handler`) does nothing.
            unsafe { libc::pthread_kill(h.as_pthread_t(), kick_signal()) };
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

/// Interrupts the vCPU thread until it has left its run loop, then joins it. The stop flag must
/// already be set. Kicks repeat because a signal that lands just before KVM_RUN is entered would
/// otherwise be lost.
pub fn stop_and_join(handle: JoinHandle<()>) {
    use std::os::unix::thread::JoinHandleExt;
    while !handle.is_finished() {
        // SAFETY: the thread has not been joined, so its pthread_t is valid; the signal has a
        // handler installed (`install_kick_handler`) that does nothing.
        unsafe { libc::pthread_kill(handle.as_pthread_t(), kick_signal()) };
        std::thread::sleep(Duration::from_millis(1));
    }
    if handle.join().is_err() {
        log::error!("a vCPU thread panicked");
    }
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process on the host.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through the valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lapic_delivery_modes_keep_other_bits() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT0] = 0x20; // vector
        regs[APIC_LVT0 + 2] = 0x01; // mask bit 16
        set_lapic_reg(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        set_lapic_reg(&mut regs, APIC_LVT1, APIC_MODE_NMI);
        let read = |o: usize| {
            u32::from_le_bytes([
                regs[o] as u8,
                regs[o + 1] as u8,
                regs[o + 2] as u8,
                regs[o + 3] as u8,
            ])
        };
        assert_eq!(read(APIC_LVT0), 0x1_0720);
        assert_eq!(read(APIC_LVT1), 0x400);
    }
}
