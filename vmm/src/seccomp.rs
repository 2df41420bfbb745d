//! seccomp allow-lists, one per kind of VMM thread, built with seccompiler and installed by
//! each thread on itself before it touches anything the guest controls: vCPUs (KVM ioctls and
//! little else), the device event loop (epoll, the disk files, Unix sockets), the control
//! thread (its socket) and the VMM's main thread (the rest of the VMM's life: snapshots,
//! stopping). A call outside a thread's list raises SIGSYS, whose handler writes which thread
//! made which call to stderr (the VM's `vmm.log`) and ends the process with 128 + SIGSYS.

use std::collections::BTreeMap;
use std::sync::Arc;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use thiserror::Error;

/// The exit status of a VMM its filter stopped: 128 + SIGSYS, as a shell reports it.
pub const EXIT_SECCOMP: i32 = 128 + libc::SIGSYS;
/// The start of the line the SIGSYS handler writes.
pub const REPORT: &str = "vmrun: seccomp: thread ";

/// KVM's ioctl type byte (`_IO(KVMIO, …)`, KVMIO = 0xAE).
const KVMIO: u64 = 0xae;
const FIONBIO: u64 = 0x5421;
const FIOCLEX: u64 = 0x5451;

#[derive(Debug, Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter of the {kind} threads: {source}")]
    Build {
        kind: &'static str,
        source: seccompiler::BackendError,
    },
    #[error("cannot compile the seccomp filter of the {kind} threads: {source}")]
    Compile {
        kind: &'static str,
        source: seccompiler::BackendError,
    },
    #[error("cannot install the seccomp filter of a {kind} thread: {source}; run with --no-seccomp on a kernel without seccomp filters")]
    Install {
        kind: &'static str,
        source: seccompiler::Error,
    },
}

/// The filters of one VMM process.
pub struct Filters {
    pub vcpu: BpfProgram,
    pub events: BpfProgram,
    pub control: BpfProgram,
    pub main: BpfProgram,
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

fn allow(r: &mut Rules, calls: &[libc::c_long]) {
    for &c in calls {
        r.insert(c, Vec::new());
    }
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    // Arguments 0–5 and these operators are always valid.
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value)
        .unwrap_or_else(|e| unreachable!("seccomp condition: {e}"))
}

fn rule(conds: Vec<SeccompCondition>) -> SeccompRule {
    SeccompRule::new(conds).unwrap_or_else(|e| unreachable!("seccomp rule: {e}"))
}

/// Allows `call` when argument `arg` equals one of `values`.
fn allow_arg(r: &mut Rules, call: libc::c_long, arg: u8, values: &[u64]) {
    let rules = r.entry(call).or_default();
    for &v in values {
        rules.push(rule(vec![cond(arg, SeccompCmpOp::Eq, v)]));
    }
}

/// What every thread needs: memory (never executable), futexes, time, its own signals and
/// end, and what the SIGSYS report itself calls.
fn common() -> Rules {
    let mut r = Rules::new();
    allow(
        &mut r,
        &[
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_readv,
            libc::SYS_writev,
            libc::SYS_close,
            libc::SYS_lseek,
            libc::SYS_fstat,
            libc::SYS_newfstatat,
            libc::SYS_statx,
            libc::SYS_fcntl,
            libc::SYS_futex,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_madvise,
            libc::SYS_brk,
            libc::SYS_clock_gettime,
            libc::SYS_clock_nanosleep,
            libc::SYS_nanosleep,
            libc::SYS_sched_yield,
            libc::SYS_sched_getaffinity,
            libc::SYS_getrandom,
            libc::SYS_gettid,
            libc::SYS_getpid,
            libc::SYS_getuid,
            libc::SYS_geteuid,
            libc::SYS_getgid,
            libc::SYS_getegid,
            libc::SYS_rt_sigreturn,
            libc::SYS_rt_sigprocmask,
            libc::SYS_sigaltstack,
            libc::SYS_restart_syscall,
            libc::SYS_exit,
            libc::SYS_exit_group,
        ],
    );
    // mmap and mprotect, never with PROT_EXEC.
    for call in [libc::SYS_mmap, libc::SYS_mprotect] {
        r.insert(
            call,
            vec![rule(vec![cond(
                2,
                SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
                0,
            )])],
        );
    }
    allow_arg(&mut r, libc::SYS_prctl, 0, &[libc::PR_GET_NAME as u64]);
    r
}

