//! PID 1 of the vmrun initramfs (see the library for what it does).

use std::path::Path;

use vmrun_init::{mount_kernel_filesystems, report, uptime};
use vmrun_protocol::status::Status;

fn main() {
    if let Err(f) = mount_kernel_filesystems(Path::new("/")) {
        eprintln!("{f}");
        report::finish(Status::InitFailed(f.class as u8));
    }
    println!(
        "vmrun-init: ready after {:.2}s of guest uptime",
        uptime().unwrap_or(-1.0)
    );
    report::finish(Status::Exited(0));
}
