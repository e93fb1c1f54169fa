//! MIL text -> graph. (being written)
use super::ir::Program;
use crate::Result;

/// Parse MIL text (either dialect) into a program. Errors carry line and column.
pub fn parse(text: &str) -> Result<Program> {
    let _ = text;
    todo!("parser")
}
