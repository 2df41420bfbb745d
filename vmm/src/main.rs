//! The `vmrun` binary: the command line, which is also how the library starts each VMM
//! process (`vmrun boot`).

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
