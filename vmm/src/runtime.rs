//! Where running VMs live on the host: one directory per VM under the runtime directory
//! (`VMRUN_RUNTIME_DIR`, else `/run/vmrun` for root, else `$XDG_RUNTIME_DIR/vmrun`, else
//! `/tmp/vmrun-<uid>`), holding the VMM's socket, the console log, the VMM's own log, a record
//! of what the VM is, and a lock file.
//!
//! The lock says whether a VM is alive without trusting pids: every process that keeps the VM
//! (its VMM, and the launcher while it waits) holds a shared `flock` on `lock`; when none is
//! left, an exclusive lock succeeds and the VM is dead. A directory is made under a temporary
//! name, locked, then renamed into place, so no one ever sees an unlocked live VM; a name that
//! is taken makes the rename fail.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use thiserror::Error;

/// Overrides where VMs live (tests use it).
pub const RUNTIME_ENV: &str = "VMRUN_RUNTIME_DIR";
const VMS: &str = "vms";
const LOCK: &str = "lock";
const RECORD: &str = "vm";
const SOCKET: &str = "vsock.sock";
const CONTROL: &str = "control.sock";
/// A restored VM's own copy of its snapshot's upper disk.
const UPPER: &str = "upper.img";
const CONSOLE: &str = "console.log";
const VMM_LOG: &str = "vmm.log";
/// Written by `Vm::detach`: the VMM stops watching the process that started it.
const DETACHED: &str = "detached";
/// Files outside the directory that belong to the VM until they are finished (a capture being
/// written): removed with the VM's leftovers.
const PARTIAL: &str = "partial";
/// Longest name, and the record's size cap (it is read back from disk).
pub const NAME_MAX: usize = 63;
const RECORD_MAX: u64 = 16 << 10;
/// A directory still under its temporary name this long is a leftover of a launcher that died.
const STALE_CLAIM: Duration = Duration::from_secs(120);

