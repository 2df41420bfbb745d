//! Building the errors handlers return. Only the server turns them into ERROR frames.

use std::io;

use vmrun_protocol::agent::{ErrorInfo, ErrorKind};

/// An error of `kind` with an OS error number (0 when none) and a message naming the path.
pub fn err(kind: ErrorKind, errno: i32, message: String) -> ErrorInfo {
    ErrorInfo {
        kind,
        errno,
        message,
    }
}

/// The agent could not get a thread, fd or memory for a request.
pub fn resource_error(what: &str, e: &io::Error) -> ErrorInfo {
    err(
        ErrorKind::Io,
        e.raw_os_error().unwrap_or(0),
        format!("the agent cannot {what}: {e} (the guest is short of memory or processes; give the VM more --memory)"),
    )
}

/// The connection to the client failed while answering `what`.
pub fn connection(what: &str, e: &io::Error) -> ErrorInfo {
    ErrorInfo::io(&format!("{what}: connection"), e)
}
