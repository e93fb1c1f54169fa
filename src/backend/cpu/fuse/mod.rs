//! Fusions: patterns of ops the plan runs as one step. A fusion changes what
//! a program costs, never what it means (ARCHITECTURE invariant 9): a fused
//! step computes the values of the ops it replaces (elementwise chains bit for
//! bit; products and sums up to summation order), skipped work is provably
//! zero or is done, and each fusion has a test against `Plan::lower_unfused`.
//!
//! Patterns that are trees of ops are written as constants ([`pattern::Pat`])
//! and matched by one function; the chain of elementwise ops, an expression
//! of any shape, is matched by hand. The order in which lowering tries the
//! fusions is in `lower.rs`; the fused kernels are in the math files.

mod causal;
mod chain;
mod facts;
mod pairs;
mod pattern;
mod softmax;

pub(crate) use causal::{causal_product, causal_scores, softmax_backward};
pub(crate) use chain::elementwise_chain;
pub(crate) use facts::{Facts, Fused, Fusion};
pub(crate) use pairs::pairs;
pub(crate) use softmax::masked_softmax;
