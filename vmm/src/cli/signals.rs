//! A launcher killed by SIGTERM, SIGINT, SIGHUP or SIGQUIT leaves nothing behind: the signals
//! are blocked in every thread and taken by one thread of their own, which stops the VMs this
//! process owns (their VMM, runtime directory and unfinished captures) and exits 128+N. A
//! command may take the signal over instead (`vmrun bash` hangs up its shell first).

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use vmrun::api::vm::KillSwitch;

const SIGNALS: [libc::c_int; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT];

/// VMs to stop if the launcher is killed.
static OWNED: Mutex<Vec<(u64, KillSwitch)>> = Mutex::new(Vec::new());
/// A command's own reaction to a signal, run before the default teardown is considered.
type Handler = Box<dyn Fn(libc::c_int) -> Reaction + Send + Sync>;
static HANDLER: OnceLock<Handler> = OnceLock::new();
/// The signal that ended the launcher (0: none).
static RECEIVED: AtomicI32 = AtomicI32::new(0);

/// What a command's handler wants done with a signal.
pub enum Reaction {
    /// Tear everything down now and exit 128+N.
    Teardown,
    /// The command ends in order by itself; tear down only if it has not within the grace.
    Wind(Duration),
}

fn sigset() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks the signals in this (the main) thread, which every later thread inherits, and
/// starts the thread that takes them. Call first thing in `main`. Child processes start with
/// an empty mask (std resets it), so the VMM still receives its signals.
pub fn install() {
    let set = sigset();
    // SAFETY: pthread_sigmask with a valid set; no old mask is asked for.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: sigwait with a valid set and out-pointer; the signals are blocked in
            // every thread, so they queue for this one.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                continue;
            }
            on_signal(sig);
        });
    if let Err(e) = spawned {
        log::warn!("cannot start the signal thread ({e}); a killed launcher may leave files");
    }
}

fn on_signal(sig: libc::c_int) {
    if RECEIVED.swap(sig, Ordering::SeqCst) != 0 {
        // A second signal: no more patience.
        teardown(sig);
    }
    let reaction = HANDLER.get().map_or(Reaction::Teardown, |h| h(sig));
    match reaction {
        Reaction::Teardown => teardown(sig),
        Reaction::Wind(grace) => {
            std::thread::spawn(move || {
                std::thread::sleep(grace);
                teardown(sig);
            });
        }
    }
}

/// Stops every VM this process owns and exits 128+N.
fn teardown(sig: libc::c_int) -> ! {
    let owned = OWNED.lock().unwrap_or_else(|e| e.into_inner());
    for (_, k) in owned.iter() {
        k.fire();
    }
    std::process::exit(128 + sig)
}

/// A command's own reaction to the signals (set once).
pub fn set_handler(h: impl Fn(libc::c_int) -> Reaction + Send + Sync + 'static) {
    let _ = HANDLER.set(Box::new(h));
}

/// Registers the VM a builder starts as soon as its VMM runs (so a launcher killed while the
/// VM boots stops it too); the registration lasts until the returned slot is dropped, which
/// must come after the VM itself is gone.
pub fn own_on_start(
    builder: vmrun::api::VmBuilder,
) -> (vmrun::api::VmBuilder, std::sync::Arc<Mutex<Option<Owned>>>) {
    let slot = std::sync::Arc::new(Mutex::new(None));
    let s = slot.clone();
    let b = builder.on_started(move |k| {
        *s.lock().unwrap_or_else(|e| e.into_inner()) = Some(own(k.clone()));
    });
    (b, slot)
}

/// Stops the VM if the launcher is killed, until the guard is dropped.
pub struct Owned(u64);

pub fn own(k: KillSwitch) -> Owned {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    OWNED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((id, k));
    Owned(id)
}

impl Drop for Owned {
    fn drop(&mut self) {
        OWNED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(id, _)| *id != self.0);
    }
}
