//! Kernel command-line keys that the host writes and vmrun-init reads, and the validation both
//! sides apply to their values, so a bad value is refused on the host before a VM is started.

pub const ROOT_OVERLAY: &str = "root.overlay";
pub const ROOT_OVERLAY_SIZE: &str = "root.overlaysize";
pub const ROOT_OVERLAY_FSTYPE: &str = "root.overlayfstype";
/// Read-only layer devices stacked above the root device, bottom first, comma-separated.
pub const ROOT_LAYERS: &str = "root.layers";
pub const EXEC: &str = "vmrun.exec";
pub const WAIT: &str = "vmrun.wait";

/// What the guest prints on its console that the host watches for: the boot phases the host
/// can report, and the lines that explain a failure. The init prints them; the VMM and the
/// library look for them.
pub mod console {
    /// The kernel is running (its first line).
    pub const KERNEL_STARTED: &str = "Linux version";
    /// The kernel starts the initramfs's init.
    pub const INIT_STARTED: &str = "Run /init";
    /// vmrun-init mounted an overlay root (`<OVERLAY_ROOT> /dev/vda lower (ext4), tmpfs upper`).
    pub const OVERLAY_ROOT: &str = "vmrun-init: overlay root:";
    /// vmrun-init mounted the root directly.
    pub const DIRECT_ROOT: &str = "vmrun-init: root:";
    /// The root is ready and the workload or agent starts next.
    pub const INIT_READY: &str = "vmrun-init: ready";
    /// The agent process was started.
    pub const AGENT_STARTED: &str = "vmrun-init: agent started";
    /// vmrun-init failed; the rest of the line says what and why.
    pub const INIT_ERROR: &str = "vmrun-init: error:";
    /// The guest kernel panicked.
    pub const KERNEL_PANIC: &str = "Kernel panic";
}

/// A tmpfs size that is not one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not a tmpfs size; use a positive number of bytes with an optional k, m or g suffix, or a percentage of RAM up to 100% (e.g. 256M, 50%)")]
pub struct SizeError;

/// A tmpfs size: a positive number with an optional k/m/g suffix (any case), or a percentage of
/// RAM up to 100%.
pub fn validate_size(value: &str) -> Result<(), SizeError> {
    let digits = value.trim_end_matches(['k', 'K', 'm', 'M', 'g', 'G', '%']);
    let suffix = &value[digits.len()..];
    let number = (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse::<u64>().ok())
        .flatten();
    let ok = match (number, suffix) {
        (Some(n), "%") => (1..=100).contains(&n),
        (Some(n), s) => n > 0 && s.len() <= 1,
        (None, _) => false,
    };
    if ok {
        Ok(())
    } else {
        Err(SizeError)
    }
}

/// Bytes for a size with an optional k/m/g suffix (no percentages).
pub fn size_bytes(value: &str) -> Option<u64> {
    validate_size(value).ok()?;
    let (digits, mult) = match value.as_bytes().last()? {
        b'k' | b'K' => (&value[..value.len() - 1], 1u64 << 10),
        b'm' | b'M' => (&value[..value.len() - 1], 1 << 20),
        b'g' | b'G' => (&value[..value.len() - 1], 1 << 30),
        b'%' => return None,
        _ => (value, 1),
    };
    digits.parse::<u64>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        for ok in ["1", "256M", "256m", "1g", "64K", "50%", "100%"] {
            assert!(validate_size(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "M",
            "0",
            "0%",
            "12q",
            "1.5G",
            "-1",
            "256MB",
            "101%",
            "5%%",
            " 1",
            "99999999999999999999",
        ] {
            assert!(validate_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bytes() {
        assert_eq!(size_bytes("512"), Some(512));
        assert_eq!(size_bytes("64k"), Some(64 << 10));
        assert_eq!(size_bytes("256M"), Some(256 << 20));
        assert_eq!(size_bytes("2G"), Some(2 << 30));
        assert_eq!(size_bytes("50%"), None);
        assert_eq!(size_bytes("x"), None);
        assert_eq!(size_bytes("99999999999g"), None);
    }
}
