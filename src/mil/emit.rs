//! Graph -> MIL text. (being written)
use super::ir::Program;

/// Emit `program` as MIL text in its dialect. Deterministic: same program, same bytes.
pub fn emit(program: &Program) -> String {
    let _ = program;
    todo!("emitter")
}
