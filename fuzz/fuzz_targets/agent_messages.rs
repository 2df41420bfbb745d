//! What a peer of the agent (or of the host library) can send: frames read one after another
//! from a stream, and every request, reply, error and exit decoder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmrun_protocol::agent::{read_frame, ErrorInfo, ExitStatus, Reply, Request};

fuzz_target!(|data: &[u8]| {
    let _ = Request::decode(data);
    let _ = Reply::decode(data);
    let _ = ErrorInfo::decode(data);
    let _ = ExitStatus::decode(data);
    let mut r = data;
    let mut buf = Vec::new();
    for _ in 0..64 {
        match read_frame(&mut r, &mut buf) {
            Ok(Some(_)) => {
                let _ = Request::decode(&buf);
            }
            _ => break,
        }
    }
});
