//! virtio-vsock with Firecracker's hybrid design: the guest speaks vsock, the host speaks Unix
//! sockets. A host client connects to the VMM's socket and writes `CONNECT <port>\n`; once the
//! guest accepts it reads `OK <port>\n` and the stream is the guest's. A guest connection to
//! host port P goes to the Unix socket `<path>_P` when one listens there, else it is refused.
//!
//! `packet` is the header and its limits, `connection` one stream's credit and buffers,
//! `muxer` the connections and the handshakes, `device` the queues.

pub mod connection;
pub mod device;
pub mod muxer;
pub mod packet;

pub use device::{Vsock, RXQ, TXQ};
pub use muxer::{VsockError, VsockMetrics};
pub use packet::HOST_CID;
