//! Layers: a capture tar turned into a layer image (time and size, on the host), and what each
//! stacked layer adds to a boot (in a VM: only where guest ring 0 runs at speed, unless asked).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::table::{Goal, Row, Scale};
use vmrun::api::vm::{Overlay, Vm};
use vmrun::launch::layers;

/// A capture-like tar of about `mib` MiB: 256 KiB files of varied bytes in 16 directories, a
/// whiteout and an opaque directory.
fn capture_tar(path: &Path, mib: usize, seed: u64) -> std::io::Result<()> {
    let mut b = tar::Builder::new(std::io::BufWriter::new(std::fs::File::create(path)?));
    let mut x = seed | 1;
    let header = |ty: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(ty);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(size);
        h
    };
    let mut dir = header(tar::EntryType::Directory, 0o755, 0);
    b.append_data(&mut dir, "d", std::io::empty())?;
    let mut buf = vec![0u8; 256 << 10];
    for i in 0..mib * 4 {
        if i % 64 == 0 {
            let mut d = header(tar::EntryType::Directory, 0o755, 0);
            b.append_data(&mut d, format!("d/{}", i / 64), std::io::empty())?;
        }
        for chunk in buf.chunks_mut(8) {
            // xorshift64: bytes that neither compress nor deduplicate.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        let mut h = header(tar::EntryType::Regular, 0o644, buf.len() as u64);
        b.append_data(&mut h, format!("d/{}/f{i}", i / 64), buf.as_slice())?;
    }
    let mut wh = header(tar::EntryType::Char, 0o600, 0);
    b.append_data(&mut wh, "etc/issue", std::io::empty())?;
    b.into_inner()?.flush()
}

pub fn rows(scale: Scale, at_speed: bool, forced: bool) -> Vec<Row> {
    let mib = if scale.quick { 16 } else { 100 };
    let build = Row::new(
        format!("capture tar ({mib} MiB) → layer image"),
        "ms",
        Goal::None,
    );
    let size = Row::new(
        format!("layer image of the {mib} MiB tar"),
        "MiB",
        Goal::None,
    );
    let label = if at_speed { "" } else { " [ring 0 emulated]" };
    let boots: Vec<Row> = [0usize, 1, 4]
        .iter()
        .map(|n| {
            Row::new(
                format!("guest boot → agent ready, {n} layers{label}"),
                "ms",
                Goal::None,
            )
        })
        .collect();
    let Ok(work) = tempfile::Builder::new().prefix("vmrun-bench-").tempdir() else {
        return vec![build.absent("no temp dir"), size.absent("no temp dir")];
    };
    let tar = work.path().join("capture.tar");
    if let Err(e) = capture_tar(&tar, mib, 7) {
        return vec![build.absent(e.to_string()), size.absent(e.to_string())];
    }
    let mut ms = Vec::new();
    let mut sizes = Vec::new();
    for rep in 0..scale.reps(3, 1) {
        let cache = work.path().join(format!("cache{rep}"));
        let t = Instant::now();
        match layers::image_for(&tar, &cache) {
            Ok(img) => {
                ms.push(t.elapsed().as_secs_f64() * 1e3);
                let len = std::fs::metadata(&img).map_or(0, |m| m.len());
                sizes.push(len as f64 / f64::from(1 << 20));
            }
            Err(e) => return vec![build.absent(e.to_string()), size.absent(e.to_string())],
        }
        let _ = std::fs::remove_dir_all(&cache);
    }
    let mut out = vec![build.samples(&ms), size.samples(&sizes)];
    if !at_speed && !forced {
        let why = "guest ring 0 is emulated on this host (nested PVM): figures would time the \
                   emulator; --guest measures anyway";
        out.extend(boots.into_iter().map(|r| r.absent(why)));
        return out;
    }
    // Small layers (1 MiB each), built before timing; boots alternate between stack depths.
    let mut small: Vec<PathBuf> = Vec::new();
    for i in 0..4 {
        let t = work.path().join(format!("small{i}.tar"));
        let cache = work.path().join("small-cache");
        match capture_tar(&t, 1, 11 + 2 * i)
            .map_err(|e| e.to_string())
            .and_then(|_| layers::image_for(&t, &cache).map_err(|e| e.to_string()))
        {
            Ok(img) => small.push(img),
            Err(e) => {
                out.extend(boots.into_iter().map(|r| r.absent(e.clone())));
                return out;
            }
        }
    }
    let depths = [0usize, 1, 4];
    let mut samples = vec![Vec::new(); depths.len()];
    let mut failed: Vec<Option<String>> = vec![None; depths.len()];
    for _ in 0..scale.reps(3, 1) {
        for (k, n) in depths.iter().enumerate() {
            if failed[k].is_some() {
                continue;
            }
            let mut b = Vm::builder().overlay(Overlay::Tmpfs { size: None });
            for l in &small[..*n] {
                b = b.layer(l);
            }
            let t = Instant::now();
            match b.start() {
                Ok(vm) => {
                    samples[k].push(t.elapsed().as_secs_f64() * 1e3);
                    let _ = vm.shutdown();
                }
                Err(e) => failed[k] = Some(e.to_string()),
            }
        }
    }
    out.extend(
        boots
            .into_iter()
            .zip(samples.iter().zip(failed))
            .map(|(r, (s, f))| match f {
                Some(e) => r.absent(e),
                None => r.samples(s),
            }),
    );
    out
}
