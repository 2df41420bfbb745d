//! The vmrun guest agent. In a VM: `vmrun-agent` (vsock port 1024, root `/`). For host tests:
//! `vmrun-agent --unix PATH --root DIR [--upper GUEST_PATH]`.

use std::os::unix::net::UnixListener;

use vmrun_agent::server::{serve, Listener};
use vmrun_agent::Config;
use vmrun_protocol::agent::PORT;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut cfg = Config::guest();
    let mut unix = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--unix", Some(p)) => unix = Some(p.clone()),
            ("--root", Some(r)) => {
                cfg.root = r.into();
                cfg.chroot = r != "/";
            }
            ("--upper", Some(u)) => cfg.upper = u.into(),
            _ => {
                eprintln!("usage: vmrun-agent [--unix PATH --root DIR [--upper GUEST_PATH]]");
                std::process::exit(2);
            }
        }
    }
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
    eprintln!("vmrun-agent: ready");
    match serve(listener, cfg) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("vmrun-agent: {e}");
            std::process::exit(1);
        }
    }
}
