//! vmrun-agent: the guest daemon. It listens on vsock port 1024 in the VM (on a Unix socket,
//! with a different root directory, in host tests) and serves one operation per connection,
//! concurrently: exec, upload, download, stat, list, mkdir, remove, capture of the overlay's
//! upper layer, shutdown. The wire protocol is `vmrun_protocol::agent`.

pub mod archive;
pub mod capture;
pub mod config;
pub mod entry;
pub mod error;
pub mod exec;
pub mod files;
pub mod pool;
pub mod refresh;
pub mod server;
pub mod spawn;

pub use config::Config;