#[derive(Debug, Error)]
pub enum RuntimeError {
    #[error("VM name {0:?}: use 1 to {NAME_MAX} letters, digits, '-', '_' or '.', starting with a letter or digit")]
    BadName(String),
    #[error("a VM named {0} is running; stop it with `vmrun stop {0}` or pick another --name")]
    NameInUse(String),
    #[error("no VM named {0}; `vmrun ls` lists them")]
    NoSuchVm(String),
    #[error("the VM {0} is not running (its VMM is gone); `vmrun stop {0}` removes what it left")]
    Dead(String),
    #[error("runtime directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RuntimeError + '_ {
    move |source| RuntimeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The directory all VMs live under.
pub fn runtime_dir() -> PathBuf {
    if let Some(d) = std::env::var_os(RUNTIME_ENV) {
        return PathBuf::from(d);
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return PathBuf::from("/run/vmrun");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("vmrun"),
        None => std::env::temp_dir().join(format!("vmrun-{uid}")),
    }
}

fn vms_dir() -> PathBuf {
    runtime_dir().join(VMS)
}

/// Whether `name` can name a VM (and a directory).
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= NAME_MAX
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// A name nobody has taken: two words, Docker-style.
fn generated_name() -> String {
    const A: &[&str] = &[
        "amber", "brisk", "calm", "deft", "eager", "fair", "glad", "hazy", "keen", "lucid",
        "mellow", "nimble", "quiet", "rapid", "steady", "tidy", "vivid", "witty",
    ];
    const B: &[&str] = &[
        "badger", "crane", "dingo", "egret", "finch", "gecko", "heron", "ibis", "koala", "lemur",
        "marten", "newt", "otter", "panda", "quokka", "robin", "stoat", "tapir", "wren",
    ];
    let r = random_u64();
    format!(
        "{}-{}-{:03x}",
        A[(r % A.len() as u64) as usize],
        B[((r >> 16) % B.len() as u64) as usize],
        (r >> 32) & 0xfff
    )
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_err()
    {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        return t.as_nanos() as u64 ^ u64::from(std::process::id()) << 32;
    }
    u64::from_le_bytes(b)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What a VM is, as `vmrun ls` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record {
    pub name: String,
    /// The VMM process.
    pub pid: u32,
    /// Unix seconds.
    pub created: u64,
    /// Named by the user (kept until `vmrun stop`) or a one-shot VM of a command.
    pub named: bool,
    pub overlay: String,
    pub memory_mib: u64,
    pub vcpus: u8,
    /// What lies below the upper layer: the root image, then the layer images, bottom first
    /// (`vmrun diff NAME` compares the upper with it).
    pub lower: Vec<PathBuf>,
}

impl Record {
    fn to_text(&self) -> String {
        let mut t = format!(
            "name={}\npid={}\ncreated={}\nnamed={}\noverlay={}\nmemory_mib={}\nvcpus={}\n",
            self.name,
            self.pid,
            self.created,
            self.named,
            self.overlay.replace('\n', " "),
            self.memory_mib,
            self.vcpus
        );
        // A path with a newline cannot be a line of its own: such a stack is not recorded at
        // all (a partial one would make `vmrun diff` compare with the wrong tree).
        let lines: Option<Vec<&str>> = self
            .lower
            .iter()
            .map(|l| l.to_str().filter(|s| !s.contains('\n')))
            .collect();
        for s in lines.unwrap_or_default() {
            t.push_str(&format!("lower={s}\n"));
        }
        t
    }

    /// Reads what `to_text` wrote; unknown keys and bad values are ignored (a record from
    /// another vmrun version still lists).
    fn parse(text: &str) -> Record {
        let mut r = Record::default();
        for line in text.lines() {
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            match k {
                "name" => r.name = v.into(),
                "pid" => r.pid = v.parse().unwrap_or(0),
                "created" => r.created = v.parse().unwrap_or(0),
                "named" => r.named = v == "true",
                "overlay" => r.overlay = v.into(),
                "memory_mib" => r.memory_mib = v.parse().unwrap_or(0),
                "vcpus" => r.vcpus = v.parse().unwrap_or(0),
                "lower" => r.lower.push(v.into()),
                _ => {}
            }
        }
        r
    }
}

/// The directory of one VM.
#[derive(Clone, Debug)]
pub struct VmPaths {
    pub name: String,
    pub dir: PathBuf,
}

impl VmPaths {
    fn at(name: &str) -> VmPaths {
        VmPaths {
            name: name.into(),
            dir: vms_dir().join(name),
        }
    }

    /// The VM whose directory is `dir`.
    pub fn from_dir(dir: PathBuf) -> VmPaths {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        VmPaths { name, dir }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join(SOCKET)
    }
    /// An empty directory the jailed VMM's root is mounted on (in its own mount namespace).
    pub fn jail_root(&self) -> PathBuf {
        self.dir.join("jail")
    }
    /// The VMM's control socket (snapshots).
    pub fn control(&self) -> PathBuf {
        self.dir.join(CONTROL)
    }
    pub fn upper_copy(&self) -> PathBuf {
        self.dir.join(UPPER)
    }
    /// The defaults commands get in this VM (an image's config), as JSON.
    pub fn exec_defaults(&self) -> PathBuf {
        self.dir.join("exec.json")
    }
    pub fn console(&self) -> PathBuf {
        self.dir.join(CONSOLE)
    }
    pub fn vmm_log(&self) -> PathBuf {
        self.dir.join(VMM_LOG)
    }
    pub fn lock(&self) -> PathBuf {
        self.dir.join(LOCK)
    }
    fn record_path(&self) -> PathBuf {
        self.dir.join(RECORD)
    }
    pub fn detached_mark(&self) -> PathBuf {
        self.dir.join(DETACHED)
    }

    pub fn record(&self) -> Option<Record> {
        let f = File::open(self.record_path()).ok()?;
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::Read::take(f, RECORD_MAX), &mut text).ok()?;
        Some(Record::parse(&text))
    }

    pub fn write_record(&self, r: &Record) -> Result<(), RuntimeError> {
        let tmp = self.dir.join(".vm.tmp");
        fs::write(&tmp, r.to_text()).map_err(io(&tmp))?;
        fs::rename(&tmp, self.record_path()).map_err(io(&self.dir))
    }

    /// Alive while any process holds the lock (the VMM, or its launcher while it waits).
    pub fn alive(&self) -> bool {
        let Ok(f) = File::open(self.lock()) else {
            return false;
        };
        match f.try_lock() {
            Ok(()) => {
                let _ = f.unlock();
                false
            }
            Err(_) => true,
        }
    }

    /// Notes a file outside the directory that is the VM's until it is finished.
    pub fn add_partial(&self, path: &Path) {
        if let Ok(mut f) = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(PARTIAL))
        {
            let _ = writeln!(f, "{}", path.display());
        }
    }

