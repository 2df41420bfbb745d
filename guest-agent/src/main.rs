//! vmrun-agent: the guest daemon serving exec, upload/download and capture over vsock port
//! 1024. Not implemented yet (its own issue); this binary only says so.

fn main() {
    eprintln!("vmrun-agent: not implemented yet");
    std::process::exit(1);
}
