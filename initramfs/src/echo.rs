//! `/init vsock-echo PORT [COUNT]`: a tiny vsock echo server, run as an ordinary process (not
//! PID 1) by tests that prove the vsock path end to end before the agent exists. It accepts
//! COUNT connections (default 1) one after another, echoes each until EOF, then exits 0.

use std::io::{Read, Write};
use std::os::fd::FromRawFd;

fn sockaddr(port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value before the fields are set.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_port = port;
    a.svm_cid = libc::VMADDR_CID_ANY;
    a
}

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

pub fn run(args: &[String]) -> Result<(), String> {
    let port: u32 = args
        .first()
        .and_then(|p| p.parse().ok())
        .ok_or("usage: vsock-echo PORT [COUNT]")?;
    let count: u32 = args
        .get(1)
        .map(|c| c.parse().map_err(|_| "COUNT must be a number"))
        .transpose()?
        .unwrap_or(1);
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(os_err("socket(AF_VSOCK)"));
    }
    // SAFETY: fd is a fresh socket we own; File closes it on drop.
    let listener = unsafe { std::fs::File::from_raw_fd(fd) };
    let addr = sockaddr(port);
    // SAFETY: addr is a valid sockaddr_vm and the length matches it.
    let r = unsafe {
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(os_err("bind"));
    }
    // SAFETY: fd is a bound socket.
    if unsafe { libc::listen(fd, 8) } != 0 {
        return Err(os_err("listen"));
    }
    println!("vsock-echo: listening on port {port}");
    for _ in 0..count {
        // SAFETY: fd is listening; null address pointers are allowed.
        let c = unsafe {
            libc::accept4(
                fd,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if c < 0 {
            return Err(os_err("accept"));
        }
        // SAFETY: c is a fresh connected socket we own.
        let mut conn = unsafe { std::fs::File::from_raw_fd(c) };
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0usize;
        loop {
            let n = conn.read(&mut buf).map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                break;
            }
            conn.write_all(&buf[..n])
                .map_err(|e| format!("write: {e}"))?;
            total += n;
        }
        println!("vsock-echo: echoed {total} bytes");
    }
    drop(listener);
    Ok(())
}
