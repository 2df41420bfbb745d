//! The guest kernel command line vmrun passes: its own base parameters, the compatibility
//! parameters for PVM hosts, then the user's (last, so a user parameter overrides ours).

use thiserror::Error;

use crate::arch::x86_64::layout::CMDLINE_MAX_SIZE;
use crate::host::compat::pvm_cmdline;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CmdlineError {
    #[error("the kernel command line must be printable ASCII")]
    NotAscii,
    #[error("the kernel command line is {len} bytes; the x86 limit is {max} (shorten --cmdline)", max = CMDLINE_MAX_SIZE - 1)]
    TooLong { len: usize },
}

/// Serial console, reset through the keyboard controller, reboot at once on panic, one UART.
pub const BASE: &str = "console=ttyS0 reboot=k panic=-1 8250.nr_uarts=1";

/// Base, then the PVM parameters when `pvm`, then `ours` (overlay, workload), then the user's.
pub fn assemble(ours: &[String], user: Option<&str>, pvm: bool) -> Result<String, CmdlineError> {
    let mut parts = vec![BASE.to_string()];
    if pvm {
        parts.push(pvm_cmdline());
    }
    parts.extend(ours.iter().cloned());
    if let Some(u) = user.map(str::trim).filter(|u| !u.is_empty()) {
        if u.bytes().any(|b| !b.is_ascii() || b == 0) {
            return Err(CmdlineError::NotAscii);
        }
        parts.push(u.to_string());
    }
    let s = parts.join(" ");
    if s.len() >= CMDLINE_MAX_SIZE {
        return Err(CmdlineError::TooLong { len: s.len() });
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_then_compat_then_user() {
        let s = assemble(&[], Some("  quiet init=/bin/sh "), true).unwrap();
        assert!(s.starts_with(BASE));
        let compat = s.find("clearcpuid=").unwrap();
        let user = s.find("quiet init=/bin/sh").unwrap();
        assert!(compat < user);
        assert!(s.ends_with("init=/bin/sh"));
        assert!(!assemble(&[], None, false).unwrap().contains("clearcpuid"));
        assert_eq!(assemble(&[], Some(""), false).unwrap(), BASE);
    }

    #[test]
    fn too_long_or_binary_is_refused() {
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(assemble(&[], Some(&long), false)
            .unwrap_err()
            .to_string()
            .contains("limit is 2047"));
        assert!(assemble(&[], Some("a\u{e9}"), false).is_err());
        let fits = "y".repeat(CMDLINE_MAX_SIZE - BASE.len() - 2);
        assert!(assemble(&[], Some(&fits), false).is_ok());
    }
}
