//! Container images as a base: an OCI image layout (a directory, or a tar of one) or a
//! `docker save` archive is read in place (a tar's files at their offsets, never extracted
//! whole), its manifest and config checked against their digests, and its layers applied in
//! order onto one tree (OCI whiteouts and opaque directories take effect), which the caller
//! packs into the image's root filesystem. Every JSON document is size-bounded before it is
//! parsed, every blob is hashed as it is read, and every layer goes through vmrun's own
//! bounded tar reader ([`super::tarball`]).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use thiserror::Error;

use super::layers::{self, hex, Step, Whiteouts};
use super::tarball::{self, Kind, Limits, TarError};
use super::ExecDefaults;

/// The largest index, manifest or config read (they are small JSON documents).
const MAX_JSON: u64 = 4 << 20;
/// Layers one image may have (Docker's own limit is 127 on overlayfs).
const MAX_IMAGE_LAYERS: usize = 128;
/// Nested indexes followed before giving up.
const MAX_INDEX_DEPTH: usize = 4;
/// Bytes after a layer's end-of-archive mark that are read (and hashed) before giving up.
const MAX_TRAILER: u64 = 64 << 20;

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

#[derive(Debug, Error)]
pub enum OciError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0}: a compressed archive; decompress it first (gunzip, zstd -d): vmrun reads an uncompressed `docker save` tar or OCI layout")]
    Compressed(PathBuf),
    #[error("{0}: neither an OCI image layout (no oci-layout and index.json) nor a `docker save` archive (no manifest.json)")]
    Unknown(PathBuf),
    #[error("{archive}: cannot read the archive: {source}")]
    Archive {
        archive: PathBuf,
        #[source]
        source: TarError,
    },
    #[error("{archive}: {file} is missing from the archive")]
    Missing { archive: PathBuf, file: String },
    #[error("{archive}: {file}: {why}")]
    Bad {
        archive: PathBuf,
        file: String,
        why: String,
    },
    #[error("{archive} holds {} images ({}); pick one with --ref", .refs.len(), .refs.join(", "))]
    Ambiguous { archive: PathBuf, refs: Vec<String> },
    #[error("{archive} has no image {want:?} (it has: {})", .refs.join(", "))]
    NoSuchRef {
        archive: PathBuf,
        want: String,
        refs: Vec<String>,
    },
    #[error("{archive}: the image is for {os}/{arch}; vmrun runs linux/amd64 guests")]
    Platform {
        archive: PathBuf,
        os: String,
        arch: String,
    },
    #[error("{archive}: layer {index} ({digest}): {source}")]
    Layer {
        archive: PathBuf,
        index: usize,
        digest: String,
        #[source]
        source: Step,
    },
    #[error("{archive}: layer {index} ({digest}) is zstd-compressed; vmrun reads uncompressed and gzip layers (re-export it with gzip, e.g. `skopeo copy --dest-compress-format gzip`)")]
    Zstd {
        archive: PathBuf,
        index: usize,
        digest: String,
    },
    #[error("{archive}: user {user:?} of the image config: {why}")]
    User {
        archive: PathBuf,
        user: String,
        why: String,
    },
}

/// What one archive entry is.
#[derive(Clone, Debug)]
enum Entry {
    File { offset: u64, size: u64 },
    Link(PathBuf),
}

/// Where the archive's files are.
enum Source {
    Dir(PathBuf),
    Tar {
        file: PathBuf,
        index: HashMap<PathBuf, Entry>,
    },
}

/// The archive being imported.
struct Archive {
    path: PathBuf,
    source: Source,
}

/// A `/`-separated path inside the archive made relative and free of `..`, or refused.
fn inner(raw: &str) -> Option<PathBuf> {
    let p = tarball::safe_path(raw.as_bytes(), &Limits::default()).ok()?;
    (!p.as_os_str().is_empty()).then_some(p)
}

/// `dir/link` made lexical (a symlink's target inside the archive), or `None` when it leaves.
fn join_lexical(dir: &Path, link: &Path) -> Option<PathBuf> {
    let mut out = if link.is_absolute() {
        PathBuf::new()
    } else {
        dir.to_path_buf()
    };
    for c in link.components() {
        match c {
            std::path::Component::Normal(n) => out.push(n),
            // Leaving the archive's root is refused.
            std::path::Component::ParentDir => out.pop().then_some(())?,
            _ => {}
        }
    }
    Some(out)
}

