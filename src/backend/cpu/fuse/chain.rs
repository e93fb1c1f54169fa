//! Consecutive elementwise ops as one blocked pass: an elementwise op (unary,
//! or binary on operands that are the result's shape, scalars or trailing
//! blocks of it) absorbs each operand that is itself such a result used only
//! here; the absorbed steps become dead. The values are the separate ops'
//! bit for bit (see [`Chain`]). An expression, not a tree pattern, so this
//! matcher is written by hand. fp32 values only.

use super::super::elementwise::{Chain, ChainOp, Leaf};
use super::super::kernel::StepKernel;
use super::super::values::{ValueSlot, Values};
use super::facts::{Facts, Fused, Node};
use crate::mil::{Arg, Operation};

/// The longest chain of elementwise ops fused into one step.
const MAX_CHAIN: usize = 16;

/// `op`'s step with its expression: fused with the operands it absorbs, or
/// its own kernel when it absorbs none (a later op may absorb it).
pub(crate) fn elementwise_chain<'p>(
    values: &Values<'p>,
    facts: &Facts,
    op: &'p Operation,
    kernel: &StepKernel,
    slots: &[ValueSlot],
) -> Option<Fused> {
    let (chain_op, own) = match kernel {
        StepKernel::Unary(u) => (ChainOp::Unary(*u), StepKernel::Unary(*u)),
        StepKernel::Binary(b) => (ChainOp::Binary(b.op()), StepKernel::Binary(b.clone())),
        _ => return None,
    };
    let out = &op.outputs[0].ty;
    if !values.exact(out) {
        return None;
    }
    let params: &[&str] = if matches!(chain_op, ChainOp::Unary(_)) {
        &["x"]
    } else {
        &["x", "y"]
    };
    let mut nodes: Vec<Node> = Vec::new();
    let mut regs = Vec::new();
    let mut absorbed = false;
    for (param, &slot) in params.iter().zip(slots) {
        let single = match op.arg(param) {
            Some(Arg::Var(name)) => values.uses(name) == 1,
            _ => false,
        };
        let inline = facts
            .chains
            .get(&slot)
            .filter(|_| single && values.ty(slot).shape == out.shape);
        if let Some(sub) = inline {
            regs.push(append(&mut nodes, sub));
            absorbed = true;
            continue;
        }
        let Some(leaf) = Leaf::of(&values.ty(slot).shape, &out.shape) else {
            return Some(Fused::plain(own, slots.to_vec()));
        };
        regs.push(leaf_node(&mut nodes, slot, leaf));
    }
    let y = regs.get(1).copied().unwrap_or(regs[0]);
    nodes.push(Node::Op(chain_op, regs[0], y));
    let n_ops = nodes.iter().filter(|n| matches!(n, Node::Op(..))).count();
    if n_ops > MAX_CHAIN {
        return Some(Fused::plain(own, slots.to_vec()));
    }
    let mut fused = match absorbed {
        false => Fused::plain(own, slots.to_vec()),
        true => {
            let (chain, args) = compile(&nodes);
            Fused::plain(StepKernel::Chain(chain), args)
        }
    };
    fused.chain = Some(nodes);
    Some(fused)
}

/// The node of operand `slot` mapped as `leaf`, shared if already present.
fn leaf_node(nodes: &mut Vec<Node>, slot: ValueSlot, leaf: Leaf) -> usize {
    let at = nodes
        .iter()
        .position(|n| matches!(n, Node::Leaf(s, l) if *s == slot && *l == leaf));
    at.unwrap_or_else(|| {
        nodes.push(Node::Leaf(slot, leaf));
        nodes.len() - 1
    })
}

/// Append the expression `sub`, sharing leaves already present; returns the
/// node of its result.
fn append(nodes: &mut Vec<Node>, sub: &[Node]) -> usize {
    let mut map = Vec::with_capacity(sub.len());
    for node in sub {
        let at = match *node {
            Node::Leaf(slot, leaf) => leaf_node(nodes, slot, leaf),
            Node::Op(o, a, b) => {
                nodes.push(Node::Op(o, map[a], map[b]));
                nodes.len() - 1
            }
        };
        map.push(at);
    }
    *map.last().expect("expressions are not empty")
}

