//! The `anemone` command-line tool: thin glue over the library, one file per
//! subcommand in `src/cli/`.

mod cli;

/// mimalloc keeps freed memory for reuse: with glibc's allocator the large
/// short-lived buffers of a training step (faer's packing buffers among them)
/// were mapped and unmapped on every product, 8,000 page faults per
/// `stories15m` step (see `docs/performance.md`). Not on macOS, whose system
/// allocator keeps freed memory too and where mimalloc's C build needs the SDK.
#[cfg(not(target_os = "macos"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}
