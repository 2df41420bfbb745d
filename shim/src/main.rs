//! `containerd-shim-vmrun-v1`: vmrun as a containerd runtime (`io.containerd.vmrun.v1`,
//! shim v2). containerd starts it once per container; each container runs in a vmrun VM.

mod rootfs;
mod service;
mod spec;

fn main() {
    // The VMM processes are this shim's children and reaped by the library that started
    // them; the crate's reaper would take their exit statuses.
    let config = containerd_shim::Config {
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    containerd_shim::run::<service::Service>("io.containerd.vmrun.v1", Some(config));
}