/// KVM ioctls (any request of type KVMIO) on any fd.
fn allow_kvm_ioctls(r: &mut Rules) {
    r.entry(libc::SYS_ioctl).or_default().push(rule(vec![cond(
        1,
        SeccompCmpOp::MaskedEq(0xff00),
        KVMIO << 8,
    )]));
}

/// A vCPU: KVM_RUN and the state ioctls, and what its exits reach: device registers (a
/// driver resetting the vsock device closes its connections), eventfds, the console.
fn vcpu() -> Rules {
    let mut r = common();
    allow_kvm_ioctls(&mut r);
    allow(&mut r, &[libc::SYS_shutdown]);
    r
}

/// The device event loop: epoll, disk I/O, the vsock device's Unix sockets.
fn events() -> Rules {
    let mut r = common();
    allow(
        &mut r,
        &[
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_preadv,
            libc::SYS_pwritev,
            libc::SYS_preadv2,
            libc::SYS_pwritev2,
            libc::SYS_fsync,
            libc::SYS_fdatasync,
            libc::SYS_fallocate,
            libc::SYS_accept4,
            libc::SYS_connect,
            libc::SYS_shutdown,
            libc::SYS_sendto,
            libc::SYS_recvfrom,
            libc::SYS_sendmsg,
            libc::SYS_recvmsg,
            libc::SYS_getsockopt,
            libc::SYS_setsockopt,
            libc::SYS_unlink,
            libc::SYS_eventfd2,
        ],
    );
    allow_arg(&mut r, libc::SYS_socket, 0, &[libc::AF_UNIX as u64]);
    allow_arg(&mut r, libc::SYS_ioctl, 1, &[FIONBIO, FIOCLEX]);
    r
}

/// The control socket's thread: accept, read a line and its files, check the peer, hand it
/// on, answer.
fn control() -> Rules {
    let mut r = common();
    allow(
        &mut r,
        &[
            libc::SYS_accept4,
            libc::SYS_getsockopt,
            libc::SYS_setsockopt,
            libc::SYS_sendto,
            libc::SYS_recvfrom,
            // A request's files come as SCM_RIGHTS.
            libc::SYS_recvmsg,
        ],
    );
    allow_arg(&mut r, libc::SYS_ioctl, 1, &[FIONBIO, FIOCLEX]);
    r
}

/// The main thread once the VM runs: waiting, snapshots (files, KVM state, a new event-loop
/// thread on resume, which inherits this filter and adds its own), stopping (kicking and
/// joining the other threads, removing sockets). A superset of the event loop's list, since a
/// thread it starts keeps this filter too.
fn main_thread() -> Rules {
    let mut r = events();
    allow_kvm_ioctls(&mut r);
    allow(
        &mut r,
        &[
            libc::SYS_openat,
            libc::SYS_getdents64,
            libc::SYS_ftruncate,
            libc::SYS_copy_file_range,
            libc::SYS_sendfile,
            libc::SYS_fchmod,
            libc::SYS_mkdirat,
            libc::SYS_unlinkat,
            libc::SYS_renameat2,
            libc::SYS_rename,
            libc::SYS_tgkill,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_set_robust_list,
            libc::SYS_rseq,
            libc::SYS_getppid,
            libc::SYS_wait4,
        ],
    );
    // A thread it starts names itself and installs its own, narrower filter.
    allow(&mut r, &[libc::SYS_seccomp]);
    allow_arg(
        &mut r,
        libc::SYS_prctl,
        0,
        &[
            libc::PR_SET_NAME as u64,
            libc::PR_SET_VMA as u64,
            libc::PR_SET_NO_NEW_PRIVS as u64,
        ],
    );
    r
}

fn compile(kind: &'static str, rules: Rules) -> Result<BpfProgram, SeccompError> {
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|source| SeccompError::Build { kind, source })?;
    filter
        .try_into()
        .map_err(|source| SeccompError::Compile { kind, source })
}

