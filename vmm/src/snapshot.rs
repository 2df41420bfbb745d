//! The snapshot on disk: a directory holding `state` (a versioned, checksummed file with what
//! the snapshot was taken with and the machine state) and `memory` (guest RAM, sparse, mapped
//! back privately on restore). The state file is parsed as hostile input: every length is
//! checked against the file before anything is allocated, and every refusal says what is
//! wrong and what to do.
//!
//! Layout of `state`: magic (8 bytes) · format version (u32 LE) · body length (u64 LE) · body
//! (postcard) · SHA-256 of the body (32 bytes).

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::arch::x86_64::layout::MAX_VCPUS;
use crate::arch::x86_64::vcpu_state::VcpuState;
use crate::devices::legacy::serial::SerialSaved;
use crate::devices::virtio::mmio::TransportState;
use crate::vstate::vm::VmState;

pub const MAGIC: [u8; 8] = *b"VMRUNSNP";
/// Bumped whenever the body changes shape (2: the launch options gained the image and its
/// command defaults); other versions are refused, never guessed at.
pub const FORMAT_VERSION: u32 = 2;
/// Upper bound of the body: the machine state of the largest VM is far below it.
pub const MAX_BODY: u64 = 16 << 20;
const PREFIX: usize = 8 + 4 + 8;
const DIGEST: usize = 32;
/// Largest guest a snapshot may describe (MiB).
const MAX_MEM_MIB: u64 = 1 << 20;

pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";

#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: not a vmrun snapshot (no vmrun snapshot header)")]
    NotASnapshot(PathBuf),
    #[error("{path}: snapshot format version {found}; this vmrun ({ours}) reads version {FORMAT_VERSION}: take the snapshot again with this vmrun")]
    Version {
        path: PathBuf,
        found: u32,
        ours: &'static str,
    },
    #[error("{path}: the snapshot is truncated ({have} bytes, its header promises {want}); take it again")]
    Truncated { path: PathBuf, have: u64, want: u64 },
    #[error("{path}: the snapshot's state is {len} bytes, over the {MAX_BODY}-byte limit; it is not one vmrun wrote")]
    TooLarge { path: PathBuf, len: u64 },
    #[error("{0}: the snapshot's checksum does not match: it was damaged or altered after it was taken; take it again")]
    Checksum(PathBuf),
    #[error("{path}: the snapshot's state does not decode ({reason}); it was damaged or written by another vmrun: take it again")]
    Decode { path: PathBuf, reason: String },
    #[error("{path}: the snapshot is inconsistent: {reason}; take it again")]
    Inconsistent { path: PathBuf, reason: String },
    #[error("the snapshot was taken with {role} {taken} and this VM would use {now}, which differs ({what}); restore with the same {role}, or take the snapshot again")]
    ImageChanged {
        role: String,
        taken: PathBuf,
        now: PathBuf,
        what: &'static str,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One image a snapshot depends on, identified by content; size and mtime let an unchanged
/// file be recognised without reading it again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageId {
    /// What it is to the VM: "kernel", "initramfs", "rootfs", ...
    pub role: String,
    pub path: PathBuf,
    pub len: u64,
    pub mtime_ns: i64,
    pub sha256: [u8; 32],
}

fn mtime_ns(m: &std::fs::Metadata) -> i64 {
    m.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(m.mtime_nsec())
}

fn sha256_file(path: &Path) -> Result<[u8; 32], SnapshotError> {
    sha256_of(&File::open(path).map_err(io(path))?, path)
}

