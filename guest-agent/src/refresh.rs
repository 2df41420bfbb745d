//! What a VM restored from a snapshot needs before it is used: every fork of one snapshot
//! starts with the same kernel random state and the clock of the moment it was taken. The host
//! sends fresh entropy and the time; the agent credits the entropy (`RNDADDENTROPY`), forces
//! the kernel to reseed its generator from it at once (`RNDRESEEDCRNG`, otherwise it would
//! only reseed on its own schedule) and sets the clock. Also `sync`, before a snapshot.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;

use vmrun_protocol::agent::ErrorInfo;

/// RNDADDENTROPY = _IOW('R', 0x03, int[2]); RNDRESEEDCRNG = _IO('R', 0x07).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

fn os(what: &str) -> ErrorInfo {
    ErrorInfo::io(what, &io::Error::last_os_error())
}

/// `struct rand_pool_info` followed by the bytes: entropy_count (bits credited), buf_size.
fn pool_info(entropy: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + entropy.len());
    v.extend_from_slice(&((entropy.len() * 8) as i32).to_ne_bytes());
    v.extend_from_slice(&(entropy.len() as i32).to_ne_bytes());
    v.extend_from_slice(entropy);
    v
}

/// Credits `entropy`, reseeds, sets CLOCK_REALTIME to `unix_ns`.
pub fn refresh(entropy: &[u8], unix_ns: u64) -> Result<(), ErrorInfo> {
    if !entropy.is_empty() {
        let f = OpenOptions::new()
            .write(true)
            .open("/dev/urandom")
            .map_err(|e| ErrorInfo::io("/dev/urandom", &e))?;
        let info = pool_info(entropy);
        // SAFETY: RNDADDENTROPY reads a rand_pool_info whose buf_size bytes follow its two
        // ints; `info` is exactly that, alive for the call.
        if unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } < 0 {
            return Err(os("RNDADDENTROPY on /dev/urandom"));
        }
        // SAFETY: RNDRESEEDCRNG takes no argument.
        if unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG) } < 0 {
            return Err(os("RNDRESEEDCRNG on /dev/urandom"));
        }
    }
    let ts = libc::timespec {
        tv_sec: (unix_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (unix_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: clock_settime reads one timespec through the valid pointer.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } < 0 {
        return Err(os("clock_settime"));
    }
    Ok(())
}

/// Dirty pages to disk, before a snapshot.
pub fn sync() {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_info_header_counts_bits_and_bytes() {
        let v = pool_info(&[1, 2, 3, 4]);
        assert_eq!(&v[..4], &32i32.to_ne_bytes());
        assert_eq!(&v[4..8], &4i32.to_ne_bytes());
        assert_eq!(&v[8..], &[1, 2, 3, 4]);
    }

    #[test]
    fn ioctl_numbers_are_the_kernels() {
        // _IOC(dir, type, nr, size): write = 1 << 30, size int[2] = 8.
        assert_eq!(
            RNDADDENTROPY,
            (1 << 30) | (8 << 16) | ((b'R' as u64) << 8) | 0x03
        );
        assert_eq!(RNDRESEEDCRNG, ((b'R' as u64) << 8) | 0x07);
    }
}