impl Archive {
    fn open(path: &Path) -> Result<Archive, OciError> {
        let io_err = |source| OciError::Io {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io_err)?;
        if meta.is_dir() {
            return Ok(Archive {
                path: path.to_path_buf(),
                source: Source::Dir(path.to_path_buf()),
            });
        }
        let mut f = File::open(path).map_err(io_err)?;
        let mut magic = [0u8; 4];
        let n = f.read(&mut magic).map_err(io_err)?;
        if magic[..n].starts_with(GZIP_MAGIC) || magic[..n].starts_with(ZSTD_MAGIC) {
            return Err(OciError::Compressed(path.to_path_buf()));
        }
        f.seek(SeekFrom::Start(0)).map_err(io_err)?;
        let mut index = HashMap::new();
        tarball::for_each(BufReader::new(f), &Limits::default(), |item, _| {
            match item.kind {
                Kind::File { size } => {
                    index.insert(
                        item.path,
                        Entry::File {
                            offset: item.offset,
                            size,
                        },
                    );
                }
                Kind::Symlink(t) => {
                    use std::os::unix::ffi::OsStrExt;
                    let dir = item.path.parent().unwrap_or(Path::new("")).to_path_buf();
                    if let Some(to) = join_lexical(&dir, Path::new(std::ffi::OsStr::from_bytes(&t)))
                    {
                        index.insert(item.path, Entry::Link(to));
                    }
                }
                Kind::HardLink(to) => {
                    index.insert(item.path, Entry::Link(to));
                }
                _ => {}
            }
            Ok::<(), TarError>(())
        })
        .map_err(|source| OciError::Archive {
            archive: path.to_path_buf(),
            source,
        })?;
        Ok(Archive {
            path: path.to_path_buf(),
            source: Source::Tar {
                file: path.to_path_buf(),
                index,
            },
        })
    }

    fn missing(&self, file: &Path) -> OciError {
        OciError::Missing {
            archive: self.path.clone(),
            file: file.display().to_string(),
        }
    }

    fn bad(&self, file: impl std::fmt::Display, why: impl Into<String>) -> OciError {
        OciError::Bad {
            archive: self.path.clone(),
            file: file.to_string(),
            why: why.into(),
        }
    }

    fn has(&self, file: &Path) -> bool {
        match &self.source {
            Source::Dir(d) => d.join(file).is_file(),
            Source::Tar { index, .. } => index.contains_key(file),
        }
    }

    /// A reader of `file` and its size.
    fn open_file(&self, file: &Path) -> Result<(Box<dyn Read>, u64), OciError> {
        match &self.source {
            Source::Dir(d) => {
                let p = d.join(file);
                let f = File::open(&p).map_err(|_| self.missing(file))?;
                let size = f
                    .metadata()
                    .map_err(|source| OciError::Io { path: p, source })?
                    .len();
                Ok((Box::new(f), size))
            }
            Source::Tar { file: tar, index } => {
                let mut at = file.to_path_buf();
                for _ in 0..8 {
                    match index.get(&at) {
                        Some(Entry::Link(to)) => at = to.clone(),
                        Some(Entry::File { offset, size }) => {
                            let io_err = |source| OciError::Io {
                                path: tar.clone(),
                                source,
                            };
                            let mut f = File::open(tar).map_err(io_err)?;
                            f.seek(SeekFrom::Start(*offset)).map_err(io_err)?;
                            return Ok((Box::new(f.take(*size)), *size));
                        }
                        None => return Err(self.missing(file)),
                    }
                }
                Err(self.bad(file.display(), "a chain of links that does not end"))
            }
        }
    }

    /// A small file's bytes (a JSON document).
    fn small(&self, file: &Path) -> Result<Vec<u8>, OciError> {
        let (r, size) = self.open_file(file)?;
        if size > MAX_JSON {
            return Err(self.bad(
                file.display(),
                format!("{size} bytes, more than a manifest or config may be"),
            ));
        }
        let mut v = Vec::with_capacity(size as usize);
        r.take(MAX_JSON)
            .read_to_end(&mut v)
            .map_err(|source| OciError::Io {
                path: self.path.join(file),
                source,
            })?;
        Ok(v)
    }

