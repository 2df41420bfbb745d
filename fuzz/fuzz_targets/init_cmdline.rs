//! The guest init's kernel command line parser (root, overlay, exec and the rest).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let line = String::from_utf8_lossy(data);
    let _ = vmrun_init::cmdline::parse(&line);
});
