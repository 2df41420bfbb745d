//! The kernel command line as vmrun-init reads it (`/proc/cmdline`).
//!
//! Parameters (repeated keys: the last wins; unknown keys are ignored):
//! - `root=DEV` lower rootfs device (default `/dev/vda`), or `root=none` to stay in the initramfs
//!   (no disk: the workload runs there); `rootfstype=erofs|ext4|…` (default:
//!   detected from the superblock); `ro` / `rw` for the root when no overlay is used.
//! - `root.overlay=tmpfs` or `root.overlay=/dev/vdX`: the upper layer; `root.overlaysize=N[kmg]`
//!   or `N%` (tmpfs only); `root.overlayfstype=ext4` (block device only, default ext4).
//! - `root.layers=DEV[,DEV…]`: read-only layers stacked above the root device, bottom first
//!   (vmrun attaches each `--layer` as a disk); filesystem detected as for the root. With
//!   `root.overlay=` they sit between the root and the upper; without it the stack is a
//!   read-only overlay.
//! - `vmrun.exec=CMD` the workload to run in the new root (split on spaces; single quotes group
//!   words), until the agent runs there; `vmrun.wait=SECONDS` how long to wait for block devices
//!   (default 10, at most 600).
//!
//! Quoting follows the kernel: double quotes group a value with spaces (`key="a b"`) and are
//! removed.

use std::time::Duration;

use vmrun_protocol::status::InitError;

use crate::Failure;

/// Where the upper layer lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Overlay {
    /// tmpfs with an optional `size=` value (validated).
    Tmpfs { size: Option<String> },
    /// A block device and the filesystem on it.
    Device { path: String, fstype: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub root: String,
    pub rootfstype: Option<String>,
    pub rw: bool,
    pub overlay: Option<Overlay>,
    /// Read-only layer devices above the root, bottom first.
    pub layers: Vec<String>,
    pub exec: Option<Vec<String>>,
    pub device_wait: Duration,
}

pub const DEFAULT_ROOT: &str = "/dev/vda";
/// `root=none`: no root disk, the initramfs stays the root.
pub const NO_ROOT: &str = "none";
pub const DEFAULT_UPPER_FSTYPE: &str = "ext4";
const DEFAULT_WAIT_SECS: u64 = 10;
/// More than the host attaches (8); overlayfs itself takes hundreds.
pub const MAX_LAYERS: usize = 16;
const MAX_WAIT_SECS: u64 = 600;

/// Splits a command line into (key, value) words the way the kernel does: whitespace separates
/// words, double quotes group (and are dropped).
pub fn words(line: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out.into_iter()
        .map(|w| match w.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (w, None),
        })
        .collect()
}

fn bad(key: &str, value: &str, why: impl std::fmt::Display) -> Failure {
    Failure::new(InitError::Cmdline, format!("{key}={value}"), why)
}

pub use vmrun_protocol::cmdline::validate_size;