    /// The file is finished (or gone): it no longer belongs to the VM.
    pub fn drop_partial(&self, path: &Path) {
        let p = self.dir.join(PARTIAL);
        if let Ok(text) = fs::read_to_string(&p) {
            let keep: Vec<&str> = text.lines().filter(|l| Path::new(l) != path).collect();
            let _ = fs::write(&p, keep.join("\n"));
        }
    }

    /// Removes the directory and the unfinished files it lists. For a VM that is dead (or
    /// whose VMM the caller has just stopped).
    pub fn remove(&self) {
        if let Ok(text) = fs::read_to_string(self.dir.join(PARTIAL)) {
            for l in text.lines().filter(|l| !l.is_empty()) {
                let _ = fs::remove_file(l);
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
        // The cgroup of a VM whose supervisor was killed outright.
        crate::jail::remove_stale_cgroup(&self.name);
    }
}

/// A VM's directory, claimed by this process: the lock is held (shared) while this lives.
/// Pass [`Claim::lock_file`] on to the VMM (it inherits the lock) before dropping this.
#[derive(Debug)]
pub struct Claim {
    pub paths: VmPaths,
    lock: File,
}

impl Claim {
    /// Makes the directory of a new VM: `name`, or a generated one. A dead VM of that name is
    /// cleared away first.
    pub fn new(name: Option<&str>) -> Result<Claim, RuntimeError> {
        if let Some(n) = name {
            if !valid_name(n) {
                return Err(RuntimeError::BadName(n.into()));
            }
        }
        let vms = vms_dir();
        fs::create_dir_all(&vms).map_err(io(&vms))?;
        sweep();
        for _ in 0..16 {
            let n = name.map_or_else(generated_name, str::to_string);
            let tmp = vms.join(format!(".claim-{}-{:x}", std::process::id(), random_u64()));
            fs::create_dir(&tmp).map_err(io(&tmp))?;
            let lock_path = tmp.join(LOCK);
            let lock = File::create(&lock_path).map_err(io(&lock_path))?;
            lock.lock_shared().map_err(io(&lock_path))?;
            let paths = VmPaths::at(&n);
            if let Some(existing) = (paths.dir.exists()).then(|| paths.clone()) {
                if !existing.alive() {
                    existing.remove();
                }
            }
            match fs::rename(&tmp, &paths.dir) {
                Ok(()) => return Ok(Claim { paths, lock }),
                Err(_) => {
                    let _ = fs::remove_dir_all(&tmp);
                    if name.is_some() {
                        return Err(RuntimeError::NameInUse(n));
                    }
                }
            }
        }
        Err(RuntimeError::NameInUse(
            "(no free generated name)".to_string(),
        ))
    }

    /// The lock, for the VMM to inherit.
    pub fn lock_file(&self) -> &File {
        &self.lock
    }
}

/// A VM found by name.
pub fn find(name: &str) -> Result<VmPaths, RuntimeError> {
    if !valid_name(name) {
        return Err(RuntimeError::BadName(name.into()));
    }
    let p = VmPaths::at(name);
    if !p.dir.is_dir() {
        return Err(RuntimeError::NoSuchVm(name.into()));
    }
    Ok(p)
}

/// Every VM directory, with whether it is alive; oldest first.
pub fn list() -> Vec<(VmPaths, Option<Record>, bool)> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(vms_dir()) else {
        return out;
    };
    for e in rd.flatten() {
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if !valid_name(&name) || !e.path().is_dir() {
            continue;
        }
        let p = VmPaths::at(&name);
        let rec = p.record();
        let alive = p.alive();
        out.push((p, rec, alive));
    }
    out.sort_by_key(|(p, r, _)| (r.as_ref().map_or(0, |r| r.created), p.name.clone()));
    out
}

/// Clears what launchers that died left: dead one-shot VMs and old unfinished claims. Dead
/// named VMs stay, for `vmrun ls` to show, until `vmrun stop`.
pub fn sweep() {
    let vms = vms_dir();
    let Ok(rd) = fs::read_dir(&vms) else { return };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        if name.starts_with(".claim-") {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > STALE_CLAIM);
            if old {
                let _ = fs::remove_dir_all(&path);
            }
            continue;
        }
        if !valid_name(&name) {
            continue;
        }
        let p = VmPaths::at(&name);
        if p.alive() {
            continue;
        }
        if p.record().is_none_or(|r| !r.named) {
            p.remove();
        }
    }
    // Cgroups of VMs killed with their supervisor, whose directories went meanwhile.
    for name in crate::jail::cgroup_names() {
        if !VmPaths::at(&name).alive() {
            crate::jail::remove_stale_cgroup(&name);
        }
    }
}

