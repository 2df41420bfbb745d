//! KVM's own counters for a running VM, read from outside its VMM: exits by reason, page
//! faults, emulated instructions. The VMM keeps KVM's binary statistics files open
//! (`vstate::stats`); this process takes copies of them with `pidfd_getfd` (root, or ptrace
//! rights over the VMM) and reads them. (KVM's own ioctls fail from any process but the VM's
//! creator, and debugfs, which holds the same figures, is often unmounted or locked down.)

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;

/// Bounds on what a stats file may declare, so a strange kernel cannot make us allocate
/// without limit.
const MAX_DESCRIPTORS: u32 = 4096;
const MAX_NAME: u32 = 256;

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("cannot read /proc/{pid}/fd (is the VMM running, and are we root?): {source}")]
    Proc { pid: u32, source: std::io::Error },
    #[error("process {0} keeps no KVM statistics open (not a vmrun VMM, one from before `vmrun profile` existed, or a kernel without KVM_GET_STATS_FD)")]
    NoVm(u32),
    #[error("cannot copy descriptor {fd} of process {pid} (pidfd_getfd needs root or ptrace rights): {source}")]
    Copy {
        pid: u32,
        fd: RawFd,
        source: std::io::Error,
    },
    #[error("KVM statistics file: {0}")]
    Format(String),
    #[error("reading KVM statistics: {0}")]
    Read(std::io::Error),
}

/// One stats file (the VM's or a vCPU's): where each cumulative or instant counter lives.
struct Source {
    file: File,
    /// (name, absolute offset of its first u64)
    counters: Vec<(String, u64)>,
}

/// KVM's counters for one VM, summed over its vCPUs.
pub struct KvmStats {
    vm: Source,
    vcpus: Vec<Source>,
}

/// A reading: counter name → value (vCPU counters summed; VM-level ones prefixed `vm.`).
pub type Reading = BTreeMap<String, u64>;

impl KvmStats {
    /// Attaches to the VMM process `pid`.
    pub fn attach(pid: u32) -> Result<KvmStats, StatsError> {
        let dir = format!("/proc/{pid}/fd");
        let entries = std::fs::read_dir(&dir).map_err(|source| StatsError::Proc { pid, source })?;
        let (mut vm_fd, mut vcpu_fds) = (None, Vec::new());
        for e in entries.flatten() {
            let Ok(target) = std::fs::read_link(e.path()) else {
                continue;
            };
            let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<RawFd>().ok()) else {
                continue;
            };
            match target.to_string_lossy().as_ref() {
                "anon_inode:kvm-vm-stats" => vm_fd = Some(fd),
                t if t.starts_with("anon_inode:kvm-vcpu-stats") => vcpu_fds.push(fd),
                _ => {}
            }
        }
        let vm_fd = vm_fd.ok_or(StatsError::NoVm(pid))?;
        let pidfd = pidfd_open(pid).map_err(|source| StatsError::Copy {
            pid,
            fd: vm_fd,
            source,
        })?;
        let open = |fd: RawFd| -> Result<Source, StatsError> {
            let copy =
                pidfd_getfd(&pidfd, fd).map_err(|source| StatsError::Copy { pid, fd, source })?;
            Source::open(File::from(copy))
        };
        let vm = open(vm_fd)?;
        let vcpus = vcpu_fds.into_iter().map(open).collect::<Result<_, _>>()?;
        Ok(KvmStats { vm, vcpus })
    }

    /// The counters now.
    pub fn read(&self) -> Result<Reading, StatsError> {
        let mut out = Reading::new();
        for (k, v) in self.vm.read()? {
            out.insert(format!("vm.{k}"), v);
        }
        for c in &self.vcpus {
            for (k, v) in c.read()? {
                *out.entry(k).or_default() += v;
            }
        }
        Ok(out)
    }

    pub fn vcpus(&self) -> usize {
        self.vcpus.len()
    }
}

/// `after - before` for every counter in both (instant values and histograms are not
/// differences and are left out when the stats files are read).
pub fn delta(before: &Reading, after: &Reading) -> Reading {
    after
        .iter()
        .map(|(k, a)| {
            (
                k.clone(),
                a.saturating_sub(before.get(k).copied().unwrap_or(0)),
            )
        })
        .collect()
}

impl Source {
    fn open(file: File) -> Result<Source, StatsError> {
        let mut head = [0u8; 24];
        file.read_exact_at(&mut head, 0).map_err(StatsError::Read)?;
        let field = |i: usize| u32::from_ne_bytes(head[i * 4..i * 4 + 4].try_into().unwrap());
        let (name_size, num_desc, desc_offset, data_offset) =
            (field(1), field(2), field(4), field(5));
        if num_desc > MAX_DESCRIPTORS || name_size > MAX_NAME || name_size == 0 {
            return Err(StatsError::Format(format!(
                "{num_desc} descriptors with names of {name_size} bytes"
            )));
        }
        let entry = 16 + name_size as usize;
        let mut descs = vec![0u8; entry * num_desc as usize];
        file.read_exact_at(&mut descs, u64::from(desc_offset))
            .map_err(StatsError::Read)?;
        let mut counters = Vec::new();
        for d in descs.chunks_exact(entry) {
            let flags = u32::from_ne_bytes(d[0..4].try_into().unwrap());
            let size = u16::from_ne_bytes(d[6..8].try_into().unwrap());
            let offset = u32::from_ne_bytes(d[8..12].try_into().unwrap());
            let name = &d[16..];
            let name = String::from_utf8_lossy(
                &name[..name.iter().position(|b| *b == 0).unwrap_or(name.len())],
            );
            let kind = flags & kvm_bindings::KVM_STATS_TYPE_MASK;
            // Cumulative counters and instant values of one item; histograms are left out.
            let wanted = kind == kvm_bindings::KVM_STATS_TYPE_CUMULATIVE
                || kind == kvm_bindings::KVM_STATS_TYPE_INSTANT;
            if !wanted || size != 1 {
                continue;
            }
            counters.push((
                name.into_owned(),
                u64::from(data_offset) + u64::from(offset),
            ));
        }
        Ok(Source { file, counters })
    }

    fn read(&self) -> Result<Vec<(String, u64)>, StatsError> {
        let mut v = [0u8; 8];
        self.counters
            .iter()
            .map(|(name, off)| {
                self.file
                    .read_exact_at(&mut v, *off)
                    .map_err(StatsError::Read)?;
                Ok((name.clone(), u64::from_ne_bytes(v)))
            })
            .collect()
    }
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) with a pid and no flags; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn pidfd_getfd(pidfd: &OwnedFd, fd: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_getfd(2) duplicates another process's descriptor into ours; the result is
    // checked.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delta_keeps_every_counter_and_never_underflows() {
        let before: Reading = [("exits".into(), 10), ("io_exits".into(), 5)].into();
        let after: Reading = [
            ("exits".into(), 25),
            ("io_exits".into(), 3),
            ("new".into(), 7),
        ]
        .into();
        let d = delta(&before, &after);
        assert_eq!(d["exits"], 15);
        assert_eq!(d["io_exits"], 0);
        assert_eq!(d["new"], 7);
    }

    #[test]
    fn a_process_without_a_vm_is_named() {
        let me = std::process::id();
        match KvmStats::attach(me) {
            Err(StatsError::NoVm(p)) => assert_eq!(p, me),
            Err(e) => panic!("unexpected error: {e}"),
            Ok(_) => panic!("this test process holds no VM"),
        }
    }
}
