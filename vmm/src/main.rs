fn main() -> std::process::ExitCode {
    vmrun::cli::main()
}