    fn json<T: for<'de> Deserialize<'de>>(&self, file: &Path, bytes: &[u8]) -> Result<T, OciError> {
        serde_json::from_slice(bytes).map_err(|e| self.bad(file.display(), e.to_string()))
    }

    /// The blob of `d` after checking its size and digest.
    fn blob_bytes(&self, d: &Descriptor) -> Result<Vec<u8>, OciError> {
        let file = blob_path(&self.path, &d.digest)?;
        let bytes = self.small(&file)?;
        if bytes.len() as u64 != d.size || sha256_hex(&bytes) != d.hex() {
            return Err(self.bad(&d.digest, "its contents do not match its digest or size"));
        }
        Ok(bytes)
    }
}

fn sha256_hex(b: &[u8]) -> String {
    hex(&Sha256::digest(b))
}

/// `blobs/sha256/HEX` for a digest, refusing anything but a SHA-256 one.
fn blob_path(archive: &Path, digest: &str) -> Result<PathBuf, OciError> {
    match digest.strip_prefix("sha256:") {
        Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(PathBuf::from("blobs/sha256").join(h))
        }
        _ => Err(OciError::Bad {
            archive: archive.to_path_buf(),
            file: digest.to_string(),
            why: "not a sha256 digest (vmrun reads sha256 blobs only)".into(),
        }),
    }
}

#[derive(Clone, Debug, Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    platform: Option<Platform>,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

impl Descriptor {
    fn hex(&self) -> &str {
        self.digest.strip_prefix("sha256:").unwrap_or("")
    }

    fn reference(&self) -> Option<&str> {
        [
            "io.containerd.image.name",
            "org.opencontainers.image.ref.name",
        ]
        .iter()
        .find_map(|k| self.annotations.get(*k).map(String::as_str))
    }
}

#[derive(Clone, Debug, Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Debug, Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct Manifest {
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct DockerEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers", default)]
    layers: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
struct ImageConfig {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    config: Option<RunConfig>,
    #[serde(default)]
    rootfs: Option<RootfsConfig>,
}