/// The chain kernel of an expression and its operand slots: registers are
/// the leaves first, then the ops in order.
fn compile(nodes: &[Node]) -> (Chain, Vec<ValueSlot>) {
    let mut reg_of = vec![0; nodes.len()];
    let (mut leaves, mut args, mut instrs) = (Vec::new(), Vec::new(), Vec::new());
    for (i, node) in nodes.iter().enumerate() {
        if let Node::Leaf(slot, leaf) = node {
            reg_of[i] = leaves.len();
            leaves.push(*leaf);
            args.push(*slot);
        }
    }
    for (i, node) in nodes.iter().enumerate() {
        if let Node::Op(o, a, b) = node {
            reg_of[i] = leaves.len() + instrs.len();
            instrs.push((*o, reg_of[*a], reg_of[*b]));
        }
    }
    (Chain { leaves, instrs }, args)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use crate::backend::Precision;
    use crate::backend::cpu::plan::tests::{program, run};
    use crate::backend::cpu::plan::{Plan, Workspace};

    /// Consecutive elementwise ops whose intermediates are used once run as
    /// one chain step: dense, scalar and repeated (`[T, D]` over `[H, T, D]`)
    /// operands, a shared leaf, a unary op; the values are the separate ops'
    /// bit for bit. A value used twice (`a`) ends a chain.
    #[test]
    fn elementwise_chains_fuse_and_match_the_separate_ops() {
        let body = "        tensor<fp32, [2, 3, 4]> a = mul(x = x, y = c)[name = string(\"a\")];\n\
                    \x20       tensor<fp32, [2, 3, 4]> s = sigmoid(x = a)[name = string(\"s\")];\n\
                    \x20       tensor<fp32, [2, 3, 4]> g = mul(x = a, y = s)[name = string(\"g\")];\n\
                    \x20       tensor<fp32, [2, 3, 4]> h = mul(x = g, y = y)[name = string(\"h\")];\n\
                    \x20       tensor<fp32, [2, 3, 4]> k = sub(x = h, y = fp32(0.25))[name = string(\"k\")];\n\
                    \x20       tensor<fp32, [2, 3, 4]> d = real_div(x = k, y = y)[name = string(\"d\")];\n";
        let sig = "tensor<fp32, [2, 3, 4]> x, tensor<fp32, [1, 3, 4]> c, tensor<fp32, [2, 3, 4]> y";
        let program = program(body, sig, "d");
        let fused = Plan::compile(&program, &BTreeMap::new(), Precision::Fp32).unwrap();
        let separate = Plan::lower_unfused(&program, &BTreeMap::new(), Precision::Fp32).unwrap();
        // a (used by s and g) stays its own step; s, g, h, k, d become one.
        assert_eq!(
            fused.step_labels(),
            [
                "mul -> tensor<fp32, [2, 3, 4]>",
                "fused 5 elementwise ops -> tensor<fp32, [2, 3, 4]>"
            ]
        );
        assert_eq!(separate.step_labels().len(), 6);
        let mut rng = crate::rng::Rng::new(9);
        let mut draw =
            |n: usize| -> Vec<f32> { (0..n).map(|_| 4.0 * rng.next_f32() - 2.0).collect() };
        let (x, c, y) = (draw(24), draw(12), draw(24));
        let args = [&x[..], &c[..], &y[..]];
        let got = run(&fused, &mut Workspace::default(), &args);
        let want = run(&separate, &mut Workspace::default(), &args);
        assert_eq!(got, want);
        // By hand for one element: a = x c, d = (a sigmoid(a) y - 0.25) / y.
        let i = 17;
        let a = x[i] * c[i % 12];
        let hand = (a * crate::math::sigmoid(a) * y[i] - 0.25) / y[i];
        assert_eq!(got[0][i], hand);
    }
}
