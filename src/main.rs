//! The `anemone` command-line tool: thin glue over the library, one file per
//! subcommand in `src/cli/`.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
