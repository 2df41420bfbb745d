//! The vmrun guest agent. In a VM: `vmrun-agent` (vsock port 1024, root `/`). For host tests:
//! `vmrun-agent --unix PATH --root DIR [--upper GUEST_PATH]`. See `vmrun_agent::entry`.

fn main() {
    vmrun_agent::entry::main(std::env::args().skip(1).collect())
}
