//! The agent's entry point, shared by the `vmrun-agent` binary and the initramfs's multi-call
//! `/init`. In a VM: vsock port 1024, root `/`. For host tests:
//! `vmrun-agent --unix PATH --root DIR [--upper GUEST_PATH]`.

use std::os::unix::net::UnixListener;

use crate::server::{serve, Listener};
use crate::Config;
use vmrun_protocol::agent::PORT;

/// The agent's command line and life: what `vmrun-agent` runs, and what the initramfs's `/init`
/// runs when started as `vmrun-agent` (one binary in the initramfs, half the bytes the guest
/// kernel must copy at boot). `args` excludes `argv[0]`. Never returns.
pub fn main(args: Vec<String>) -> ! {
    let mut cfg = Config::guest();
    let mut unix = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--unix", Some(p)) => unix = Some(p.clone()),
            ("--root", Some(r)) => {
                cfg.root = r.into();
                cfg.chroot = r != "/";
                cfg.exit_on_shutdown = false;
            }
            ("--upper", Some(u)) => cfg.upper = u.into(),
            _ => {
                eprintln!("usage: vmrun-agent [--unix PATH --root DIR [--upper GUEST_PATH]]");
                std::process::exit(2);
            }
        }
    }
    if unix.is_none() && local_cid().is_none() {
        // A VM without a vsock device: nobody could ever connect.
        eprintln!("vmrun-agent: no vsock device in this VM; not serving");
        std::process::exit(0);
    }
    let in_vm = unix.is_none();
    let listener = match unix {
        Some(p) => UnixListener::bind(&p).map(Listener::Unix),
        None => Listener::vsock(PORT),
    };
    let listener = match listener {
        Ok(l) => l,
        Err(e) => {
            eprintln!("vmrun-agent: cannot listen: {e}");
            std::process::exit(1);
        }
    };
    if in_vm {
        // In a VM the agent is the only way in: a workload that exhausts memory must be the
        // one the OOM killer picks. Commands get the normal score back (exec.rs).
        if let Err(e) = std::fs::write("/proc/self/oom_score_adj", "-1000") {
            eprintln!("vmrun-agent: oom_score_adj: {e}");
        }
    }
    eprintln!("vmrun-agent: ready");
    match serve(listener, cfg) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("vmrun-agent: {e}");
            std::process::exit(1);
        }
    }
}

/// This VM's vsock CID, or `None` when there is no vsock transport device.
fn local_cid() -> Option<u32> {
    use std::os::fd::AsRawFd;
    /// IOCTL_VM_SOCKETS_GET_LOCAL_CID, _IO(7, 0xb9).
    const GET_LOCAL_CID: libc::c_ulong = 0x7b9;
    let f = std::fs::File::open("/dev/vsock").ok()?;
    let mut cid: u32 = u32::MAX;
    // SAFETY: the ioctl writes one u32 through the valid pointer.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), GET_LOCAL_CID, &mut cid) };
    (r == 0 && cid != u32::MAX && cid > 2).then_some(cid)
}