/// Splits `vmrun.exec=` into argv: spaces separate, single quotes group.
pub fn split_command(s: &str) -> Result<Vec<String>, String> {
    let mut argv = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in s.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                any = true;
            }
            ' ' | '\t' if !quoted => {
                if any {
                    argv.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if quoted {
        return Err("unbalanced single quote".into());
    }
    if any {
        argv.push(cur);
    }
    if argv.is_empty() {
        return Err("empty command".into());
    }
    Ok(argv)
}

/// A filesystem type name: lowercase letters, digits, '_' and '.', as the kernel registers them.
fn valid_fstype(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.')
}

pub fn parse(line: &str) -> Result<Config, Failure> {
    let mut root = None;
    let mut rootfstype = None;
    let mut rw = false;
    let mut overlay = None;
    let mut size = None;
    let mut upper_fstype = None;
    let mut exec = None;
    let mut wait = None;
    let mut layers = None;
    for (key, value) in words(line) {
        match (key.as_str(), value) {
            ("ro", None) => rw = false,
            ("rw", None) => rw = true,
            ("root", Some(v)) => root = Some(v),
            ("rootfstype", Some(v)) => rootfstype = Some(v),
            ("root.overlay", Some(v)) => overlay = Some(v),
            ("root.overlaysize", Some(v)) => size = Some(v),
            ("root.overlayfstype", Some(v)) => upper_fstype = Some(v),
            ("root.layers", Some(v)) => layers = Some(v),
            ("vmrun.exec", Some(v)) => exec = Some(v),
            ("vmrun.wait", Some(v)) => wait = Some(v),
            _ => {}
        }
    }
    let root = root.unwrap_or_else(|| DEFAULT_ROOT.to_string());
    if !root.starts_with("/dev/") && root != NO_ROOT {
        return Err(bad(
            "root",
            &root,
            "not a device path; use a block device such as /dev/vda, or none",
        ));
    }
    if root == NO_ROOT && overlay.is_some() {
        return Err(bad(
            "root",
            &root,
            "an overlay root needs a root device; drop root.overlay= or give root=/dev/vdX",
        ));
    }
    if let Some(t) = &rootfstype {
        if !valid_fstype(t) {
            return Err(bad(
                "rootfstype",
                t,
                "not a filesystem type name (e.g. erofs, ext4)",
            ));
        }
    }
    let overlay = match overlay.as_deref() {
        None => {
            for (k, v) in [
                ("root.overlaysize", &size),
                ("root.overlayfstype", &upper_fstype),
            ] {
                if let Some(v) = v {
                    return Err(bad(k, v, "given without root.overlay=; add root.overlay=tmpfs or root.overlay=/dev/vdX"));
                }
            }
            None
        }
        Some(v) if v.eq_ignore_ascii_case("tmpfs") => {
            if let Some(t) = &upper_fstype {
                return Err(bad(
                    "root.overlayfstype",
                    t,
                    "only applies to a block-device upper; drop it or use root.overlay=/dev/vdX",
                ));
            }
            if let Some(s) = &size {
                validate_size(s).map_err(|why| bad("root.overlaysize", s, why))?;
            }
            Some(Overlay::Tmpfs { size })
        }
        Some(v) if v.starts_with("/dev/") && v.len() > 5 => {
            if let Some(s) = &size {
                return Err(bad("root.overlaysize", s, "only applies to a tmpfs upper (a device upper's size is the device's); drop it"));
            }
            let fstype = upper_fstype.unwrap_or_else(|| DEFAULT_UPPER_FSTYPE.to_string());
            if !valid_fstype(&fstype) {
                return Err(bad(
                    "root.overlayfstype",
                    &fstype,
                    "not a filesystem type name (e.g. ext4)",
                ));
            }
            if v == root {
                return Err(bad(
                    "root.overlay",
                    v,
                    "is also the lower root device; use a second disk such as /dev/vdb",
                ));
            }
            Some(Overlay::Device {
                path: v.to_string(),
                fstype,
            })
        }
        Some(v) => {
            return Err(bad(
                "root.overlay",
                v,
                "unknown upper layer; use tmpfs or a block device such as /dev/vdb",
            ))
        }
    };
    let layers: Vec<String> = match &layers {
        None => vec![],
        Some(v) => {
            let list: Vec<String> = v.split(',').map(str::to_string).collect();
            if root == NO_ROOT {
                return Err(bad("root.layers", v, "layers need a root device to stack on; drop root.layers= or give root=/dev/vdX"));
            }
            if list.len() > MAX_LAYERS {
                return Err(bad(
                    "root.layers",
                    v,
                    format!("more than {MAX_LAYERS} layers"),
                ));
            }
            for d in &list {
                if !d.starts_with("/dev/") || d.len() <= 5 || d.contains(char::is_whitespace) {
                    return Err(bad("root.layers", v, format!("{d:?} is not a device path; list block devices such as /dev/vdc,/dev/vdd")));
                }
                let upper = matches!(&overlay, Some(Overlay::Device { path, .. }) if path == d);
                if *d == root || upper || list.iter().filter(|x| *x == d).count() > 1 {
                    return Err(bad(
                        "root.layers",
                        v,
                        format!("{d} is used twice (as the root, the upper or another layer)"),
                    ));
                }
            }
            list
        }
    };
    let exec = match exec {
        None => None,
        Some(e) => Some(split_command(&e).map_err(|why| bad("vmrun.exec", &e, why))?),
    };
    let device_wait = match wait {
        None => Duration::from_secs(DEFAULT_WAIT_SECS),
        Some(w) => match w.parse::<u64>() {
            Ok(s) if s <= MAX_WAIT_SECS => Duration::from_secs(s),
            _ => {
                return Err(bad(
                    "vmrun.wait",
                    &w,
                    format!("not a number of seconds from 0 to {MAX_WAIT_SECS}"),
                ))
            }
        },
    };
    Ok(Config {
        root,
        rootfstype,
        rw,
        overlay,
        layers,
        exec,
        device_wait,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(line: &str) -> String {
        parse(line).unwrap_err().to_string()
    }

    #[test]
    fn defaults() {
        let c = parse("console=ttyS0 reboot=k").unwrap();
        assert_eq!(c.root, "/dev/vda");
        assert_eq!(
            (c.rootfstype, c.rw, c.overlay, c.exec),
            (None, false, None, None)
        );
        assert_eq!(c.device_wait, Duration::from_secs(10));
    }

    #[test]
    fn every_parameter() {
        let c = parse("root=/dev/vdc rootfstype=erofs rw root.overlay=/dev/vdb root.overlayfstype=xfs vmrun.exec=/bin/true vmrun.wait=3").unwrap();
        assert_eq!(c.root, "/dev/vdc");
        assert_eq!(c.rootfstype.as_deref(), Some("erofs"));
        assert!(c.rw);
        assert_eq!(
            c.overlay,
            Some(Overlay::Device {
                path: "/dev/vdb".into(),
                fstype: "xfs".into()
            })
        );
        assert_eq!(c.exec, Some(vec!["/bin/true".to_string()]));
        assert_eq!(c.device_wait, Duration::from_secs(3));
        let t = parse("root.overlay=TMPFS root.overlaysize=256M").unwrap();
        assert_eq!(
            t.overlay,
            Some(Overlay::Tmpfs {
                size: Some("256M".into())
            })
        );
        let d = parse("root.overlay=/dev/vdb").unwrap();
        assert_eq!(
            d.overlay,
            Some(Overlay::Device {
                path: "/dev/vdb".into(),
                fstype: "ext4".into()
            })
        );
    }

    #[test]
    fn quoting_like_the_kernel() {
        assert_eq!(
            words(r#"a="b c" "d=e f" g"#),
            vec![
                ("a".into(), Some("b c".into())),
                ("d".into(), Some("e f".into())),
                ("g".into(), None),
            ]
        );
        let c = parse(r#"vmrun.exec="/bin/sh -c 'echo hi there; exit 3'""#).unwrap();
        assert_eq!(
            c.exec.unwrap(),
            vec!["/bin/sh", "-c", "echo hi there; exit 3"]
        );
        assert_eq!(words("  \t "), vec![]);
        assert_eq!(words(r#"x="""#), vec![("x".into(), Some("".into()))]);
    }

    #[test]
    fn repeated_keys_last_wins_and_unknown_ignored() {
        let c = parse("root.overlay=/dev/vdb root.overlay=tmpfs ro rw ro foo.bar=1 quiet =x root=/dev/vdz root=/dev/vdy").unwrap();
        assert_eq!(c.overlay, Some(Overlay::Tmpfs { size: None }));
        assert!(!c.rw);
        assert_eq!(c.root, "/dev/vdy");
    }

    #[test]
    fn layers_are_a_bottom_first_device_list() {
        let c = parse("root.overlay=tmpfs root.layers=/dev/vdb,/dev/vdc").unwrap();
        assert_eq!(c.layers, vec!["/dev/vdb", "/dev/vdc"]);
        assert!(parse("").unwrap().layers.is_empty());
        for (line, want) in [
            ("root.layers=/dev/vda", "used twice"),
            ("root.overlay=/dev/vdb root.layers=/dev/vdb", "used twice"),
            ("root.layers=/dev/vdb,/dev/vdb", "used twice"),
            ("root.layers=/dev/vdb,,/dev/vdc", "not a device path"),
            ("root.layers=vdb", "not a device path"),
            ("root=none root.layers=/dev/vdb", "need a root device"),
        ] {
            let e = err(line);
            assert!(
                e.contains("root.layers=") && e.contains(want),
                "{line}: {e}"
            );
        }
        let many: Vec<String> = (0..=MAX_LAYERS).map(|i| format!("/dev/vd{i}")).collect();
        let e = err(&format!("root.layers={}", many.join(",")));
        assert!(e.contains("more than 16 layers"), "{e}");
    }

    #[test]
    fn every_bad_value_names_the_parameter_and_the_fix() {
        let e = err("root.overlay=tmpfs root.overlaysize=12q");
        assert!(
            e.starts_with("vmrun-init: error: root.overlaysize=12q: not a tmpfs size")
                && e.contains("256M"),
            "{e}"
        );
        let e = err("root.overlay=nfs");
        assert!(
            e.contains("root.overlay=nfs: unknown upper layer; use tmpfs or a block device"),
            "{e}"
        );
        let e = err("root.overlay=/dev/");
        assert!(e.contains("unknown upper layer"), "{e}");
        let e = err("root.overlay=/dev/vdb root.overlayfstype=Ext4!");
        assert!(
            e.contains("root.overlayfstype=Ext4!: not a filesystem type"),
            "{e}"
        );
        let e = err("root.overlay=tmpfs root.overlayfstype=ext4");
        assert!(e.contains("only applies to a block-device upper"), "{e}");
        let e = err("root.overlay=/dev/vdb root.overlaysize=1G");
        assert!(e.contains("only applies to a tmpfs upper"), "{e}");
        let e = err("root.overlaysize=1G");
        assert!(e.contains("without root.overlay="), "{e}");
        let e = err("root.overlay=/dev/vda");
        assert!(e.contains("also the lower root device"), "{e}");
        let e = err("root=LABEL=foo");
        assert!(e.contains("root=LABEL=foo: not a device path"), "{e}");
        let e = err("rootfstype=\"e xt4\"");
        assert!(e.contains("not a filesystem type name"), "{e}");
        let e = err("vmrun.exec=\"'unbalanced\"");
        assert!(e.contains("unbalanced single quote"), "{e}");
        let e = err("vmrun.exec=");
        assert!(e.contains("empty command"), "{e}");
        let e = err("root=none root.overlay=tmpfs");
        assert!(e.contains("an overlay root needs a root device"), "{e}");
        assert_eq!(parse("root=none").unwrap().root, NO_ROOT);
        let e = err("vmrun.wait=forever");
        assert!(
            e.contains("vmrun.wait=forever: not a number of seconds"),
            "{e}"
        );
        assert!(
            parse("root.overlay=tmpfs root.overlaysize=12q")
                .unwrap_err()
                .class
                == InitError::Cmdline
        );
    }
}
