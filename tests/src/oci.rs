//! Container images made on the host for the tests (no registry is reachable): an OCI image
//! layout written from tars built here, and a small runnable image around the host's static
//! BusyBox, with a second layer that deletes (an OCI whiteout) and hides (an opaque
//! directory) what the first holds.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// One entry of a layer.
pub enum Entry<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8], u32),
    Symlink(&'a str, &'a str),
}

/// A tar of `entries`, owned by root, with a fixed mtime.
pub fn layer_tar(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_ustar();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        match e {
            Entry::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, p, std::io::empty()).unwrap();
            }
            Entry::File(p, data, mode) => {
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, *data).unwrap();
            }
            Entry::Symlink(p, to) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, p, to).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

fn hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn descriptor(media: &str, blob: &[u8]) -> String {
    format!(
        r#"{{"mediaType":"{media}","digest":"sha256:{}","size":{}}}"#,
        hex(blob),
        blob.len()
    )
}

/// Writes an OCI image layout into the directory `dir`: `layers` (tar, gzip it?) bottom
/// first, `run` the config's `config` object (JSON), `reference` its ref name annotation.
pub fn write_layout(dir: &Path, layers: &[(Vec<u8>, bool)], run: &str, reference: &str) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |b: &[u8]| std::fs::write(blobs.join(hex(b)), b).unwrap();
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for (tar, gz) in layers {
        diff_ids.push(format!("\"sha256:{}\"", hex(tar)));
        let (blob, media) = if *gz {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(tar).unwrap();
            (
                e.finish().unwrap(),
                "application/vnd.oci.image.layer.v1.tar+gzip",
            )
        } else {
            (tar.clone(), "application/vnd.oci.image.layer.v1.tar")
        };
        put(&blob);
        descs.push(descriptor(media, &blob));
    }
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{run},"rootfs":{{"type":"layers","diff_ids":[{}]}}}}"#,
        diff_ids.join(",")
    );
    put(config.as_bytes());
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[{}]}}"#,
        descriptor(
            "application/vnd.oci.image.config.v1+json",
            config.as_bytes()
        ),
        descs.join(",")
    );
    put(manifest.as_bytes());
    let mut m = descriptor(
        "application/vnd.oci.image.manifest.v1+json",
        manifest.as_bytes(),
    );
    m.pop();
    // containerd's full name, and the OCI tag annotation (the tag alone, by the spec).
    let tag = reference.rsplit(':').next().unwrap_or(reference);
    m.push_str(&format!(
        r#","annotations":{{"io.containerd.image.name":"{reference}","org.opencontainers.image.ref.name":"{tag}"}}}}"#
    ));
    std::fs::write(
        dir.join("index.json"),
        format!(r#"{{"schemaVersion":2,"manifests":[{m}]}}"#),
    )
    .unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

/// BusyBox applets the image links (what the tests run).
const APPLETS: &[&str] = &[
    "sh", "env", "id", "pwd", "cat", "ls", "echo", "test", "mkdir", "rm", "sync", "sleep", "uname",
    "grep", "nproc", "stty",
];

/// What the BusyBox image's entrypoint prints: its env, working directory and user.
pub const HELLO: &str =
    "#!/bin/sh\necho \"hello from $GREETING in $(pwd) as $(id -u):$(id -g) $*\"\n";

/// An OCI layout tar at `dir/busybox-oci.tar` of a runnable image: layer 1 holds the host's
/// static BusyBox, its applets, users and `/etc/motd` and `/srv/old`; layer 2 (gzip) adds
/// `/app/hello.sh` (the entrypoint, given `world` as its command), deletes `/etc/motd` and
/// makes `/srv` opaque with `/srv/new` in it. Its env sets `GREETING=oci` and a PATH, its
/// working directory is `/app` and its user `app` (1000:1000). `None`: no static BusyBox here.
pub fn busybox_image(dir: &Path) -> Option<PathBuf> {
    let bb = Path::new("/bin/busybox");
    let static_ok = std::process::Command::new("file")
        .arg("-L")
        .arg(bb)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("statically linked"))
        // Without `file`, trust the Debian package (busybox-static installs /bin/busybox).
        .unwrap_or(true);
    if !bb.is_file() || !static_ok {
        return None;
    }
    let busybox = std::fs::read(bb).ok()?;
    let mut l1 = vec![
        Entry::Dir("bin"),
        Entry::File("bin/busybox", &busybox, 0o755),
        Entry::Dir("etc"),
        Entry::File(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
            0o644,
        ),
        Entry::File("etc/group", b"root:x:0:\napp:x:1000:\n", 0o644),
        Entry::File("etc/motd", b"from layer 1\n", 0o644),
        Entry::Dir("srv"),
        Entry::File("srv/old", b"old\n", 0o644),
        Entry::Dir("root"),
    ];
    let links: Vec<String> = APPLETS.iter().map(|a| format!("bin/{a}")).collect();
    for l in &links {
        l1.push(Entry::Symlink(l, "busybox"));
    }
    let l2 = layer_tar(&[
        Entry::Dir("app"),
        Entry::File("app/hello.sh", HELLO.as_bytes(), 0o755),
        Entry::File("etc/.wh.motd", b"", 0o644),
        Entry::Dir("srv"),
        Entry::File("srv/.wh..wh..opq", b"", 0o644),
        Entry::File("srv/new", b"new\n", 0o644),
    ]);
    let layout = dir.join("busybox-layout");
    write_layout(
        &layout,
        &[(layer_tar(&l1), false), (l2, true)],
        r#"{"Env":["PATH=/app:/bin","GREETING=oci"],"Entrypoint":["/app/hello.sh"],"Cmd":["world"],"WorkingDir":"/app","User":"app"}"#,
        "example.test/tests/busybox:1",
    );
    let out = dir.join("busybox-oci.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&out).ok()?);
    b.append_dir_all(".", &layout).ok()?;
    b.into_inner().ok()?.flush().ok()?;
    Some(out)
}