/// The SHA-256 of an open file's content, read by offset (the file's position is untouched).
fn sha256_of(f: &File, path: &Path) -> Result<[u8; 32], SnapshotError> {
    use std::os::unix::fs::FileExt;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        let n = f.read_at(&mut buf, at).map_err(io(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        at += n as u64;
    }
    Ok(h.finalize().into())
}

impl ImageId {
    pub fn of(role: &str, path: &Path) -> Result<ImageId, SnapshotError> {
        Self::of_file(role, path, &File::open(path).map_err(io(path))?)
    }

    /// The identity of `path`'s content, read from `file` (opened from it earlier: a jailed
    /// VMM can no longer open it).
    pub fn of_file(role: &str, path: &Path, file: &File) -> Result<ImageId, SnapshotError> {
        let m = file.metadata().map_err(io(path))?;
        Ok(ImageId {
            role: role.into(),
            path: path.to_path_buf(),
            len: m.len(),
            mtime_ns: mtime_ns(&m),
            sha256: sha256_of(file, path)?,
        })
    }

    /// Whether `path` holds the same content: the same size and mtime are taken as the same
    /// file; otherwise the content is hashed and compared.
    pub fn check(&self, path: &Path) -> Result<(), SnapshotError> {
        let changed = |what| SnapshotError::ImageChanged {
            role: self.role.clone(),
            taken: self.path.clone(),
            now: path.to_path_buf(),
            what,
        };
        let m = std::fs::metadata(path).map_err(io(path))?;
        if m.len() != self.len {
            return Err(changed("another size"));
        }
        if mtime_ns(&m) == self.mtime_ns {
            return Ok(());
        }
        if sha256_file(path)? != self.sha256 {
            return Err(changed("other content"));
        }
        Ok(())
    }
}

/// What a snapshot was taken with: checked before anything of it is used.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub vmrun_version: String,
    pub vcpus: u8,
    pub mem_mib: u64,
    pub images: Vec<ImageId>,
    /// Whatever the layer that took the snapshot needs to start the same VM again (launch
    /// options), opaque here.
    pub launch: Vec<u8>,
}

/// The machine: VM, vCPUs and devices, in attachment order.
#[derive(Serialize, Deserialize)]
pub struct MachineState {
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialSaved,
    pub transports: Vec<TransportState>,
}

#[derive(Deserialize)]
struct Body {
    info: SnapshotInfo,
    machine: MachineState,
}

/// What [`Body`] decodes from, written without copying the state.
#[derive(Serialize)]
struct BodyRef<'a> {
    info: &'a SnapshotInfo,
    machine: &'a MachineState,
}

/// A snapshot read back and checked.
pub struct Snapshot {
    pub dir: PathBuf,
    pub info: SnapshotInfo,
    pub machine: MachineState,
}

impl Snapshot {
    pub fn memory_path(&self) -> PathBuf {
        self.dir.join(MEMORY_FILE)
    }

    /// Reads `dir/state`, refusing anything that is not a whole, unaltered snapshot of this
    /// format.
    pub fn load(dir: &Path) -> Result<Snapshot, SnapshotError> {
        let path = dir.join(STATE_FILE);
        let mut f = File::open(&path).map_err(io(&path))?;
        let have = f.metadata().map_err(io(&path))?.len();
        let mut prefix = [0u8; PREFIX];
        if have < PREFIX as u64 {
            return Err(if have >= 8 {
                SnapshotError::Truncated {
                    path,
                    have,
                    want: (PREFIX + DIGEST) as u64,
                }
            } else {
                SnapshotError::NotASnapshot(path)
            });
        }
        f.read_exact(&mut prefix).map_err(io(&path))?;
        let (machine, info) = parse(&path, &prefix, &mut f, have)?;
        Ok(Snapshot {
            dir: dir.to_path_buf(),
            info,
            machine,
        })
    }

    /// Writes `dir/state` (the directory exists; `memory` is written separately).
    pub fn write_state(
        dir: &Path,
        info: &SnapshotInfo,
        machine: &MachineState,
    ) -> Result<(), SnapshotError> {
        let path = dir.join(STATE_FILE);
        let f = File::create(&path).map_err(io(&path))?;
        Self::write_state_to(&path, &f, info, machine)
    }

    /// Writes the state into `f`, an empty file opened for it (`path` names it in errors).
    pub fn write_state_to(
        path: &Path,
        mut f: &File,
        info: &SnapshotInfo,
        machine: &MachineState,
    ) -> Result<(), SnapshotError> {
        let bytes = encode(&BodyRef { info, machine }).map_err(|reason| SnapshotError::Decode {
            path: path.to_path_buf(),
            reason,
        })?;
        f.write_all(&bytes).map_err(io(path))?;
        f.sync_all().map_err(io(path))
    }
}

/// The whole state file for `body`.
fn encode(body: &BodyRef) -> Result<Vec<u8>, String> {
    let payload = postcard::to_stdvec(body).map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(PREFIX + payload.len() + DIGEST);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    out.extend_from_slice(&Sha256::digest(&payload));
    Ok(out)
}