impl Record {
    /// A new record for a VM this process is starting.
    pub fn new(name: &str, named: bool, overlay: String, memory_mib: u64, vcpus: u8) -> Record {
        Record {
            name: name.into(),
            pid: 0,
            created: now_secs(),
            named,
            overlay,
            memory_mib,
            vcpus,
            lower: vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tests that change `VMRUN_RUNTIME_DIR` run one at a time.
    static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn with_runtime<T>(f: impl FnOnce(&Path) -> T) -> T {
        let _g = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let d = tempfile::tempdir().unwrap();
        // The ENV mutex keeps this module's other tests from reading it meanwhile; nothing
        // else in this crate's tests reads this variable.
        std::env::set_var(RUNTIME_ENV, d.path());
        let r = f(d.path());
        std::env::remove_var(RUNTIME_ENV);
        r
    }

    #[test]
    fn names_are_checked() {
        for ok in ["a", "web-1", "x.y_z", &"n".repeat(NAME_MAX)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            "-a",
            ".hidden",
            "a/b",
            "a b",
            "ü",
            &"n".repeat(NAME_MAX + 1),
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert!(valid_name(&generated_name()));
    }

    #[test]
    fn records_round_trip_and_tolerate_junk() {
        let r = Record {
            name: "box".into(),
            pid: 42,
            created: 1_700_000_000,
            named: true,
            overlay: "tmpfs 256M".into(),
            memory_mib: 512,
            vcpus: 2,
            lower: vec!["/c/rootfs.ext4".into(), "/c/layers/ab.erofs".into()],
        };
        assert_eq!(Record::parse(&r.to_text()), r);
        let junk = Record::parse("pid=notanumber\n\u{0}\nnamed=yes\nother=1\n");
        assert_eq!((junk.pid, junk.named), (0, false));
    }

    #[test]
    fn a_claim_is_alive_while_locked_and_a_name_is_taken_once() {
        with_runtime(|_| {
            let a = Claim::new(Some("box")).unwrap();
            assert!(a.paths.alive());
            assert!(matches!(
                Claim::new(Some("box")),
                Err(RuntimeError::NameInUse(_))
            ));
            assert!(matches!(
                Claim::new(Some("b/x")),
                Err(RuntimeError::BadName(_))
            ));
            let paths = a.paths.clone();
            drop(a);
            assert!(!paths.alive(), "no holder left: dead");
            // A dead VM's name can be taken again (its leftovers go first).
            std::fs::write(paths.console(), "old").unwrap();
            let b = Claim::new(Some("box")).unwrap();
            assert!(!b.paths.console().exists());
        });
    }

    #[test]
    fn sweep_clears_dead_one_shots_but_keeps_dead_named_vms() {
        with_runtime(|_| {
            let one = Claim::new(None).unwrap();
            one.paths
                .write_record(&Record::new(&one.paths.name, false, "tmpfs".into(), 64, 1))
                .unwrap();
            let partial = tempfile::NamedTempFile::new().unwrap().into_temp_path();
            let partial_path = partial.to_path_buf();
            partial.keep().unwrap();
            one.paths.add_partial(&partial_path);
            let named = Claim::new(Some("keep")).unwrap();
            named
                .paths
                .write_record(&Record::new("keep", true, "none".into(), 64, 1))
                .unwrap();
            let (p1, p2) = (one.paths.clone(), named.paths.clone());
            drop(one);
            drop(named);
            sweep();
            assert!(!p1.dir.exists(), "dead one-shot swept");
            assert!(!partial_path.exists(), "its unfinished capture too");
            assert!(p2.dir.exists(), "a dead named VM stays for ls");
            let l = list();
            assert_eq!(l.len(), 1);
            assert!(!l[0].2);
            assert!(matches!(find("nope"), Err(RuntimeError::NoSuchVm(_))));
            p2.remove();
            assert!(list().is_empty());
        });
    }
}