#[derive(Debug, Default, Deserialize)]
struct RunConfig {
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "Entrypoint", default)]
    entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    cmd: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<String>,
    #[serde(rename = "User", default)]
    user: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RootfsConfig {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// What was imported, besides the tree.
#[derive(Debug)]
pub struct Imported {
    /// The image's own name (its tag or ref annotation), when the archive gives one.
    pub reference: Option<String>,
    /// The config's digest: the image's identity.
    pub id: String,
    pub layers: usize,
    pub defaults: ExecDefaults,
    /// Device nodes the layers held, left out (the guest's /dev is its own devtmpfs).
    pub skipped_devices: u64,
}

/// One layer to apply: where its blob is, its digest as the archive names it, and the
/// digests to check.
struct LayerRef {
    file: PathBuf,
    digest: String,
    /// The blob's digest and size (OCI), checked on the stream as stored.
    blob: Option<(String, u64)>,
    /// The uncompressed tar's digest (the config's diff_id), when known.
    diff_id: Option<String>,
}

/// Applies the image in `archive` (the one named `want` where it holds several) onto the
/// empty directory `tree` and returns what its config says.
pub fn unpack_image(archive: &Path, want: Option<&str>, tree: &Path) -> Result<Imported, OciError> {
    let a = Archive::open(archive)?;
    let (reference, config, mut layers) =
        if a.has(Path::new("oci-layout")) && a.has(Path::new("index.json")) {
            oci_layers(&a, want)?
        } else if a.has(Path::new("manifest.json")) {
            docker_layers(&a, want)?
        } else {
            return Err(OciError::Unknown(archive.to_path_buf()));
        };
    let (config_bytes, config_id) = config;
    let cfg: ImageConfig = a.json(Path::new("config"), &config_bytes)?;
    let (os, arch) = (cfg.os.clone(), cfg.architecture.clone());
    if !(os.is_empty() || os == "linux") || !(arch.is_empty() || arch == "amd64") {
        return Err(OciError::Platform {
            archive: a.path.clone(),
            os,
            arch,
        });
    }
    if layers.len() > MAX_IMAGE_LAYERS {
        return Err(a.bad(
            "manifest",
            format!("{} layers, more than {MAX_IMAGE_LAYERS}", layers.len()),
        ));
    }
    let diff_ids = cfg.rootfs.as_ref().map(|r| &r.diff_ids);
    if let Some(ids) = diff_ids.filter(|ids| ids.len() == layers.len()) {
        for (l, id) in layers.iter_mut().zip(ids) {
            l.diff_id = Some(id.clone());
        }
    } else if diff_ids.is_some_and(|ids| !ids.is_empty()) {
        return Err(a.bad(
            "config",
            "its rootfs.diff_ids do not match the manifest's layers",
        ));
    }
    let mut skipped_devices = 0;
    for (i, l) in layers.iter().enumerate() {
        skipped_devices += apply_layer(&a, i + 1, l, tree)?;
    }
    let run = cfg.config.unwrap_or_default();
    let user = run.user.unwrap_or_default();
    let (uid, gid) = resolve_user(tree, &user).map_err(|why| OciError::User {
        archive: a.path.clone(),
        user: user.clone(),
        why,
    })?;
    let env = run
        .env
        .unwrap_or_default()
        .into_iter()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    let mut argv = run.entrypoint.unwrap_or_default();
    argv.extend(run.cmd.unwrap_or_default());
    Ok(Imported {
        reference,
        id: config_id,
        layers: layers.len(),
        skipped_devices,
        defaults: ExecDefaults {
            argv,
            env,
            cwd: run.working_dir.filter(|w| !w.is_empty()),
            uid,
            gid,
        },
    })
}

type Found = (Option<String>, (Vec<u8>, String), Vec<LayerRef>);

/// The manifest `index.json` leads to (following nested indexes), its config and layers.
fn oci_layers(a: &Archive, want: Option<&str>) -> Result<Found, OciError> {
    let bytes = a.small(Path::new("index.json"))?;
    let mut index: Index = a.json(Path::new("index.json"), &bytes)?;
    let mut reference = None;
    for _ in 0..MAX_INDEX_DEPTH {
        let refs: Vec<String> = index
            .manifests
            .iter()
            .filter_map(|d| d.reference().map(String::from))
            .collect();
        let candidates: Vec<&Descriptor> = match (want, reference.is_none()) {
            (Some(w), true) => {
                let hit: Vec<&Descriptor> = index
                    .manifests
                    .iter()
                    .filter(|d| d.reference().is_some_and(|r| r == w || short_name(r) == w))
                    .collect();
                if hit.is_empty() {
                    return Err(OciError::NoSuchRef {
                        archive: a.path.clone(),
                        want: w.into(),
                        refs,
                    });
                }
                hit
            }
            _ => index.manifests.iter().collect(),
        };
        // Where several remain, the linux/amd64 one.
        let amd64: Vec<&Descriptor> = candidates
            .iter()
            .copied()
            .filter(|d| {
                d.platform
                    .as_ref()
                    .is_none_or(|p| p.architecture == "amd64" && p.os == "linux")
            })
            .collect();
        let d = match amd64.as_slice() {
            [one] => (*one).clone(),
            [] => {
                return Err(a.bad("index.json", "no linux/amd64 image in it"));
            }
            _ => {
                return Err(OciError::Ambiguous {
                    archive: a.path.clone(),
                    refs: if refs.is_empty() {
                        amd64.iter().map(|d| d.digest.clone()).collect()
                    } else {
                        refs
                    },
                })
            }
        };
        if reference.is_none() {
            reference = d.reference().map(String::from);
        }
        let bytes = a.blob_bytes(&d)?;
        if d.media_type.contains("index") || d.media_type.contains("manifest.list") {
            index = a.json(Path::new(&d.digest), &bytes)?;
            continue;
        }
        let m: Manifest = a.json(Path::new(&d.digest), &bytes)?;
        let config = a.blob_bytes(&m.config)?;
        let layers = m
            .layers
            .iter()
            .map(|l| {
                Ok(LayerRef {
                    file: blob_path(&a.path, &l.digest)?,
                    digest: l.digest.clone(),
                    blob: Some((l.hex().to_string(), l.size)),
                    diff_id: None,
                })
            })
            .collect::<Result<_, OciError>>()?;
        return Ok((reference, (config, m.config.digest.clone()), layers));
    }
    Err(a.bad("index.json", "indexes nested too deep"))
}

/// `docker save`'s manifest.json: the entry asked for (or the only one), its config and
/// layers.
fn docker_layers(a: &Archive, want: Option<&str>) -> Result<Found, OciError> {
    let file = Path::new("manifest.json");
    let bytes = a.small(file)?;
    let entries: Vec<DockerEntry> = a.json(file, &bytes)?;
    let tags = |e: &DockerEntry| e.repo_tags.clone().unwrap_or_default();
    let refs: Vec<String> = entries.iter().flat_map(tags).collect();
    let e = match want {
        Some(w) => entries
            .iter()
            .find(|e| tags(e).iter().any(|t| t == w || short_name(t) == w))
            .ok_or_else(|| OciError::NoSuchRef {
                archive: a.path.clone(),
                want: w.into(),
                refs: refs.clone(),
            })?,
        None => match entries.as_slice() {
            [one] => one,
            [] => return Err(a.bad("manifest.json", "it lists no image")),
            _ => {
                return Err(OciError::Ambiguous {
                    archive: a.path.clone(),
                    refs,
                })
            }
        },
    };
    let reference = match want {
        Some(w) => Some(w.to_string()),
        None => tags(e).into_iter().next(),
    };
    let config_file =
        inner(&e.config).ok_or_else(|| a.bad(&e.config, "a path outside the archive"))?;
    let config = a.small(&config_file)?;
    let id = format!("sha256:{}", sha256_hex(&config));
    let layers = e
        .layers
        .iter()
        .map(|l| {
            Ok(LayerRef {
                file: inner(l).ok_or_else(|| a.bad(l, "a path outside the archive"))?,
                digest: l.clone(),
                blob: None,
                diff_id: None,
            })
        })
        .collect::<Result<_, OciError>>()?;
    Ok((reference, (config, id), layers))
}

/// `registry/path/name:tag` → `name:tag`.
pub fn short_name(reference: &str) -> &str {
    reference.rsplit('/').next().unwrap_or(reference)
}

/// Hashes what passes through.
struct Hashing<R> {
    inner: R,
    hash: Sha256,
    bytes: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

fn hashing<R: Read>(inner: R) -> Hashing<R> {
    Hashing {
        inner,
        hash: Sha256::new(),
        bytes: 0,
    }
}

/// Applies layer `index` (from 1) onto `tree`, checking its digests on the way; returns the
/// device nodes it left out.
fn apply_layer(a: &Archive, index: usize, l: &LayerRef, tree: &Path) -> Result<u64, OciError> {
    let layer_err = |source: Step| OciError::Layer {
        archive: a.path.clone(),
        index,
        digest: l.digest.clone(),
        source,
    };
    let io_step = |e: io::Error| layer_err(Step::Tar(TarError::Io(e)));
    let (r, _) = a.open_file(&l.file)?;
    let mut raw = BufReader::new(hashing(r));
    let head = raw.fill_buf().map_err(io_step)?;
    let gzip = head.starts_with(GZIP_MAGIC);
    if head.starts_with(ZSTD_MAGIC) {
        return Err(OciError::Zstd {
            archive: a.path.clone(),
            index,
            digest: l.digest.clone(),
        });
    }
    let (diff, devices) = {
        let stream: Box<dyn Read + '_> = if gzip {
            Box::new(flate2::bufread::MultiGzDecoder::new(&mut raw))
        } else {
            Box::new(&mut raw)
        };
        let mut tar = hashing(stream);
        let devices = layers::unpack(&mut tar, tree, &Limits::default(), Whiteouts::Apply)
            .map_err(layer_err)?;
        // The digests cover the whole stream: read what follows the end-of-archive mark.
        let rest =
            io::copy(&mut (&mut tar).take(MAX_TRAILER + 1), &mut io::sink()).map_err(io_step)?;
        if rest > MAX_TRAILER {
            return Err(a.bad(&l.digest, "more than 64 MiB after the tar's end"));
        }
        (hex(&tar.hash.finalize()), devices)
    };
    // Whatever the decompressor left unread (a gzip trailer's padding) is part of the blob.
    io::copy(&mut (&mut raw).take(MAX_TRAILER), &mut io::sink()).map_err(io_step)?;
    let blob = raw.into_inner();
    if let Some((want, size)) = &l.blob {
        if blob.bytes != *size || hex(&blob.hash.finalize()) != *want {
            return Err(a.bad(
                &l.digest,
                "the layer's contents do not match its digest or size",
            ));
        }
    }
    if let Some(id) = &l.diff_id {
        if id.strip_prefix("sha256:") != Some(diff.as_str()) {
            return Err(a.bad(
                &l.digest,
                format!("the uncompressed layer does not match the config's diff_id {id}"),
            ));
        }
    }
    Ok(devices)
}

/// Reads a small file of the unpacked tree, never through a symlink.
fn tree_file(tree: &Path, rel: &str) -> Option<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let p = tree.join(rel);
    // The directories above must be real directories of the tree.
    let mut at = tree.to_path_buf();
    for c in Path::new(rel).parent()?.components() {
        at.push(c);
        if !std::fs::symlink_metadata(&at).ok()?.is_dir() {
            return None;
        }
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(p)
        .ok()?;
    let mut s = String::new();
    f.take(MAX_JSON).read_to_string(&mut s).ok()?;
    Some(s)
}

/// The (uid, gid) of the config's `User` (`""`, `uid`, `uid:gid`, `name`, `name:group`),
/// names looked up in the image's own /etc/passwd and /etc/group. Empty: root, left unset.
fn resolve_user(tree: &Path, user: &str) -> Result<(Option<u32>, Option<u32>), String> {
    if user.is_empty() {
        return Ok((None, None));
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let lookup = |file: &str, name: &str| -> Option<(u32, Option<u32>)> {
        tree_file(tree, file)?.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 3 && f[0] == name)
                .then(|| Some((f[2].parse().ok()?, f.get(3).and_then(|g| g.parse().ok()))))
                .flatten()
        })
    };
    let (uid, primary) = match u.parse::<u32>() {
        Ok(n) => (n, None),
        Err(_) => lookup("etc/passwd", u)
            .ok_or_else(|| format!("no user {u} in the image's /etc/passwd"))?,
    };
    let gid = match g {
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => {
                lookup("etc/group", g)
                    .ok_or_else(|| format!("no group {g} in the image's /etc/group"))?
                    .0
            }
        },
        // A numeric uid takes its passwd entry's group where there is one, as Docker does.
        None => primary
            .or_else(|| {
                tree_file(tree, "etc/passwd")?.lines().find_map(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    (f.len() >= 4 && f[2] == uid.to_string())
                        .then(|| f[3].parse().ok())
                        .flatten()
                })
            })
            .unwrap_or(0),
    };
    Ok((Some(uid), Some(gid)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::io::Write;

    /// A tar of `entries`: (path, Some(data) for a file, None for a directory).
    fn layer(entries: &[(&str, Option<&[u8]>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            let mut h = tar::Header::new_gnu();
            match data {
                Some(d) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(d.len() as u64);
                    h.set_mode(0o755);
                }
                None => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    h.set_mode(0o755);
                }
            }
            h.set_path(path).unwrap();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1_700_000_000);
            h.set_cksum();
            b.append(&h, data.unwrap_or(b"")).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn gzip(b: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    }

    fn layers() -> (Vec<u8>, Vec<u8>) {
        let passwd = b"root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n";
        let group = b"root:x:0:\napps:x:1001:\n";
        let l1 = layer(&[
            ("etc", None),
            ("etc/passwd", Some(passwd)),
            ("etc/group", Some(group)),
            ("app", None),
            ("app/old.txt", Some(b"old\n")),
            ("data", None),
            ("data/a", Some(b"a")),
            ("data/sub", None),
            ("data/sub/b", Some(b"b")),
            ("gone.txt", Some(b"bye")),
        ]);
        let l2 = layer(&[
            (".wh.gone.txt", Some(b"")),
            ("data", None),
            ("data/new", Some(b"new")),
            ("data/.wh..wh..opq", Some(b"")),
            ("app/hello.sh", Some(b"#!/bin/sh\necho hi\n")),
        ]);
        (l1, l2)
    }

    fn config(arch: &str, diff_ids: &[&[u8]]) -> Vec<u8> {
        let ids: Vec<String> = diff_ids
            .iter()
            .map(|l| format!("\"sha256:{}\"", sha256_hex(l)))
            .collect();
        format!(
            r#"{{"architecture":"{arch}","os":"linux","config":{{"Env":["PATH=/app:/bin","GREETING=hi"],"Entrypoint":["/app/hello.sh"],"Cmd":["x"],"WorkingDir":"/app","User":"app"}},"rootfs":{{"type":"layers","diff_ids":[{}]}}}}"#,
            ids.join(",")
        )
        .into_bytes()
    }

    fn desc(media: &str, blob: &[u8]) -> String {
        format!(
            r#"{{"mediaType":"{media}","digest":"sha256:{}","size":{}}}"#,
            sha256_hex(blob),
            blob.len()
        )
    }

    /// An OCI layout in `dir`: layer 1 plain, layer 2 gzip; returns the layer blobs.
    fn oci_layout(dir: &Path, arch: &str) -> Vec<Vec<u8>> {
        let (l1, l2) = layers();
        let l2z = gzip(&l2);
        let cfg = config(arch, &[&l1, &l2]);
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[{},{}]}}"#,
            desc("application/vnd.oci.image.config.v1+json", &cfg),
            desc("application/vnd.oci.image.layer.v1.tar", &l1),
            desc("application/vnd.oci.image.layer.v1.tar+gzip", &l2z)
        )
        .into_bytes();
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs).unwrap();
        for b in [&l1, &l2z, &cfg, &manifest] {
            fs::write(blobs.join(sha256_hex(b)), b).unwrap();
        }
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let mut m = desc("application/vnd.oci.image.manifest.v1+json", &manifest);
        m.pop();
        m.push_str(
            r#","annotations":{"org.opencontainers.image.ref.name":"registry.example/team/demo:1"}}"#,
        );
        fs::write(
            dir.join("index.json"),
            format!(r#"{{"schemaVersion":2,"manifests":[{m}]}}"#),
        )
        .unwrap();
        vec![l1, l2z]
    }

    fn check_tree(tree: &Path, got: &Imported) {
        assert!(!tree.join("gone.txt").exists(), "the whiteout deleted it");
        let data: Vec<_> = fs::read_dir(tree.join("data"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(
            data,
            vec!["new"],
            "the opaque directory keeps only layer 2's"
        );
        assert_eq!(fs::read(tree.join("app/old.txt")).unwrap(), b"old\n");
        assert!(tree.join("app/hello.sh").is_file());
        assert_eq!(got.layers, 2);
        let d = &got.defaults;
        assert_eq!(d.argv, vec!["/app/hello.sh", "x"]);
        assert_eq!(d.cwd.as_deref(), Some("/app"));
        assert_eq!((d.uid, d.gid), (Some(1000), Some(1001)));
        assert!(d.env.contains(&("GREETING".into(), "hi".into())));
    }

    #[test]
    fn an_oci_layout_applies_its_layers_with_whiteouts_as_a_directory_or_a_tar() {
        let d = tempfile::tempdir().unwrap();
        let layout = d.path().join("layout");
        oci_layout(&layout, "amd64");
        let tree = d.path().join("t1");
        fs::create_dir(&tree).unwrap();
        let got = unpack_image(&layout, None, &tree).unwrap();
        check_tree(&tree, &got);
        assert_eq!(
            got.reference.as_deref(),
            Some("registry.example/team/demo:1")
        );
        // The same layout as a tar, read in place.
        let tar_path = d.path().join("layout.tar");
        let mut b = tar::Builder::new(fs::File::create(&tar_path).unwrap());
        b.append_dir_all(".", &layout).unwrap();
        b.into_inner().unwrap().flush().unwrap();
        let tree = d.path().join("t2");
        fs::create_dir(&tree).unwrap();
        let got = unpack_image(&tar_path, Some("demo:1"), &tree).unwrap();
        check_tree(&tree, &got);
        let e = unpack_image(&tar_path, Some("other"), &tree).unwrap_err();
        assert!(matches!(e, OciError::NoSuchRef { .. }), "{e}");
    }

    #[test]
    fn a_docker_save_archive_is_read_with_its_diff_ids() {
        let d = tempfile::tempdir().unwrap();
        let (l1, l2) = layers();
        let cfg = config("amd64", &[&l1, &l2]);
        let cfg_name = format!("{}.json", sha256_hex(&cfg));
        let manifest = format!(
            r#"[{{"Config":"{cfg_name}","RepoTags":["example.com/team/demo:2"],"Layers":["aaa/layer.tar","bbb/layer.tar"]}}]"#
        );
        let tar_path = d.path().join("saved.tar");
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |name: &str, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_cksum();
            b.append_data(&mut h, name, data).unwrap();
        };
        add("manifest.json", manifest.as_bytes());
        add(&cfg_name, &cfg);
        add("aaa/layer.tar", &l1);
        add("ccc/layer.tar", &l2);
        // Older `docker save` links a layer it has written once.
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        b.append_link(&mut h, "bbb/layer.tar", "../ccc/layer.tar")
            .unwrap();
        fs::write(&tar_path, b.into_inner().unwrap()).unwrap();
        let tree = d.path().join("t");
        fs::create_dir(&tree).unwrap();
        let got = unpack_image(&tar_path, None, &tree).unwrap();
        check_tree(&tree, &got);
        assert_eq!(got.reference.as_deref(), Some("example.com/team/demo:2"));
        assert_eq!(got.id, format!("sha256:{}", sha256_hex(&cfg)));
    }

    #[test]
    fn bad_archives_are_refused_with_what_is_wrong() {
        let d = tempfile::tempdir().unwrap();
        let fresh = |n: &str| {
            let t = d.path().join(n);
            fs::create_dir(&t).unwrap();
            t
        };
        // A layer blob that does not match its digest.
        let layout = d.path().join("corrupt");
        let blobs = oci_layout(&layout, "amd64");
        let p = layout.join("blobs/sha256").join(sha256_hex(&blobs[0]));
        let mut b = fs::read(&p).unwrap();
        // A byte of a file's contents: the tar still reads, the digest does not match.
        let at = b.windows(6).position(|w| w == b"root:x").unwrap();
        b[at] ^= 1;
        fs::write(&p, b).unwrap();
        let e = unpack_image(&layout, None, &fresh("t1"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("do not match"), "{e}");
        // A zstd layer.
        fs::write(&p, [0x28, 0xb5, 0x2f, 0xfd, 0, 0]).unwrap();
        let e = unpack_image(&layout, None, &fresh("t2")).unwrap_err();
        assert!(matches!(e, OciError::Zstd { index: 1, .. }), "{e}");
        assert!(e.to_string().contains("gzip"), "{e}");
        // Another platform.
        let arm = d.path().join("arm");
        oci_layout(&arm, "arm64");
        let e = unpack_image(&arm, None, &fresh("t3"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("linux/arm64") && e.contains("amd64"), "{e}");
        // A compressed archive, a directory that is no image.
        let gz = d.path().join("x.tar.gz");
        fs::write(&gz, gzip(b"x")).unwrap();
        let e = unpack_image(&gz, None, &fresh("t4"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("decompress it first"), "{e}");
        let e = unpack_image(&fresh("empty"), None, &fresh("t5"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("neither an OCI image layout"), "{e}");
        // A digest that would name a path outside blobs/.
        let e = blob_path(Path::new("a"), "sha256:../../etc/passwd").unwrap_err();
        assert!(e.to_string().contains("not a sha256 digest"), "{e}");
    }

    #[test]
    fn users_resolve_by_number_or_name() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("etc")).unwrap();
        fs::write(d.path().join("etc/passwd"), "app:x:1000:1001::/:/bin/sh\n").unwrap();
        fs::write(d.path().join("etc/group"), "apps:x:1001:\nwheel:x:10:\n").unwrap();
        let r = |u| resolve_user(d.path(), u);
        assert_eq!(r(""), Ok((None, None)));
        assert_eq!(r("app"), Ok((Some(1000), Some(1001))));
        assert_eq!(r("1000"), Ok((Some(1000), Some(1001))));
        assert_eq!(r("5"), Ok((Some(5), Some(0))));
        assert_eq!(r("app:wheel"), Ok((Some(1000), Some(10))));
        assert_eq!(r("7:8"), Ok((Some(7), Some(8))));
        assert!(r("nobody").unwrap_err().contains("no user nobody"));
        // A passwd that is a symlink out of the tree is not read.
        fs::remove_file(d.path().join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("etc/passwd")).unwrap();
        assert!(r("root").is_err());
    }
}
