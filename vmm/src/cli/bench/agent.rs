//! The agent over its host transport (a Unix socket, `vmrun-agent --unix`): the same code that
//! serves a VM, with the guest kernel and vsock taken out. Capture is timed beside GNU tar on
//! the same tree in the same run.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmrun_protocol::agent::Exec;

use super::table::{mib_per_s, BenchError, Goal, Row, Scale};
use vmrun::api::agent::{AgentClient, Endpoint};

const MIB: u64 = 1 << 20;

pub fn rows(scale: Scale) -> Vec<Row> {
    match Harness::start() {
        Ok(h) => h.rows(scale),
        Err(e) => {
            vec![Row::new("agent over the host transport", "", Goal::None).absent(e.to_string())]
        }
    }
}

/// The agent binary: `VMRUN_AGENT_BIN`, beside this program, or taken out of the default
/// initramfs (where `vmrun images build` put it: its `/init` is the agent too when run under
/// the name `vmrun-agent`).
fn agent_binary(scratch: &Path) -> Result<PathBuf, BenchError> {
    if let Some(p) = std::env::var_os("VMRUN_AGENT_BIN") {
        return Ok(p.into());
    }
    if let Some(p) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("vmrun-agent")))
        .filter(|p| p.is_file())
    {
        return Ok(p);
    }
    let initramfs = vmrun::launch::images::default_initramfs();
    let cpio = std::fs::read(&initramfs).map_err(|e| {
        BenchError::Setup(format!(
            "no vmrun-agent binary: set VMRUN_AGENT_BIN, build it beside vmrun (cargo build --release -p vmrun-agent), or build the images (vmrun images build); reading {}: {e}",
            initramfs.display()
        ))
    })?;
    let body = cpio_file(&cpio, "init")
        .ok_or_else(|| BenchError::Setup(format!("{} holds no /init", initramfs.display())))?;
    let path = scratch.join("vmrun-agent");
    std::fs::write(&path, body).map_err(BenchError::io("write the agent binary"))?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .map_err(BenchError::io("make the agent executable"))?;
    Ok(path)
}

/// A file's contents from a newc cpio archive; `None` when absent or the archive is malformed.
fn cpio_file<'a>(cpio: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let hex = |b: &[u8]| -> Option<usize> {
        usize::from_str_radix(std::str::from_utf8(b).ok()?, 16).ok()
    };
    let align = |x: usize| (x + 3) & !3;
    let mut off: usize = 0;
    while off.checked_add(110)? <= cpio.len() {
        let h = &cpio[off..off + 110];
        if &h[..6] != b"070701" {
            return None;
        }
        let size = hex(&h[54..62])?;
        let namesize = hex(&h[94..102])?;
        let name_start = off + 110;
        let name_end = name_start.checked_add(namesize)?;
        let entry = cpio.get(name_start..name_end.checked_sub(1)?)?;
        let data_start = align(name_end);
        let data_end = data_start.checked_add(size)?;
        if entry == b"TRAILER!!!" {
            return None;
        }
        let entry = entry.strip_prefix(b"./").unwrap_or(entry);
        if entry == name.as_bytes() {
            return cpio.get(data_start..data_end);
        }
        off = align(data_end);
    }
    None
}

/// An agent serving a scratch directory on a Unix socket, killed on drop.
struct Harness {
    child: Child,
    client: AgentClient,
    dir: tempfile::TempDir,
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where the files go: a tmpfs when there is one, so the figures are the transport's and not
/// a disk's (the upper layer in a VM is a tmpfs by default too).
fn scratch_parent() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.into()
    } else {
        std::env::temp_dir()
    }
}