/// A whole state file's bytes, as [`Snapshot::load`] checks them (for fuzzing and tools).
pub fn parse_state(bytes: &[u8]) -> Result<(SnapshotInfo, MachineState), SnapshotError> {
    let path = Path::new("(bytes)");
    if bytes.len() < PREFIX {
        return Err(SnapshotError::NotASnapshot(path.into()));
    }
    let mut prefix = [0u8; PREFIX];
    prefix.copy_from_slice(&bytes[..PREFIX]);
    let (machine, info) = parse(path, &prefix, &mut &bytes[PREFIX..], bytes.len() as u64)?;
    Ok((info, machine))
}

/// A state file whose header and checksum are right for `body`, whatever it holds: what
/// someone who can rewrite a snapshot can make (the fuzzer feeds such files to the decoder).
pub fn with_valid_checksum(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(PREFIX + body.len() + DIGEST);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(body);
    out.extend_from_slice(&Sha256::digest(body));
    out
}

/// Checks the prefix, reads and verifies the body, decodes it and checks it for sense.
fn parse(
    path: &Path,
    prefix: &[u8; PREFIX],
    rest: &mut impl Read,
    have: u64,
) -> Result<(MachineState, SnapshotInfo), SnapshotError> {
    let path = path.to_path_buf();
    if prefix[..8] != MAGIC {
        return Err(SnapshotError::NotASnapshot(path));
    }
    let version = u32::from_le_bytes(prefix[8..12].try_into().unwrap_or_default());
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            path,
            found: version,
            ours: env!("CARGO_PKG_VERSION"),
        });
    }
    let len = u64::from_le_bytes(prefix[12..20].try_into().unwrap_or_default());
    if len > MAX_BODY {
        return Err(SnapshotError::TooLarge { path, len });
    }
    let want = (PREFIX + DIGEST) as u64 + len;
    if have != want {
        return Err(if have < want {
            SnapshotError::Truncated { path, have, want }
        } else {
            SnapshotError::Inconsistent {
                path,
                reason: format!("{} bytes after its end", have - want),
            }
        });
    }
    let mut payload = vec![0u8; len as usize];
    rest.read_exact(&mut payload).map_err(io(&path))?;
    let mut digest = [0u8; DIGEST];
    rest.read_exact(&mut digest).map_err(io(&path))?;
    if Sha256::digest(&payload).as_slice() != digest {
        return Err(SnapshotError::Checksum(path));
    }
    let body: Body = postcard::from_bytes(&payload).map_err(|e| SnapshotError::Decode {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    check(&path, &body)?;
    Ok((body.machine, body.info))
}

/// What a decoded body must satisfy before a VM is built from it.
fn check(path: &Path, b: &Body) -> Result<(), SnapshotError> {
    let bad = |reason: String| SnapshotError::Inconsistent {
        path: path.to_path_buf(),
        reason,
    };
    let n = b.machine.vcpus.len();
    if n == 0 || n > usize::from(MAX_VCPUS) || n != usize::from(b.info.vcpus) {
        return Err(bad(format!(
            "{n} saved vCPUs for a VM of {} (1 to {MAX_VCPUS})",
            b.info.vcpus
        )));
    }
    if b.info.mem_mib == 0 || b.info.mem_mib > MAX_MEM_MIB {
        return Err(bad(format!("{} MiB of memory", b.info.mem_mib)));
    }
    Ok(())
}

/// A machine state for tests that need one without a VM.
#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    pub fn machine(vcpus: usize) -> MachineState {
        MachineState {
            vm: VmState {
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
                pit: Default::default(),
                clock: Default::default(),
            },
            vcpus: (0..vcpus)
                .map(|_| VcpuState {
                    cpuid: vec![Default::default(); 3],
                    mp_state: Default::default(),
                    regs: Default::default(),
                    sregs: Default::default(),
                    xsave: Default::default(),
                    xcrs: None,
                    debug_regs: Default::default(),
                    lapic: kvm_bindings::kvm_lapic_state { regs: [0; 1024] },
                    msrs: vec![(0x10, 1234), (0x174, 5)],
                    events: Default::default(),
                    tsc_khz: Some(2_000_000),
                })
                .collect(),
            serial: SerialSaved::default(),
            transports: vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(vcpus: u8) -> SnapshotInfo {
        SnapshotInfo {
            vmrun_version: "0.1.0".into(),
            vcpus,
            mem_mib: 256,
            images: vec![],
            launch: vec![1, 2, 3],
        }
    }

    fn write(dir: &Path, vcpus: usize) -> Vec<u8> {
        Snapshot::write_state(dir, &info(vcpus as u8), &tests_support::machine(vcpus)).unwrap();
        std::fs::read(dir.join(STATE_FILE)).unwrap()
    }

    #[test]
    fn a_written_state_reads_back() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), 2);
        let s = Snapshot::load(d.path()).unwrap();
        assert_eq!(s.info, info(2));
        assert_eq!(s.machine.vcpus.len(), 2);
        assert_eq!(s.machine.vcpus[1].msrs, vec![(0x10, 1234), (0x174, 5)]);
        assert_eq!(s.machine.vcpus[0].tsc_khz, Some(2_000_000));
    }

    #[test]
    fn truncated_altered_foreign_and_future_files_are_refused_by_name() {
        let d = tempfile::tempdir().unwrap();
        let good = write(d.path(), 1);
        let p = d.path().join(STATE_FILE);
        let load_with = |bytes: &[u8]| {
            std::fs::write(&p, bytes).unwrap();
            Snapshot::load(d.path()).err().expect("refused").to_string()
        };
        assert!(load_with(&good[..good.len() - 1]).contains("truncated"));
        assert!(load_with(&good[..10]).contains("truncated"));
        assert!(load_with(b"hello").contains("not a vmrun snapshot"));
        let mut flipped = good.clone();
        flipped[PREFIX + 5] ^= 1;
        assert!(load_with(&flipped).contains("checksum"));
        let mut future = good.clone();
        future[8] = 9;
        assert!(load_with(&future).contains("format version 9"));
        let mut huge = good.clone();
        huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(load_with(&huge).contains("limit"));
        let mut longer = good.clone();
        longer.push(0);
        assert!(load_with(&longer).contains("after its end"));
    }

    #[test]
    fn a_body_that_contradicts_itself_is_refused() {
        let d = tempfile::tempdir().unwrap();
        Snapshot::write_state(d.path(), &info(3), &tests_support::machine(1)).unwrap();
        let e = Snapshot::load(d.path()).err().unwrap().to_string();
        assert!(e.contains("1 saved vCPUs for a VM of 3"), "{e}");
    }

    #[test]
    fn an_image_is_recognised_by_content() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("rootfs");
        std::fs::write(&p, b"base image").unwrap();
        let id = ImageId::of("rootfs", &p).unwrap();
        id.check(&p).unwrap();
        // Same content, new mtime: hashed again and accepted.
        let q = d.path().join("copy");
        std::fs::write(&q, b"base image").unwrap();
        id.check(&q).unwrap();
        std::fs::write(&q, b"base imagf").unwrap();
        let e = id.check(&q).unwrap_err().to_string();
        assert!(e.contains("rootfs") && e.contains("other content"), "{e}");
        std::fs::write(&q, b"short").unwrap();
        assert!(id
            .check(&q)
            .unwrap_err()
            .to_string()
            .contains("another size"));
    }

    // The parser's fuzz target (bounded, runs with `cargo test`; PROPTEST_CASES raises it).
    proptest::proptest! {
        /// Random damage to a valid state file: an error, never a panic; a flipped bit past
        /// the header never passes.
        #[test]
        fn damaged_state_files_are_refused(
            flips in proptest::collection::vec((0usize..1 << 20, 0u8..8), 1..4),
            cut in proptest::option::of(0usize..1 << 20),
        ) {
            let d = tempfile::tempdir().unwrap();
            let mut b = write(d.path(), 2);
            for (i, bit) in flips {
                let i = i % b.len();
                b[i] ^= 1 << bit;
            }
            if let Some(c) = cut {
                b.truncate(c % b.len());
            }
            proptest::prop_assert!(parse_state(&b).is_err());
        }

        /// Arbitrary bodies under a valid checksum (what someone who recomputes the digest can
        /// write): decoded into an error or a checked state, never a panic or a huge
        /// allocation.
        #[test]
        fn arbitrary_bodies_with_valid_checksums_never_panic(
            payload in proptest::collection::vec(proptest::num::u8::ANY, 0..8192),
        ) {
            let _ = parse_state(&with_valid_checksum(&payload));
        }
    }
}
