//! The one integration-test binary. Fixtures under `tests/fixtures/` carry a
//! header or sidecar naming the script in `scripts/` that made them.

mod blob;
mod cpu_ops;
mod generate;
mod llama2c;
mod mil_text;
mod verify;