impl Harness {
    fn start() -> Result<Harness, BenchError> {
        let dir = tempfile::Builder::new()
            .prefix("vmrun-bench-")
            .tempdir_in(scratch_parent())
            .map_err(BenchError::io("scratch directory"))?;
        let bin = agent_binary(dir.path())?;
        let sock = dir.path().join("agent.sock");
        let upper = dir.path().join("upper");
        std::fs::create_dir(&upper).map_err(BenchError::io("upper directory"))?;
        let child = Command::new(&bin)
            .arg("--unix")
            .arg(&sock)
            .args(["--root", "/", "--upper"])
            .arg(&upper)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(BenchError::io(format!("start {}", bin.display())))?;
        let client = AgentClient::new(Endpoint::Unix(sock));
        let h = Harness { child, client, dir };
        let t = Instant::now();
        while h.client.stat("/").is_err() {
            if t.elapsed() > Duration::from_secs(10) {
                return Err(BenchError::Setup(format!(
                    "{} did not answer on its socket within 10 s",
                    bin.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(h)
    }

    fn path(&self, rel: &str) -> String {
        self.dir.path().join(rel).to_string_lossy().into_owned()
    }

    fn rows(&self, scale: Scale) -> Vec<Row> {
        let mut rows = vec![self.exec_rtt(scale), spawn_floor(scale)];
        let big = if scale.quick { 128 * MIB } else { 1024 * MIB };
        let big_name = format!("{} MiB", big / MIB);
        rows.extend(self.transfer("1 MiB", MIB, scale.reps(200, 30)));
        rows.extend(self.transfer(&big_name, big, scale.reps(5, 2)));
        rows.push(self.write_floor(big, &big_name, scale.reps(5, 2)));
        rows.extend(self.capture_small(scale));
        rows.extend(self.capture_big(big, &big_name, scale));
        rows
    }

    fn exec_rtt(&self, scale: Scale) -> Row {
        let row = Row::new("agent exec `true` round trip", "µs", Goal::AtMost(100.0));
        let x = Exec {
            argv: vec!["/bin/true".into()],
            ..Exec::default()
        };
        let n = scale.reps(2000, 200);
        let mut v = Vec::with_capacity(n);
        for i in 0..n + n / 10 {
            let t = Instant::now();
            match self.client.exec(x.clone(), None) {
                Ok(o) if o.status == vmrun_protocol::agent::ExitStatus::Exited(0) => {}
                Ok(o) => return row.absent(format!("`true` ended with {:?}", o.status)),
                Err(e) => return row.absent(format!("exec failed: {e}")),
            }
            // The first tenth warms caches and is not counted.
            if i >= n / 10 {
                v.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        row.samples(&v)
    }

    /// What an upload cannot beat here: writing a new file of `size` bytes in the same
    /// filesystem from memory (fresh pages are allocated and zeroed by the kernel).
    fn write_floor(&self, size: u64, label: &str, n: usize) -> Row {
        let row = Row::new(
            format!("floor: write a new {label} file"),
            "MiB/s",
            Goal::None,
        );
        let path = self.dir.path().join("floor");
        let buf = vec![0xa5u8; 256 << 10];
        let mut v = Vec::new();
        for _ in 0..n {
            let _ = std::fs::remove_file(&path);
            let t = Instant::now();
            let r = std::fs::File::create(&path).and_then(|mut f| {
                let mut left = size;
                while left > 0 {
                    let k = left.min(buf.len() as u64) as usize;
                    f.write_all(&buf[..k])?;
                    left -= k as u64;
                }
                Ok(())
            });
            if let Err(e) = r {
                return row.absent(e.to_string());
            }
            v.push(mib_per_s(size, t.elapsed()));
        }
        let _ = std::fs::remove_file(&path);
        row.samples(&v)
    }

    fn transfer(&self, label: &str, size: u64, n: usize) -> Vec<Row> {
        let up = Row::new(
            format!("agent upload {label}"),
            "MiB/s",
            Goal::AtLeast(2048.0),
        );
        let down = Row::new(format!("agent download {label}"), "MiB/s", Goal::None);
        let guest_path = self.path(&format!("xfer-{}", size / MIB));
        let (mut ups, mut downs) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let t = Instant::now();
            match self.client.upload(
                &guest_path,
                0o644,
                false,
                false,
                io::repeat(0xa5).take(size),
            ) {
                Ok(n) if n == size => ups.push(mib_per_s(size, t.elapsed())),
                Ok(n) => return vec![up.absent(format!("uploaded {n} of {size} bytes")), down],
                Err(e) => return vec![up.absent(format!("upload failed: {e}")), down],
            }
            let t = Instant::now();
            match self.client.download(&guest_path, io::sink()) {
                Ok((n, _)) if n == size => downs.push(mib_per_s(size, t.elapsed())),
                Ok((n, _)) => {
                    return vec![
                        up.samples(&ups),
                        down.absent(format!("downloaded {n} of {size} bytes")),
                    ]
                }
                Err(e) => {
                    return vec![
                        up.samples(&ups),
                        down.absent(format!("download failed: {e}")),
                    ]
                }
            }
        }
        let _ = std::fs::remove_file(&guest_path);
        vec![up.samples(&ups), down.samples(&downs)]
    }

    fn upper(&self) -> PathBuf {
        self.dir.path().join("upper")
    }

    /// Capture and GNU tar on the tree now in the upper directory, `n` times each,
    /// interleaved; rates are over `data` bytes (file contents).
    fn race_tar(&self, label: &str, data: u64, n: usize) -> Vec<Row> {
        let ours = Row::new(format!("capture {label}"), "MiB/s", Goal::None);
        let tar = Row::new(format!("GNU tar {label}"), "MiB/s", Goal::None);
        let ratio = Row::new(
            format!("capture ÷ GNU tar, {label}"),
            "×",
            Goal::AtLeast(1.0),
        );
        let (mut a, mut b, mut r) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..n {
            let t = Instant::now();
            if let Err(e) = self.client.capture(io::sink()) {
                return vec![ours.absent(format!("capture failed: {e}")), tar, ratio];
            }
            let ours_s = t.elapsed();
            let t = Instant::now();
            if let Err(e) = gnu_tar(&self.upper()) {
                return vec![ours, tar.absent(e.to_string()), ratio];
            }
            let tar_s = t.elapsed();
            a.push(mib_per_s(data, ours_s));
            b.push(mib_per_s(data, tar_s));
            r.push(tar_s.as_secs_f64() / ours_s.as_secs_f64().max(1e-9));
        }
        vec![ours.samples(&a), tar.samples(&b), ratio.samples(&r)]
    }

    fn capture_small(&self, scale: Scale) -> Vec<Row> {
        let files = 10_000;
        let size = 1024;
        let upper = self.upper();
        let made = (|| -> io::Result<()> {
            for d in 0..100 {
                let dir = upper.join(format!("d{d:03}"));
                std::fs::create_dir_all(&dir)?;
                for f in 0..files / 100 {
                    std::fs::write(dir.join(format!("f{f:03}")), [d as u8; 1024])?;
                }
            }
            Ok(())
        })();
        let rows = match made {
            Ok(()) => self.race_tar("10 000 × 1 KiB", files * size, scale.reps(20, 5)),
            Err(e) => vec![Row::new("capture 10 000 files", "", Goal::None)
                .absent(format!("cannot make the tree: {e}"))],
        };
        let _ = clear_dir(&upper);
        rows
    }

    fn capture_big(&self, size: u64, label: &str, scale: Scale) -> Vec<Row> {
        let upper = self.upper();
        let made = std::fs::File::create(upper.join("big"))
            .and_then(|mut f| io::copy(&mut io::repeat(0x5a).take(size), &mut f).map(drop));
        let rows = match made {
            Ok(()) => self.race_tar(&format!("one {label} file"), size, scale.reps(5, 2)),
            Err(e) => vec![
                Row::new(format!("capture one {label} file"), "", Goal::None)
                    .absent(format!("cannot make the file: {e}")),
            ],
        };
        let _ = clear_dir(&upper);
        rows
    }
}

/// What an exec cannot beat here: starting `/bin/true` and waiting for it, from this process
/// with posix_spawn (the agent's own path for a plain command).
fn spawn_floor(scale: Scale) -> Row {
    let row = Row::new("floor: posix_spawn `true` + wait", "µs", Goal::None);
    let n = scale.reps(2000, 200);
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        match Command::new("/bin/true").status() {
            Ok(s) if s.success() => v.push(t.elapsed().as_secs_f64() * 1e6),
            Ok(s) => return row.absent(format!("/bin/true ended with {s}")),
            Err(e) => return row.absent(format!("cannot run /bin/true: {e}")),
        }
    }
    row.samples(&v)
}

fn clear_dir(dir: &Path) -> io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            std::fs::remove_dir_all(&p)?;
        } else {
            std::fs::remove_file(&p)?;
        }
    }
    Ok(())
}

/// `tar -cf - -C dir .` read to its end through a pipe, as a client would (GNU tar skips
/// reading file contents when its archive is /dev/null, so that would not be a fair race).
fn gnu_tar(dir: &Path) -> Result<u64, BenchError> {
    let mut child = Command::new("tar")
        .args(["--xattrs", "-cf", "-", "-C"])
        .arg(dir)
        .arg(".")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(BenchError::io("run GNU tar"))?;
    let mut out = child
        .stdout
        .take()
        .ok_or_else(|| BenchError::Setup("no pipe from tar".into()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        match out.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(BenchError::io("read from tar")(e)),
        }
    }
    let st = child.wait().map_err(BenchError::io("wait for tar"))?;
    if !st.success() {
        return Err(BenchError::Setup(format!("GNU tar failed: {st}")));
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn newc(name: &str, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        let namesize = name.len() + 1;
        let hdr =
            format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            1, 0o100755, 0, 0, 1, 0, body.len(), 0, 0, 0, 0, namesize, 0
        );
        v.extend_from_slice(hdr.as_bytes());
        v.extend_from_slice(name.as_bytes());
        v.push(0);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v.extend_from_slice(body);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    #[test]
    fn cpio_lookup() {
        let mut a = newc("init", b"first");
        a.extend(newc("vmrun-agent", b"the agent"));
        a.extend(newc("TRAILER!!!", b""));
        assert_eq!(cpio_file(&a, "vmrun-agent"), Some(&b"the agent"[..]));
        assert_eq!(cpio_file(&a, "init"), Some(&b"first"[..]));
        assert_eq!(cpio_file(&a, "nope"), None);
        // Truncated or garbage archives are a miss, never a panic.
        for cut in 0..a.len() {
            let _ = cpio_file(&a[..cut], "vmrun-agent");
        }
        assert_eq!(cpio_file(b"garbage", "x"), None);
    }
}