impl Filters {
    pub fn build() -> Result<Arc<Filters>, SeccompError> {
        Ok(Arc::new(Filters {
            vcpu: compile("vCPU", vcpu())?,
            events: compile("event-loop", events())?,
            control: compile("control", control())?,
            main: compile("main", main_thread())?,
        }))
    }
}

/// Installs `prog` on the calling thread (and sets no_new_privs on it, as seccomp requires),
/// with the SIGSYS reporter in place first.
pub fn apply(kind: &'static str, prog: &BpfProgram) -> Result<(), SeccompError> {
    install_reporter();
    seccompiler::apply_filter(prog).map_err(|source| SeccompError::Install { kind, source })
}

/// Writes `n` in decimal into `buf` from its end; returns where the digits start.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> usize {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || i == 0 {
            return i;
        }
    }
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe calls, all in every filter: prctl(PR_GET_NAME), write, _exit.
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes (NUL included) into the buffer.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    let name_len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    // SAFETY: for SIGSYS the kernel fills siginfo's _sigsys member: after the three ints and
    // their padding (16 bytes) come the call address (8 bytes) and the system call number.
    let nr = unsafe { (info as *const u8).add(24).cast::<i32>().read_unaligned() };
    let mut digits = [0u8; 20];
    let start = decimal(nr.max(0) as u64, &mut digits);
    let parts: [&[u8]; 5] = [
        REPORT.as_bytes(),
        &name[..name_len],
        b" made a system call outside its seccomp allow-list (number ",
        &digits[start..],
        b"); the VMM stops. Rerun with --no-seccomp to debug, and report it.\n",
    ];
    for p in parts {
        // SAFETY: write(2) of a valid buffer to stderr.
        unsafe { libc::write(2, p.as_ptr().cast(), p.len()) };
    }
    // SAFETY: _exit ends the process without running anything else.
    unsafe { libc::_exit(EXIT_SECCOMP) };
}

fn install_reporter() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction with a valid SA_SIGINFO handler and an empty mask.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigsys as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut());
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles() {
        let f = Filters::build().unwrap();
        for p in [&f.vcpu, &f.events, &f.control, &f.main] {
            assert!(!p.is_empty());
        }
    }

    #[test]
    fn decimals_are_written_right_aligned() {
        let mut b = [0u8; 20];
        let s = decimal(0, &mut b);
        assert_eq!(&b[s..], b"0");
        let s = decimal(435, &mut b);
        assert_eq!(&b[s..], b"435");
        let s = decimal(u64::MAX, &mut b);
        assert_eq!(&b[s..], u64::MAX.to_string().as_bytes());
    }

    /// A thread under the vCPU filter: allowed calls work, a forbidden one raises SIGSYS.
    /// Run in a child process (the report ends the process).
    #[test]
    fn a_forbidden_call_is_reported_and_ends_the_process() {
        if std::env::var_os("VMRUN_SECCOMP_CHILD").is_some() {
            let f = Filters::build().unwrap();
            std::thread::Builder::new()
                .name("vcpu7".into())
                .spawn(move || {
                    apply("vCPU", &f.vcpu).unwrap();
                    // Allowed: write to stderr.
                    eprintln!("filtered");
                    // SAFETY: uname writes into the struct we own; forbidden here on purpose.
                    unsafe {
                        let mut u: libc::utsname = std::mem::zeroed();
                        libc::uname(&mut u);
                    }
                    eprintln!("survived");
                })
                .unwrap()
                .join()
                .unwrap();
            return;
        }
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "seccomp::tests::a_forbidden_call_is_reported_and_ends_the_process",
                "--nocapture",
            ])
            .env("VMRUN_SECCOMP_CHILD", "1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(EXIT_SECCOMP), "{err}");
        assert!(err.contains("filtered"), "{err}");
        assert!(!err.contains("survived"), "{err}");
        assert!(
            err.contains(&format!(
                "{REPORT}vcpu7 made a system call outside its seccomp allow-list (number {})",
                libc::SYS_uname
            )),
            "{err}"
        );
    }
}
