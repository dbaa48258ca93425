//! `idgate`: the gateway's command line. Thin: parsing and printing here, the
//! work in the `idgate_gateway` library.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
