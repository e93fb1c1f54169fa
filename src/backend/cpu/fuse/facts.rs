//! What a fusion returns ([`Fused`]) and what lowering remembers about the
//! results of earlier steps for the fusions of later ones ([`Facts`]): the
//! elementwise expression behind each elementwise result, and which values
//! are zero beyond per-row extents. It matches nothing itself.

use std::collections::HashMap;

use super::super::attention::Scores;
use super::super::elementwise::{ChainOp, Leaf};
use super::super::kernel::StepKernel;
use super::super::values::{ValueSlot, Values};
use crate::mil::TensorType;

/// A value known to be zero beyond per-row extents (causal probabilities and
/// their gradient), for the steps that consume it.
#[derive(Clone, Debug)]
pub(crate) struct RowExtents {
    /// The hidden `[B, T]` tensor of row extents.
    pub(crate) ext: ValueSlot,
    pub(crate) t: usize,
    pub(crate) batches: usize,
    /// For probabilities computed by a fused step: it, and its `q, k, mask` slots.
    pub(crate) source: Option<(Scores, [ValueSlot; 3])>,
}

/// A node of an elementwise expression: an operand, or an op on earlier nodes.
#[derive(Clone, Debug)]
pub(crate) enum Node {
    Leaf(ValueSlot, Leaf),
    Op(ChainOp, usize, usize),
}

/// How a fused result is zero beyond row extents.
pub(crate) enum ExtentsOf {
    /// By the step's hidden second result (with the probabilities' source, if any).
    Hidden(Option<(Scores, [ValueSlot; 3])>),
    /// By the extents of another value.
    Same(RowExtents),
}

/// A step replacing an operation (and making the ones it absorbs dead).
pub(crate) struct Fused {
    pub(crate) kernel: StepKernel,
    pub(crate) args: Vec<ValueSlot>,
    /// For an elementwise result: its expression over step operands, which
    /// a consumer may absorb.
    pub(crate) chain: Option<Vec<Node>>,
    /// A hidden second result (row extents) of this type.
    pub(crate) hidden: Option<TensorType>,
    pub(crate) extents: Option<ExtentsOf>,
}

impl Fused {
    pub(crate) fn plain(kernel: StepKernel, args: Vec<ValueSlot>) -> Fused {
        Fused {
            kernel,
            args,
            chain: None,
            hidden: None,
            extents: None,
        }
    }
}

/// What earlier fused steps left for later fusions, by result slot.
#[derive(Default)]
pub(crate) struct Facts {
    pub(crate) extents: HashMap<ValueSlot, RowExtents>,
    pub(crate) chains: HashMap<ValueSlot, Vec<Node>>,
}

impl Facts {
    /// Remember what the step with `results` (hidden ones included) left.
    pub(crate) fn record(
        &mut self,
        values: &Values,
        results: &[ValueSlot],
        chain: Option<Vec<Node>>,
        extents: Option<ExtentsOf>,
    ) {
        if let Some(chain) = chain {
            self.chains.insert(results[0], chain);
        }
        let extents = match extents {
            None => return,
            Some(ExtentsOf::Same(extents)) => extents,
            Some(ExtentsOf::Hidden(source)) => {
                let ty = values.ty(results[1]);
                RowExtents {
                    ext: results[1],
                    batches: ty.shape[0],
                    t: ty.shape[1],
                    source,
                }
            }
        };
        self.extents.insert(results[0], extents);
    }
}

/// A fusion: the step replacing `op` if `op` ends a pattern it fuses, given
/// the op's own kernel and operand slots.
pub(crate) type Fusion = for<'p> fn(
    &Values<'p>,
    &Facts,
    &'p crate::mil::Operation,
    &StepKernel,
    &[ValueSlot],
) -> Option<Fused>;
