//! Shape and dtype inference for every op. (being written)
use super::ir::{Function, Operation, TensorType};
use crate::Result;

/// Infer the result types of `op`, looking up operand types and constant values
/// in `func` (which holds every statement before `op`).
pub fn infer_outputs(func: &Function, op: &Operation) -> Result<Vec<TensorType>> {
    let _ = (func, op);
    todo!("inference")
}
