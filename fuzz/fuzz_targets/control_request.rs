//! A line on the VMM's control socket.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vmrun::control::Request::parse(data);
});
