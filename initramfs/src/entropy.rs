//! Seeds the guest kernel's random number generator at boot. On hosts that emulate guest ring
//! 0 the PVM kernel is told to ignore RDRAND (`clearcpuid=rdrand`: KVM's instruction emulator
//! lacks it), the VM has no entropy device and few interrupts, so the kernel's generator stayed
//! unseeded for the VM's whole life, and while unseeded every request for random bytes (seven
//! per exec: stack canary, AT_RANDOM, address-space randomisation…) rehashed the whole input
//! pool: ~4% of an exec's emulated instructions. User code runs natively there, so PID 1 takes
//! 256 bits from the CPU's RDSEED (or RDRAND) and credits them with `RNDADDENTROPY`, as the
//! kernel would itself with `random.trust_cpu` where it may use the instruction.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

const WORDS: usize = 4;

/// `struct rand_pool_info` with room for 256 bits.
#[repr(C)]
struct PoolInfo {
    entropy_count: libc::c_int,
    buf_size: libc::c_int,
    buf: [u64; WORDS],
}

/// RNDADDENTROPY = _IOW('R', 0x03, int[2]).
const RNDADDENTROPY: libc::c_ulong = nix::request_code_write!(b'R', 0x03, 8) as libc::c_ulong;

/// 64 bits from RDSEED, else RDRAND; `None` when the CPU has neither or keeps failing.
fn cpu_random() -> Option<u64> {
    let mut v = 0u64;
    for _ in 0..32 {
        if std::arch::is_x86_feature_detected!("rdseed") {
            // SAFETY: the CPU has RDSEED (checked just above); it writes one u64.
            if unsafe { std::arch::x86_64::_rdseed64_step(&mut v) } == 1 {
                return Some(v);
            }
        } else if std::arch::is_x86_feature_detected!("rdrand") {
            // SAFETY: the CPU has RDRAND (checked just above); it writes one u64.
            if unsafe { std::arch::x86_64::_rdrand64_step(&mut v) } == 1 {
                return Some(v);
            }
        } else {
            return None;
        }
        std::hint::spin_loop();
    }
    None
}

/// Credits 256 bits from the CPU to the kernel's input pool; returns the bits credited
/// (0 when the CPU offers none).
pub fn seed_kernel_rng() -> Result<u32, String> {
    let mut info = PoolInfo {
        entropy_count: (WORDS * 64) as libc::c_int,
        buf_size: (WORDS * 8) as libc::c_int,
        buf: [0; WORDS],
    };
    for w in &mut info.buf {
        match cpu_random() {
            Some(v) => *w = v,
            None => return Ok(0),
        }
    }
    let f = OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| format!("open /dev/urandom: {e}"))?;
    // SAFETY: RNDADDENTROPY reads a rand_pool_info whose buffer holds buf_size bytes, which
    // `info` does; the fd is open for the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, &info) };
    // The seed is the kernel's now; leave no copy in PID 1.
    // SAFETY: a plain write to our own field; volatile so it is not optimised away.
    unsafe { std::ptr::write_volatile(&mut info.buf, [0; WORDS]) };
    if r < 0 {
        return Err(format!(
            "RNDADDENTROPY: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok((WORDS * 64) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_code_is_linuxs() {
        // include/uapi/linux/random.h: _IOW('R', 0x03, int [2]).
        assert_eq!(RNDADDENTROPY, 0x4008_5203);
    }

    #[test]
    fn the_kernel_takes_the_seed() {
        // Credits this host's own pool (harmless); needs root, as PID 1 in the guest has.
        match seed_kernel_rng() {
            Ok(bits) => assert!(bits == 256 || !std::arch::is_x86_feature_detected!("rdrand")),
            Err(e) if e.contains("Operation not permitted") => {
                eprintln!("SKIPPED: not root ({e})")
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn the_cpu_gives_varying_words_where_it_has_the_instructions() {
        if !std::arch::is_x86_feature_detected!("rdrand") {
            eprintln!("SKIPPED: this CPU has no RDRAND");
            return;
        }
        let a: Vec<u64> = (0..4).filter_map(|_| cpu_random()).collect();
        assert_eq!(a.len(), 4);
        assert!(a.windows(2).any(|w| w[0] != w[1]), "{a:x?}");
    }
}
