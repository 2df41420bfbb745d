//! Telling the host how the guest ended (the status port, through /dev/port) and powering off.

use std::io::Write;
use std::os::unix::fs::FileExt;

use vmrun_protocol::status::{Status, PORT};

/// Writes the status. On success the VMM stops the VM during the write, so this normally does
/// not return; an error means there is no status device (not running under vmrun).
pub fn report(status: Status) -> std::io::Result<()> {
    let port = std::fs::OpenOptions::new().write(true).open("/dev/port")?;
    port.write_all_at(&status.encode(), u64::from(PORT))
}

/// Flushes the console so nothing printed is lost when the VM stops.
pub fn drain_console() {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: tcdrain only waits on the given descriptors; a non-terminal fd returns ENOTTY.
    unsafe {
        libc::tcdrain(1);
        libc::tcdrain(2);
    }
}

/// Reports `status`, then resets the machine (the fallback when there is no status port).
pub fn finish(status: Status) -> ! {
    drain_console();
    nix::unistd::sync();
    if let Err(e) = report(status) {
        eprintln!("vmrun-init: cannot report status through /dev/port: {e}");
        drain_console();
    }
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    // reboot(2) only returns on failure; PID 1 must not exit.
    loop {
        std::thread::park();
    }
}
