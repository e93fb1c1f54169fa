//! The one integration-test binary. Fixtures under `tests/fixtures/` carry a
//! header or sidecar naming the script in `scripts/` that made them.

mod ane;
mod bench;
mod blob;
mod cli;
mod common;
mod corpus;
mod cpu_ops;
mod dist;
mod fuzz;
mod generate;
mod hf_cli;
mod hf_io;
mod hf_model;
mod job;
mod kernels;
mod llama2c;
mod lora;
mod lora_run;
mod mil_text;
// Needs MPI installed: `cargo test --features mpi --test it mpi::`.
#[cfg(feature = "mpi")]
mod mpi;
mod readme;
mod report;
mod robust_inputs;
mod robust_runs;
mod tidy;
mod tokenizer;
mod tokens;
mod train_ref;
mod train_run;
mod verify;
