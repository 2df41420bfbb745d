//! A snapshot's `state` file, whole: header, length, checksum, body. Most inputs die at the
//! checksum, so half of the runs recompute it over what follows the header: the decoder and
//! the consistency checks then see arbitrary bodies.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmrun::snapshot::{parse_state, with_valid_checksum};

fuzz_target!(|data: &[u8]| {
    let _ = parse_state(data);
    let _ = parse_state(&with_valid_checksum(data));
});
