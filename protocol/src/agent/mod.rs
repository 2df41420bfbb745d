//! The vmrun agent wire protocol, spoken over one stream per operation (a vsock connection to
//! guest port [`PORT`] in a VM, a Unix socket in host tests).
//!
//! # Framing
//! Every frame is `len: u32 LE` (bytes after this field), `kind: u8`, then `len - 1` payload
//! bytes. `len` is checked against [`MAX_FRAME`] before anything is allocated; a frame over the
//! cap, a truncated frame or an unknown kind ends the connection with an error.
//! Bulk data (file bytes, stdin/stdout/stderr, tar) travels as raw payloads of `DATA`,
//! `STDOUT`, `STDERR` frames, at most [`CHUNK`] bytes each.
//!
//! # Order
//! 1. Client: `HELLO` (payload: version u32). Agent: `HELLO_OK` (its version) or `ERROR`
//!    (`Version`) and close.
//! 2. Client: `REQUEST` (a [`Request`]). Then, by request:
//!    - `Exec`: agent `STARTED` (pid u32) or `ERROR` (`Spawn`, with errno). Then the client may
//!      send `DATA` (stdin), `EOF` (close stdin), `RESIZE` (rows u16, cols u16), `SIGNAL`
//!      (signal i32); the agent sends `STDOUT`/`STDERR` as output is produced, then `EXIT`
//!      ([`ExitStatus`]) and closes. Output produced before the child exits is drained; a
//!      grandchild that keeps the pipes open does not hold back `EXIT`. A client that goes away
//!      gets the process group killed.
//!    - `Upload`: agent `OK` (ready) or `ERROR`; client `DATA`… `EOF`; agent `OK` (payload: bytes
//!      written u64) or `ERROR`. Written to a temporary name in the target directory and renamed
//!      into place, so a failed or abandoned upload leaves nothing behind.
//!    - `Download`: agent `REPLY` (`Reply::File { size, mode }`) or `ERROR`; then `DATA`… `EOF`.
//!    - `Capture`: agent syncs, then `DATA`… (a tar stream of the upper layer) `EOF`, or `ERROR`.
//!    - `ArchiveOut`: `DATA`… (a tar of the file or tree, entries named from its last path
//!      component, symlinks not followed) `EOF`, or `ERROR`.
//!    - `ArchiveIn`: agent `OK` (the target directory exists, made with its parents) or
//!      `ERROR`; client `DATA`… (a tar) `EOF`; agent `OK` (payload: entries u64, file bytes u64)
//!      or `ERROR`. Entries that would land outside the directory are refused.
//!    - `Stat`, `List`, `Mkdir`, `Remove`: agent `REPLY` or `OK`, or `ERROR`.
//!    - `Shutdown`: agent `OK`, then syncs and powers the VM off.
//!
//! The layers: `frame` (framing, the DATA…EOF stream adapters, `ProtoError`), `codec` (the
//! integers and strings messages are made of) and `message` (the typed messages).

pub mod codec;
pub mod frame;
pub mod message;

pub use frame::{
    kind, read_frame, write_frame, DataReader, DataWriter, ProtoError, CHUNK, MAX_FRAME,
};
pub use message::*;

pub const VERSION: u32 = 1;
/// The vsock port the agent listens on.
pub const PORT: u32 = 1024;
