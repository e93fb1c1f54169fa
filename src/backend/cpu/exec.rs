//! Compiling a MIL [`Program`] into a [`Plan`] and running it.
//!
//! Compilation gives every value a slot, materializes constants once (inline
//! literals, BLOBFILE tensors, `constexpr_*` results) and lowers every other
//! operation to a [`Kernel`] whose parameters are resolved and whose operand and
//! result shapes are checked against the declared types. `reshape` and
//! `identity` lower to nothing: their result is the operand's storage.
//!
//! Every slot then gets a home: a function input, a constant, a function output
//! (the op that defines an output writes straight into the caller's buffer), or
//! a temporary buffer of the plan's [`Workspace`], shared by values whose
//! lifetimes do not overlap. Running a plan is a loop over steps with no lookups
//! by name and, after the first run, no allocation of tensor memory.
//!
//! This module owns the op-independent parts (slots, homes, parameter access
//! through [`OpCtx`], fp16 rounding of results); the math of each op lives in the
//! kernel modules next to it.

use std::collections::{BTreeMap, HashMap};

use rayon::prelude::*;

use super::{attention, constant, elementwise, gemm, reduce, shape};
use crate::backend::Precision;
use crate::mil::op::{Category, ParamKind};
use crate::mil::{Arg, DType, Literal, Op, Operation, Program, TensorType, Value, Var};
use crate::{Error, Result};

/// Index of a value in a running plan.
pub(super) type Slot = usize;

/// A lowered operation: parameters resolved, ready to run on `f32` slices.
#[derive(Debug)]
pub(super) enum Kernel {
    /// `reshape`, `identity`: the plan gives the result the operand's storage
    /// (this variant only marks them; it never runs as a step).
    Copy,
    Unary(elementwise::Unary),
    Binary(elementwise::Binary),
    Select(elementwise::Broadcast),
    Cast(DType),
    Quantize(elementwise::Quantize),
    Dequantize(elementwise::Dequantize),
    Softmax(reduce::Softmax),
    /// `softmax(x * scale + mask)`, fused (see `PlanBuilder::masked_softmax`).
    MaskedSoftmax(reduce::MaskedSoftmax),
    Reduce(reduce::Reduce),
    /// `transpose`, `slice_by_size`: one strided read.
    Gather(shape::View),
    /// `split`: one strided read per result.
    Split(Vec<shape::View>),
    /// `concat`: operand `i` is written to view `i` of the result.
    Concat(shape::Concat),
    Matmul(gemm::Matmul),
    Conv(gemm::Conv),
    Attention(gemm::Attention),
    /// Causal `softmax(Q K^T * scale + mask)` and its row extents (see [`attention`]).
    CausalScores(attention::Scores),
    /// Causal `softmax(Q K^T * scale + mask) V`, the probabilities never stored.
    Attend(attention::Attend),
    /// A product with causal probabilities (or their gradient) as one factor.
    TriMatmul(attention::TriMatmul),
    /// `P * (dP - rowsum(dP * P)) [* scale]` with `dP` a product, fused.
    SoftmaxBackward(attention::SoftmaxBackward),
    /// Consecutive elementwise ops in one pass (see [`elementwise::Chain`]).
    Chain(elementwise::Chain),
    /// Slices, scalar `mul`s and a `concat` rebuilding pairs (see [`shape::Pairs`]).
    Pairs(shape::Pairs),
}

impl Kernel {
    /// Compute the results from the operand values (in parameter order) into
    /// `outs`, overwriting every element.
    fn run(&self, args: &[&[f32]], outs: &mut [&mut [f32]]) {
        let out = &mut *outs[0];
        match self {
            Kernel::Copy => unreachable!("reshapes alias their operand and never run"),
            Kernel::Unary(k) => k.run(args[0], out),
            Kernel::Binary(k) => k.run(args[0], args[1], out),
            Kernel::Select(b) => b.map([args[0], args[1], args[2]], out, |[c, a, b]| {
                if c != 0.0 { a } else { b }
            }),
            Kernel::Cast(dtype) => {
                let dtype = *dtype;
                elementwise::map(args[0], out, move |v| elementwise::convert(v, dtype))
            }
            Kernel::Quantize(k) => k.run(args[0], out),
            Kernel::Dequantize(k) => k.run(args[0], out),
            Kernel::Softmax(k) => k.run(args[0], out),
            Kernel::MaskedSoftmax(k) => k.run(args[0], args[1], out),
            Kernel::Reduce(k) => k.run(args[0], out),
            Kernel::Gather(view) => view.gather(args[0], out),
            Kernel::Split(views) => {
                for (view, out) in views.iter().zip(outs.iter_mut()) {
                    view.gather(args[0], out);
                }
            }
            Kernel::Concat(k) => k.run(args, out),
            Kernel::Matmul(k) => k.run(args[0], args[1], out),
            Kernel::Conv(k) => k.run(args[0], args[1], args.get(2).copied(), out),
            Kernel::Attention(k) => k.run(args[0], args[1], args[2], args.get(3).copied(), out),
            Kernel::CausalScores(k) => {
                let [p, ext] = outs else {
                    unreachable!("causal scores have two results")
                };
                k.run(args[0], args[1], args[2], p, ext)
            }
            Kernel::Attend(k) => k.run(args[0], args[1], args[2], args[3], out),
            Kernel::TriMatmul(k) => k.run(args[0], args[1], args[2], out),
            Kernel::SoftmaxBackward(k) => k.run(args[0], args[1], args[2], args[3], out),
            Kernel::Chain(k) => k.run(args, out),
            Kernel::Pairs(k) => k.run(args[0], out),
        }
    }
}

#[derive(Debug)]
struct Step {
    kernel: Kernel,
    args: Vec<Slot>,
    results: Vec<Slot>,
    /// The op and its result type, for the op profile.
    label: String,
}

/// Where a slot's values live while a plan runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Home {
    Input(usize),
    Constant(usize),
    Output(usize),
    Temp(usize),
}

/// A step's result while the kernel writes it: a temporary buffer or a
/// caller's output, moved out of its home.
enum Taken<'o> {
    Temp(usize, Vec<f32>),
    Output(usize, &'o mut [f32]),
}

impl Taken<'_> {
    fn slice(&mut self) -> &mut [f32] {
        match self {
            Taken::Temp(_, v) => v,
            Taken::Output(_, s) => s,
        }
    }
}

/// The temporary buffers of one plan, allocated on the first run and reused.
#[derive(Debug, Default)]
pub(super) struct Workspace {
    temps: Vec<Vec<f32>>,
}

/// A compiled program: slots, their homes, constants and steps.
#[derive(Debug)]
pub(super) struct Plan {
    /// Function inputs; input `i` lives in slot `i`.
    pub(super) inputs: Vec<Var>,
    /// Function outputs, in signature order.
    pub(super) outputs: Vec<Var>,
    slot_types: Vec<TensorType>,
    homes: Vec<Home>,
    constants: Vec<Vec<f32>>,
    /// Element count of each temporary buffer.
    temp_sizes: Vec<usize>,
    steps: Vec<Step>,
    /// The steps in runs of one, or of several independent large products run
    /// side by side (see [`side_by_side`]): `steps[groups[i]..groups[i + 1]]`.
    groups: Vec<usize>,
    /// Outputs whose value lives elsewhere (an input, a constant, another
    /// output): copied at the end, `(slot, output index)`.
    output_copies: Vec<(Slot, usize)>,
    precision: Precision,
}

impl Plan {
    /// Compile `program`, resolving BLOBFILE constants from `weights`
    /// (`@model_path/weights/<file>` -> file bytes), after the rewrites of
    /// [`rewrite`](super::rewrite) that remove copies.
    pub(super) fn compile(
        program: &Program,
        weights: &BTreeMap<String, Vec<u8>>,
        precision: Precision,
    ) -> Result<Plan> {
        Plan::lower(&super::rewrite::rewrite(program), weights, precision)
    }

    /// Compile `program` exactly as written.
    pub(super) fn lower(
        program: &Program,
        weights: &BTreeMap<String, Vec<u8>>,
        precision: Precision,
    ) -> Result<Plan> {
        Plan::build(program, weights, precision, true)
    }

    /// Compile `program` exactly as written, one step per operation: no
    /// rewrites and no fusions (the reference the fused plans are tested against).
    #[cfg(test)]
    pub(super) fn lower_unfused(
        program: &Program,
        weights: &BTreeMap<String, Vec<u8>>,
        precision: Precision,
    ) -> Result<Plan> {
        Plan::build(program, weights, precision, false)
    }

    fn build(
        program: &Program,
        weights: &BTreeMap<String, Vec<u8>>,
        precision: Precision,
        fuse: bool,
    ) -> Result<Plan> {
        let func = &program.main;
        let mut b = PlanBuilder {
            weights,
            precision,
            fuse,
            tri: HashMap::new(),
            chains: HashMap::new(),
            slots: HashMap::new(),
            literals: HashMap::new(),
            slot_types: Vec::new(),
            alias_of: Vec::new(),
            constants: Vec::new(),
            steps: Vec::new(),
            defs: HashMap::new(),
            uses: use_counts(func),
        };
        for input in &func.inputs {
            b.define(input, None)?;
        }
        for op in &func.ops {
            b.lower(op)?;
        }
        let mut output_slots = Vec::new();
        let mut outputs = Vec::new();
        for name in &func.outputs {
            let slot = *b.slots.get(name.as_str()).ok_or_else(|| {
                Error::Verify(format!(
                    "function output `{name}` is not defined by any input or operation"
                ))
            })?;
            output_slots.push(slot);
            outputs.push(Var::new(name.clone(), b.slot_types[slot].clone()));
        }
        let n_slots = b.slot_types.len();
        let root = |slot: Slot| b.alias_of[slot].unwrap_or(slot);
        // Every op was lowered, so checked; steps whose results nothing reads
        // (a recomputed attention output in a backward kernel, say) are dropped.
        let mut needed = vec![false; n_slots];
        for &slot in &output_slots {
            needed[root(slot)] = true;
        }
        let mut kept = Vec::with_capacity(b.steps.len());
        for step in std::mem::take(&mut b.steps).into_iter().rev() {
            if step.results.iter().any(|&r| needed[root(r)]) {
                for &arg in &step.args {
                    needed[root(arg)] = true;
                }
                kept.push(step);
            }
        }
        kept.reverse();
        b.steps = kept;
        let mut homes: Vec<Option<Home>> = vec![None; n_slots];
        for (i, home) in homes.iter_mut().take(func.inputs.len()).enumerate() {
            *home = Some(Home::Input(i));
        }
        for (i, (slot, _)) in b.constants.iter().enumerate() {
            homes[*slot] = Some(Home::Constant(i));
        }
        let mut output_copies = Vec::new();
        for (j, &slot) in output_slots.iter().enumerate() {
            let r = root(slot);
            if homes[r].is_none() {
                homes[r] = Some(Home::Output(j));
            } else {
                output_copies.push((slot, j));
            }
        }
        // Temporaries: a buffer is free again after the last step that touches
        // any slot stored in it; a result takes a free buffer of its exact size.
        let mut last_use = vec![0usize; n_slots];
        for (step_idx, step) in b.steps.iter().enumerate() {
            for &slot in step.args.iter().chain(&step.results) {
                last_use[root(slot)] = step_idx;
            }
        }
        let mut temp_sizes: Vec<usize> = Vec::new();
        let mut free: Vec<usize> = Vec::new();
        for (step_idx, step) in b.steps.iter().enumerate() {
            for &slot in &step.results {
                let r = root(slot);
                if homes[r].is_none() {
                    let size = b.slot_types[r].numel();
                    let temp = match free.iter().position(|&t| temp_sizes[t] == size) {
                        Some(i) => free.swap_remove(i),
                        None => {
                            temp_sizes.push(size);
                            temp_sizes.len() - 1
                        }
                    };
                    homes[r] = Some(Home::Temp(temp));
                }
            }
            let mut done: Vec<usize> = step
                .args
                .iter()
                .chain(&step.results)
                .map(|&slot| root(slot))
                .filter(|&r| last_use[r] == step_idx)
                .filter_map(|r| match homes[r] {
                    Some(Home::Temp(t)) => Some(t),
                    _ => None,
                })
                .collect();
            done.sort_unstable();
            done.dedup();
            free.extend(done);
        }
        let homes: Vec<Home> = (0..n_slots)
            .map(|slot| homes[root(slot)].unwrap_or(Home::Temp(usize::MAX)))
            .collect();
        let groups = side_by_side(&b.steps, &homes);
        Ok(Plan {
            inputs: func.inputs.clone(),
            outputs,
            slot_types: b.slot_types,
            homes,
            constants: b.constants.into_iter().map(|(_, data)| data).collect(),
            temp_sizes,
            steps: b.steps,
            groups,
            output_copies,
            precision,
        })
    }

    /// Run once on fresh buffers: one vector per input in, per output out.
    #[cfg(test)]
    pub(super) fn run_once(&self, inputs: &[Vec<f32>]) -> Vec<Vec<f32>> {
        let args: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
        let mut outs: Vec<Vec<f32>> = self
            .outputs
            .iter()
            .map(|v| vec![0.0; v.ty.numel()])
            .collect();
        self.execute_into(&mut Workspace::default(), &args, &mut outs)
            .unwrap();
        outs
    }

    /// How many steps each run of [`side_by_side`] has, in order.
    #[cfg(test)]
    pub(super) fn group_sizes(&self) -> Vec<usize> {
        self.groups.windows(2).map(|g| g[1] - g[0]).collect()
    }

    /// The label of every step, in order (for tests of what fused).
    #[cfg(test)]
    pub(super) fn step_labels(&self) -> Vec<&str> {
        self.steps.iter().map(|s| s.label.as_str()).collect()
    }

    /// The values of `slot` while running.
    fn value<'v>(
        &'v self,
        slot: Slot,
        inputs: &[&'v [f32]],
        temps: &'v [Vec<f32>],
        outputs: &'v [&mut [f32]],
    ) -> &'v [f32] {
        match self.homes[slot] {
            Home::Input(i) => inputs[i],
            Home::Constant(i) => &self.constants[i],
            Home::Output(j) => outputs[j],
            Home::Temp(t) => &temps[t],
        }
    }

    /// Run the plan on input values (one slice per function input, each of the
    /// input's element count), writing every output into `outputs` (one slice
    /// per function output, each of the output's element count).
    pub(super) fn execute(
        &self,
        workspace: &mut Workspace,
        inputs: &[&[f32]],
        outputs: &mut [&mut [f32]],
    ) -> Result<()> {
        if inputs.len() != self.inputs.len() || outputs.len() != self.outputs.len() {
            return Err(run_error(format!(
                "the program has {} inputs and {} outputs but {} and {} were given",
                self.inputs.len(),
                self.outputs.len(),
                inputs.len(),
                outputs.len()
            )));
        }
        let bound = [
            (
                inputs.iter().map(|d| d.len()).collect::<Vec<_>>(),
                &self.inputs,
            ),
            (outputs.iter().map(|o| o.len()).collect(), &self.outputs),
        ];
        for (lens, vars) in bound {
            for (len, var) in lens.into_iter().zip(vars.iter()) {
                if len != var.ty.numel() {
                    return Err(run_error(format!(
                        "`{}` of type {} needs {} values, got {len}",
                        var.name,
                        var.ty,
                        var.ty.numel()
                    )));
                }
            }
        }
        if workspace.temps.len() != self.temp_sizes.len() {
            workspace.temps = self.temp_sizes.iter().map(|&n| vec![0.0; n]).collect();
        }
        let temps = &mut workspace.temps;
        let profiling = super::profile::enabled();
        for group in self.groups.windows(2) {
            let steps = &self.steps[group[0]..group[1]];
            // Results move out of their homes while the kernels write them.
            let mut taken: Vec<Vec<Taken>> = steps
                .iter()
                .map(|step| {
                    step.results
                        .iter()
                        .map(|&slot| match self.homes[slot] {
                            Home::Temp(t) => Taken::Temp(t, std::mem::take(&mut temps[t])),
                            Home::Output(j) => Taken::Output(j, std::mem::take(&mut outputs[j])),
                            home => {
                                unreachable!("results live in temporaries or outputs, not {home:?}")
                            }
                        })
                        .collect()
                })
                .collect();
            {
                let run = |(step, taken): (&Step, &mut Vec<Taken>)| {
                    let start = profiling.then(std::time::Instant::now);
                    let args: Vec<&[f32]> = step
                        .args
                        .iter()
                        .map(|&slot| self.value(slot, inputs, temps, outputs))
                        .collect();
                    let mut outs: Vec<&mut [f32]> = taken.iter_mut().map(Taken::slice).collect();
                    step.kernel.run(&args, &mut outs);
                    if let Some(start) = start {
                        super::profile::record(&step.label, start.elapsed());
                    }
                };
                if steps.len() == 1 {
                    run((&steps[0], &mut taken[0]));
                } else {
                    steps.par_iter().zip(taken.par_iter_mut()).for_each(run);
                }
            }
            for (step, taken) in steps.iter().zip(taken) {
                for (&slot, mut data) in step.results.iter().zip(taken) {
                    if self.rounds(&self.slot_types[slot]) {
                        elementwise::round_to_fp16(data.slice());
                    }
                    match data {
                        Taken::Temp(t, v) => temps[t] = v,
                        Taken::Output(j, s) => outputs[j] = s,
                    }
                }
            }
        }
        for &(slot, j) in &self.output_copies {
            let out = std::mem::take(&mut outputs[j]);
            out.copy_from_slice(self.value(slot, inputs, temps, outputs));
            outputs[j] = out;
        }
        Ok(())
    }

    /// [`Plan::execute`] into vectors (one per function output, each of the
    /// output's element count).
    pub(super) fn execute_into(
        &self,
        workspace: &mut Workspace,
        inputs: &[&[f32]],
        outputs: &mut [Vec<f32>],
    ) -> Result<()> {
        let mut outs: Vec<&mut [f32]> = outputs.iter_mut().map(Vec::as_mut_slice).collect();
        self.execute(workspace, inputs, &mut outs)
    }

    /// Whether values of type `ty` are rounded to fp16 in this plan's precision.
    fn rounds(&self, ty: &TensorType) -> bool {
        self.precision == Precision::Fp16 && ty.dtype == DType::Fp16
    }
}

/// How many times each value is an argument or a function output.
pub(super) fn use_counts(func: &crate::mil::Function) -> HashMap<&str, usize> {
    fn count<'a>(arg: &'a Arg, uses: &mut HashMap<&'a str, usize>) {
        match arg {
            Arg::Var(name) => *uses.entry(name.as_str()).or_default() += 1,
            Arg::Tuple(items) => items.iter().for_each(|a| count(a, uses)),
            Arg::Lit(_) => {}
        }
    }
    let mut uses = HashMap::new();
    for op in &func.ops {
        for (_, arg) in &op.args {
            count(arg, &mut uses);
        }
    }
    for name in &func.outputs {
        *uses.entry(name.as_str()).or_default() += 1;
    }
    uses
}

/// Products at least this large (multiply-adds) may run side by side.
const SIDE_BY_SIDE_FLOPS: usize = 1 << 24;

/// Splits the steps into runs (as start indices, with the end appended): a run
/// is one step, or consecutive large products that are independent: none reads
/// or overwrites a buffer another one writes. Two products each on its own
/// core run faster than one after the other each split over both (measured on
/// Ice Lake, 2 threads: 2048x768x512 products at 170-190 GFLOP/s against
/// 120-140), and rayon balances the pair when one finishes first.
fn side_by_side(steps: &[Step], homes: &[Home]) -> Vec<usize> {
    let large = |s: &Step| matches!(&s.kernel, Kernel::Matmul(m) if m.multiply_adds() >= SIDE_BY_SIDE_FLOPS);
    let writes = |s: &Step| s.results.iter().map(|&r| homes[r]).collect::<Vec<_>>();
    let touches = |s: &Step| {
        s.args
            .iter()
            .chain(&s.results)
            .map(|&r| homes[r])
            .collect::<Vec<_>>()
    };
    let mut starts = Vec::with_capacity(steps.len() + 1);
    let mut i = 0;
    while i < steps.len() {
        starts.push(i);
        let mut j = i + 1;
        if large(&steps[i]) {
            while j < steps.len()
                && large(&steps[j])
                && steps[i..j].iter().all(|a| {
                    let (b, wa, wb) = (&steps[j], writes(a), writes(&steps[j]));
                    !touches(b).iter().any(|h| wa.contains(h))
                        && !touches(a).iter().any(|h| wb.contains(h))
                })
            {
                j += 1;
            }
        }
        i = j;
    }
    starts.push(steps.len());
    starts
}

/// A copy of an elementwise kernel (the chain fusion hands it back unchanged).
fn kernel_clone(kernel: &Kernel) -> Kernel {
    match kernel {
        Kernel::Unary(u) => Kernel::Unary(*u),
        Kernel::Binary(b) => Kernel::Binary(b.clone()),
        _ => unreachable!("only elementwise kernels are cloned"),
    }
}

/// `op -> result type` (the first result), naming fused steps by what they fuse.
fn step_label(op: &Operation, kernel: &Kernel) -> String {
    let name = match kernel {
        Kernel::MaskedSoftmax(_) => "softmax(x*s+mask)".to_string(),
        Kernel::CausalScores(_) => "causal softmax(Q.K^T*s+mask)".to_string(),
        Kernel::Attend(_) => "causal attention softmax(Q.K^T*s+mask).V".to_string(),
        Kernel::TriMatmul(k) => format!("matmul(causal P{})", if k.p_t { "^T" } else { "" }),
        Kernel::SoftmaxBackward(_) => "softmax backward P*(dP-rowsum(dP*P))".to_string(),
        Kernel::Chain(k) => format!("fused {} elementwise ops", k.instrs.len()),
        Kernel::Pairs(_) => "pairs (slices, mul, concat)".to_string(),
        Kernel::Matmul(m) => format!("matmul{}", m.flags_label()),
        _ => op.op.to_string(),
    };
    match op.outputs.first() {
        Some(out) => format!("{name} -> {}", out.ty),
        None => name,
    }
}

fn run_error(msg: String) -> Error {
    Error::Backend {
        backend: "cpu",
        step: "run",
        msg,
    }
}

/// A value known to be zero beyond per-row extents (causal probabilities and
/// their gradient), for the steps that consume it.
#[derive(Clone, Debug)]
struct Tri {
    /// The hidden `[B, T]` tensor of row extents.
    ext: Slot,
    t: usize,
    batches: usize,
    /// For probabilities computed by a fused step: it, and its `q, k, mask` slots.
    source: Option<(attention::Scores, [Slot; 3])>,
}

/// A node of an elementwise expression: an operand, or an op on earlier nodes.
#[derive(Clone, Debug)]
enum Node {
    Leaf(Slot, elementwise::Leaf),
    Op(elementwise::ChainOp, usize, usize),
}

/// The longest chain of elementwise ops fused into one step.
const MAX_CHAIN: usize = 16;

/// A fused step replacing an operation (and making the ones it absorbs dead).
struct Fused {
    kernel: Kernel,
    args: Vec<Slot>,
    /// For an elementwise result: its expression over step operands, which
    /// a consumer may absorb.
    chain: Option<Vec<Node>>,
    /// A hidden second result (row extents) of this type.
    hidden: Option<TensorType>,
    /// How the result is zero beyond row extents: `Some(None)` means by the
    /// hidden result (with the probabilities' source, if any).
    tri: Option<TriOf>,
}

enum TriOf {
    Hidden(Option<(attention::Scores, [Slot; 3])>),
    Same(Tri),
}

impl Fused {
    fn plain(kernel: Kernel, args: Vec<Slot>) -> Fused {
        Fused {
            kernel,
            args,
            chain: None,
            hidden: None,
            tri: None,
        }
    }
}

/// The operands of a `matmul` whose operands both have the batch dimensions of
/// its result (no broadcasting): slots, transpose flags, and the batch count.
struct MatmulParts {
    x: Slot,
    y: Slot,
    tx: bool,
    ty: bool,
    batches: usize,
}

struct PlanBuilder<'p> {
    weights: &'p BTreeMap<String, Vec<u8>>,
    precision: Precision,
    /// Whether to fuse op patterns into single steps.
    fuse: bool,
    /// Values zero beyond row extents, by slot.
    tri: HashMap<Slot, Tri>,
    /// Elementwise results, by slot: their expressions (for [`Kernel::Chain`]).
    chains: HashMap<Slot, Vec<Node>>,
    /// Tensor values by name (string constants have no slot).
    slots: HashMap<&'p str, Slot>,
    /// Values of `const` operations, for parameters that must be constant.
    literals: HashMap<&'p str, &'p Literal>,
    slot_types: Vec<TensorType>,
    /// For `reshape`/`identity` results: the slot whose storage they share.
    alias_of: Vec<Option<Slot>>,
    constants: Vec<(Slot, Vec<f32>)>,
    steps: Vec<Step>,
    /// The operation defining each value lowered so far, and how many times
    /// each value is used in the program (for fusions).
    defs: HashMap<&'p str, &'p Operation>,
    uses: HashMap<&'p str, usize>,
}

impl<'p> PlanBuilder<'p> {
    /// Give `var` a slot; `op` names the defining operation for errors.
    fn define(&mut self, var: &'p Var, op: Option<&Operation>) -> Result<Slot> {
        if self.slots.contains_key(var.name.as_str())
            || self.literals.contains_key(var.name.as_str())
        {
            let msg = format!("value `{}` is defined twice", var.name);
            return Err(match op {
                Some(op) => op_error(op, msg),
                None => Error::Verify(msg),
            });
        }
        let slot = self.new_slot(var.ty.clone());
        self.slots.insert(&var.name, slot);
        Ok(slot)
    }

    fn new_slot(&mut self, ty: TensorType) -> Slot {
        self.slot_types.push(ty);
        self.alias_of.push(None);
        self.slot_types.len() - 1
    }

    /// Store constant `data` for `slot`, rounded as the precision demands.
    fn set_constant(&mut self, slot: Slot, mut data: Vec<f32>) {
        if self.precision == Precision::Fp16 && self.slot_types[slot].dtype == DType::Fp16 {
            elementwise::round_to_fp16(&mut data);
        }
        self.constants.push((slot, data));
    }

    fn lower(&mut self, op: &'p Operation) -> Result<()> {
        check_params(op)?;
        match op.op {
            Op::Const => {
                let [out] = op.outputs.as_slice() else {
                    return Err(op_error(op, "`const` must have exactly one result"));
                };
                let lit = op
                    .attr("val")
                    .ok_or_else(|| op_error(op, "missing the `val` attribute"))?;
                if lit.ty != out.ty {
                    return Err(op_error(
                        op,
                        format!(
                            "`val` has type {} but the result is declared {}",
                            lit.ty, out.ty
                        ),
                    ));
                }
                if lit.ty.dtype == DType::String {
                    if self.slots.contains_key(out.name.as_str())
                        || self.literals.contains_key(out.name.as_str())
                    {
                        return Err(op_error(
                            op,
                            format!("value `{}` is defined twice", out.name),
                        ));
                    }
                } else {
                    let data = constant::materialize(lit, self.weights, op)?;
                    let slot = self.define(out, Some(op))?;
                    self.set_constant(slot, data);
                }
                self.literals.insert(&out.name, lit);
                Ok(())
            }
            Op::ConstexprAffineDequantize => {
                let data = constant::affine_dequantize(&self.ctx(op), self.weights)?;
                let slot = self.define(&op.outputs[0], Some(op))?;
                self.set_constant(slot, data);
                Ok(())
            }
            _ => {
                let kernel = lower_kernel(&self.ctx(op))?;
                let fused = match self.fuse {
                    true => self.fused(op, &kernel)?,
                    false => None,
                };
                let fused = match fused {
                    Some(f) => f,
                    None => Fused::plain(kernel, self.operand_slots(op)?),
                };
                let Fused {
                    kernel,
                    args,
                    chain,
                    hidden,
                    tri,
                } = fused;
                for out in &op.outputs {
                    self.defs.insert(&out.name, op);
                }
                let mut results = Vec::new();
                for out in &op.outputs {
                    results.push(self.define(out, Some(op))?);
                }
                if let Kernel::Copy = kernel {
                    // Same values, same element count: share the operand's storage.
                    let source = args[0];
                    self.alias_of[results[0]] = Some(self.alias_of[source].unwrap_or(source));
                    return Ok(());
                }
                if let Some(ty) = hidden {
                    results.push(self.new_slot(ty));
                }
                if let Some(chain) = chain {
                    self.chains.insert(results[0], chain);
                }
                match tri {
                    Some(TriOf::Hidden(source)) => {
                        let ty = &self.slot_types[results[1]];
                        let tri = Tri {
                            ext: results[1],
                            batches: ty.shape[0],
                            t: ty.shape[1],
                            source,
                        };
                        self.tri.insert(results[0], tri);
                    }
                    Some(TriOf::Same(tri)) => {
                        self.tri.insert(results[0], tri);
                    }
                    None => {}
                }
                let label = step_label(op, &kernel);
                self.steps.push(Step {
                    kernel,
                    args,
                    results,
                    label,
                });
                Ok(())
            }
        }
    }

    /// `softmax(x * scale + mask)` along the last axis, with `scale` a constant
    /// scalar, `mask` of shape `[1, .., 1, L, S]` and the two intermediate values
    /// used nowhere else: one pass over the scores instead of three (the
    /// `mul` and `add` steps become dead and are dropped).
    fn masked_softmax(&mut self, op: &'p Operation) -> Result<Option<(Kernel, Vec<Slot>)>> {
        let Some((scores, mask, scale)) = self.masked_softmax_parts(op)? else {
            return Ok(None);
        };
        let x = &self.slot_types[self.slots[scores]];
        let rank = x.rank();
        let round = self.precision == Precision::Fp16 && x.dtype == DType::Fp16;
        let kernel = Kernel::MaskedSoftmax(reduce::MaskedSoftmax::new(
            scale,
            x.shape[rank - 1],
            x.shape[rank - 2],
            round,
        ));
        let args = vec![self.slots[scores], self.slots[mask]];
        Ok(Some((kernel, args)))
    }

    /// The scores, mask and scale of a `softmax(x * scale + mask)` that
    /// [`PlanBuilder::masked_softmax`] fuses.
    fn masked_softmax_parts(&self, op: &'p Operation) -> Result<Option<(&'p str, &'p str, f32)>> {
        if op.op != Op::Softmax {
            return Ok(None);
        }
        let single = |name: &str| self.uses.get(name) == Some(&1);
        let var = |op: &'p Operation, p: &str| match op.arg(p) {
            Some(Arg::Var(name)) => Some(name.as_str()),
            _ => None,
        };
        let Some(added) = var(op, "x") else {
            return Ok(None);
        };
        let Some(&add) = self.defs.get(added) else {
            return Ok(None);
        };
        let (Some(scaled), Some(mask)) = (var(add, "x"), var(add, "y")) else {
            return Ok(None);
        };
        let Some(&mul) = self.defs.get(scaled) else {
            return Ok(None);
        };
        let Some(scores) = var(mul, "x") else {
            return Ok(None);
        };
        let ty = |name: &str| self.slots.get(name).map(|&s| &self.slot_types[s]);
        let scale = match mul.arg("y") {
            Some(Arg::Lit(lit)) => Some(lit),
            Some(Arg::Var(name)) => self.literals.get(name.as_str()).copied(),
            _ => None,
        };
        let scale = scale
            .filter(|l| l.ty.numel() == 1)
            .and_then(|l| l.as_floats())
            .map(|v| v[0]);
        let (Some(x), Some(m), Some(scale)) = (ty(scores), ty(mask), scale) else {
            return Ok(None);
        };
        let rank = x.rank();
        let axis = self.ctx(op).int("axis")?.unwrap_or(-1);
        let fits = add.op == Op::Add
            && mul.op == Op::Mul
            && single(added)
            && single(scaled)
            && rank >= 2
            && (axis == -1 || axis == rank as i64 - 1)
            && m.dtype == x.dtype
            && m.rank() == rank
            && m.shape[rank - 2..] == x.shape[rank - 2..]
            && m.shape[..rank - 2].iter().all(|&d| d == 1)
            && [add, mul, op].iter().all(|o| o.outputs[0].ty == *x);
        Ok(fits.then_some((scores, mask, scale)))
    }

    /// The fused step for `op`, if it ends a pattern this builder fuses.
    fn fused(&mut self, op: &'p Operation, kernel: &Kernel) -> Result<Option<Fused>> {
        if let Some(f) = self.causal_scores(op)? {
            return Ok(Some(f));
        }
        if let Some((kernel, args)) = self.masked_softmax(op)? {
            return Ok(Some(Fused::plain(kernel, args)));
        }
        if let Some(f) = self.causal_product(op)? {
            return Ok(Some(f));
        }
        if let Some(f) = self.softmax_backward(op)? {
            return Ok(Some(f));
        }
        if let Some(f) = self.pairs(op)? {
            return Ok(Some(f));
        }
        self.elementwise_chain(op, kernel)
    }

    /// `concat((a, b), axis = -1)` of two one-element slices along the last
    /// axis of one tensor `x` of the result's shape, each slice possibly times
    /// a constant scalar, every intermediate used only here: one pass over `x`.
    fn pairs(&mut self, op: &'p Operation) -> Result<Option<Fused>> {
        let out = &op.outputs[0].ty;
        let r = out.rank();
        if op.op != Op::Concat || r == 0 || out.shape[r - 1] != 2 || !self.exact(out) {
            return Ok(None);
        }
        let ctx = self.ctx(op);
        let axis = ctx.int("axis")?;
        if !matches!(axis, Some(a) if a == -1 || a == r as i64 - 1)
            || ctx.flag("interleave")?.unwrap_or(false)
        {
            return Ok(None);
        }
        let Some(Arg::Tuple(values)) = op.arg("values") else {
            return Ok(None);
        };
        let single = |name: &str| self.uses.get(name) == Some(&1);
        let mut source: Option<&str> = None;
        let mut from = [(0usize, 1.0f32); 2];
        if values.len() != 2 {
            return Ok(None);
        }
        for (k, value) in values.iter().enumerate() {
            let Arg::Var(name) = value else {
                return Ok(None);
            };
            let mut name = name.as_str();
            if !single(name) {
                return Ok(None);
            }
            let mut factor = 1.0;
            if let Some(&mul) = self.defs.get(name).filter(|d| d.op == Op::Mul) {
                let (inner, c) = match (self.scalar_of(mul, "x"), self.scalar_of(mul, "y")) {
                    (None, Some(c)) => (Self::var_of(mul, "x"), c),
                    (Some(c), None) => (Self::var_of(mul, "y"), c),
                    _ => return Ok(None),
                };
                let Some(inner) = inner else {
                    return Ok(None);
                };
                if !single(inner) {
                    return Ok(None);
                }
                (name, factor) = (inner, c);
            }
            let Some(slice) = self.defs.get(name).filter(|d| d.op == Op::SliceBySize) else {
                return Ok(None);
            };
            let Some(x) = Self::var_of(slice, "x") else {
                return Ok(None);
            };
            let sctx = self.ctx(slice);
            let (Some(begin), Some(size)) = (sctx.ints("begin")?, sctx.ints("size")?) else {
                return Ok(None);
            };
            let mut want_size: Vec<i64> = out.shape.iter().map(|&d| d as i64).collect();
            want_size[r - 1] = 1;
            let col = begin.last().copied().unwrap_or(-1);
            let fits = self.type_of(x) == Some(out)
                && source.is_none_or(|s| s == x)
                && begin.len() == r
                && begin[..r - 1].iter().all(|&b| b == 0)
                && (col == 0 || col == 1)
                && size == want_size.as_slice();
            if !fits {
                return Ok(None);
            }
            source = Some(x);
            from[k] = (col as usize, factor);
        }
        let x = self.slots[source.expect("two values")];
        Ok(Some(Fused::plain(
            Kernel::Pairs(shape::Pairs { from }),
            vec![x],
        )))
    }

    /// An elementwise op (unary, or binary on operands that are the result's
    /// shape, scalars or trailing blocks of it) absorbing each operand that is
    /// itself such a result used only here; the absorbed steps become dead.
    fn elementwise_chain(&mut self, op: &'p Operation, kernel: &Kernel) -> Result<Option<Fused>> {
        use elementwise::{Chain, ChainOp, Leaf};
        let (chain_op, params): (ChainOp, &[&str]) = match kernel {
            Kernel::Unary(u) => (ChainOp::Unary(*u), &["x"]),
            Kernel::Binary(b) => (ChainOp::Binary(b.op()), &["x", "y"]),
            _ => return Ok(None),
        };
        let out = &op.outputs[0].ty;
        if !self.exact(out) {
            return Ok(None);
        }
        let slots = self.operand_slots(op)?;
        let mut nodes: Vec<Node> = Vec::new();
        let mut regs = Vec::new();
        let mut absorbed = false;
        for (param, &slot) in params.iter().zip(&slots) {
            let name = Self::var_of(op, param);
            let inline = self.chains.get(&slot).filter(|_| {
                name.is_some_and(|n| self.uses.get(n) == Some(&1))
                    && self.slot_types[slot].shape == out.shape
            });
            if let Some(sub) = inline {
                // Append the operand's expression, sharing leaves already present.
                let mut map = Vec::with_capacity(sub.len());
                for node in sub {
                    let at = match node {
                        Node::Leaf(s, l) => nodes
                            .iter()
                            .position(|n| matches!(n, Node::Leaf(s2, l2) if s2 == s && l2 == l)),
                        Node::Op(..) => None,
                    };
                    let at = at.unwrap_or_else(|| {
                        nodes.push(match *node {
                            Node::Op(o, a, b) => Node::Op(o, map[a], map[b]),
                            ref leaf => leaf.clone(),
                        });
                        nodes.len() - 1
                    });
                    map.push(at);
                }
                regs.push(*map.last().expect("expressions are not empty"));
                absorbed = true;
                continue;
            }
            let Some(leaf) = Leaf::of(&self.slot_types[slot].shape, &out.shape) else {
                return Ok(Some(Fused::plain(kernel_clone(kernel), slots)));
            };
            let at = nodes
                .iter()
                .position(|n| matches!(n, Node::Leaf(s2, l2) if *s2 == slot && *l2 == leaf));
            regs.push(at.unwrap_or_else(|| {
                nodes.push(Node::Leaf(slot, leaf));
                nodes.len() - 1
            }));
        }
        let y = regs.get(1).copied().unwrap_or(regs[0]);
        nodes.push(Node::Op(chain_op, regs[0], y));
        let n_ops = nodes.iter().filter(|n| matches!(n, Node::Op(..))).count();
        if n_ops > MAX_CHAIN {
            return Ok(Some(Fused::plain(kernel_clone(kernel), slots)));
        }
        if !absorbed {
            let mut f = Fused::plain(kernel_clone(kernel), slots);
            f.chain = Some(nodes);
            return Ok(Some(f));
        }
        // Registers: leaves first, then ops in order.
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
        let mut f = Fused::plain(Kernel::Chain(Chain { leaves, instrs }), args);
        f.chain = Some(nodes);
        Ok(Some(f))
    }

    /// Whether values of `ty` are computed without fp16 rounding (fusions
    /// skip the roundings between the ops they merge, so only these fuse).
    fn exact(&self, ty: &TensorType) -> bool {
        ty.dtype == DType::Fp32 || self.precision == Precision::Fp32
    }

    fn var_of(op: &'p Operation, param: &str) -> Option<&'p str> {
        match op.arg(param) {
            Some(Arg::Var(name)) => Some(name.as_str()),
            _ => None,
        }
    }

    /// The value of a constant scalar operand (inline or a `const`).
    fn scalar_of(&self, op: &Operation, param: &str) -> Option<f32> {
        let lit = match op.arg(param)? {
            Arg::Lit(lit) => lit,
            Arg::Var(name) => self.literals.get(name.as_str())?,
            Arg::Tuple(_) => return None,
        };
        (lit.ty.numel() == 1).then(|| lit.as_floats().map(|v| v[0]))?
    }

    fn type_of(&self, name: &str) -> Option<&TensorType> {
        self.slots.get(name).map(|&s| &self.slot_types[s])
    }

    /// The operands of `matmul` `op` if both are tensors with its result's batch
    /// dimensions and rank.
    fn matmul_parts(&self, op: &'p Operation) -> Result<Option<MatmulParts>> {
        if op.op != Op::Matmul {
            return Ok(None);
        }
        let (Some(x), Some(y)) = (Self::var_of(op, "x"), Self::var_of(op, "y")) else {
            return Ok(None);
        };
        let (Some(&xs), Some(&ys)) = (self.slots.get(x), self.slots.get(y)) else {
            return Ok(None);
        };
        let out = &op.outputs[0].ty;
        let r = out.rank();
        let same_batch = |t: &TensorType| t.rank() == r && t.shape[..r - 2] == out.shape[..r - 2];
        if r < 2 || !same_batch(&self.slot_types[xs]) || !same_batch(&self.slot_types[ys]) {
            return Ok(None);
        }
        let ctx = self.ctx(op);
        Ok(Some(MatmulParts {
            x: xs,
            y: ys,
            tx: ctx.flag("transpose_x")?.unwrap_or(false),
            ty: ctx.flag("transpose_y")?.unwrap_or(false),
            batches: out.shape[..r - 2].iter().product(),
        }))
    }

    /// `softmax(matmul(q, k^T) * scale + mask)` with `mask` a constant whose
    /// rows end in skippable columns (the causal mask): the probabilities,
    /// computed blockwise without the skipped columns, and their row extents.
    fn causal_scores(&mut self, op: &'p Operation) -> Result<Option<Fused>> {
        let Some((scores, mask, scale)) = self.masked_softmax_parts(op)? else {
            return Ok(None);
        };
        let x = &self.slot_types[self.slots[scores]];
        let r = x.rank();
        let t = x.shape[r - 1];
        let Some(&mm) = self.defs.get(scores) else {
            return Ok(None);
        };
        if x.shape[r - 2] != t || !self.exact(x) || self.uses.get(scores) != Some(&1) {
            return Ok(None);
        }
        let Some(parts) = self.matmul_parts(mm)? else {
            return Ok(None);
        };
        let mask_slot = self.slots[mask];
        let Some((_, mask_data)) = self.constants.iter().find(|(s, _)| *s == mask_slot) else {
            return Ok(None);
        };
        let Some(causal) = attention::CausalMask::analyze(mask_data, t) else {
            return Ok(None);
        };
        let d = match parts.tx {
            false => self.slot_types[parts.x].shape[r - 1],
            true => self.slot_types[parts.x].shape[r - 2],
        };
        let layout = |t_: bool| attention::Layout {
            rows: t,
            cols: d,
            t: t_,
        };
        let kernel = attention::Scores {
            batches: parts.batches,
            q: layout(parts.tx),
            k: layout(!parts.ty),
            scale,
            mask: causal,
        };
        let args = vec![parts.x, parts.y, mask_slot];
        Ok(Some(Fused {
            kernel: Kernel::CausalScores(kernel.clone()),
            args: args.clone(),
            chain: None,
            hidden: Some(TensorType::new(DType::Fp32, vec![parts.batches, t])),
            tri: Some(TriOf::Hidden(Some((kernel, [args[0], args[1], args[2]])))),
        }))
    }

    /// A `matmul` with causal probabilities (or their gradient) as one
    /// operand: blockwise without the zero blocks; `P V` straight from the
    /// scores' operands when `P` comes from [`PlanBuilder::causal_scores`].
    fn causal_product(&mut self, op: &'p Operation) -> Result<Option<Fused>> {
        let Some(parts) = self.matmul_parts(op)? else {
            return Ok(None);
        };
        let out = &op.outputs[0].ty;
        let r = out.rank();
        let (m, n) = (out.shape[r - 2], out.shape[r - 1]);
        let (tx, ty) = (
            self.tri.get(&parts.x).cloned(),
            self.tri.get(&parts.y).cloned(),
        );
        // out = op(P) op(Y), or out^T = op(P)^T op(X)^T when P is the right operand.
        let (tri, p, p_t, y, y_layout, out_layout) = match (tx, ty) {
            (Some(tri), None) => {
                let y = attention::Layout {
                    rows: tri.t,
                    cols: n,
                    t: parts.ty,
                };
                let o = attention::Layout {
                    rows: tri.t,
                    cols: n,
                    t: false,
                };
                (tri, parts.x, parts.tx, parts.y, y, o)
            }
            (None, Some(tri)) => {
                let x = attention::Layout {
                    rows: tri.t,
                    cols: m,
                    t: !parts.tx,
                };
                let o = attention::Layout {
                    rows: tri.t,
                    cols: m,
                    t: true,
                };
                (tri, parts.y, !parts.ty, parts.x, x, o)
            }
            _ => return Ok(None),
        };
        if !self.exact(out) || tri.batches != parts.batches {
            return Ok(None);
        }
        if let (false, Some((scores, [q, k, mask]))) = (p_t, &tri.source) {
            let kernel = attention::Attend {
                scores: scores.clone(),
                v: y_layout,
                out: out_layout,
            };
            return Ok(Some(Fused::plain(
                Kernel::Attend(kernel),
                vec![*q, *k, *mask, y],
            )));
        }
        let kernel = attention::TriMatmul {
            batches: tri.batches,
            t: tri.t,
            p_t,
            y: y_layout,
            out: out_layout,
        };
        Ok(Some(Fused::plain(
            Kernel::TriMatmul(kernel),
            vec![p, tri.ext, y],
        )))
    }

    /// `P * (dP - reduce_sum(dP * P, -1))`, optionally times a constant scalar,
    /// with `P` causal probabilities and `dP` a `matmul` used only here: the
    /// softmax backward of attention in one blockwise pass.
    fn softmax_backward(&mut self, op: &'p Operation) -> Result<Option<Fused>> {
        if op.op != Op::Mul || !self.exact(&op.outputs[0].ty) {
            return Ok(None);
        }
        let (x, y) = (Self::var_of(op, "x"), Self::var_of(op, "y"));
        let single = |name: Option<&str>| name.is_some_and(|n| self.uses.get(n) == Some(&1));
        let def = |name: Option<&str>| name.and_then(|n| self.defs.get(n).copied());
        let (inner, scale) = match (self.scalar_of(op, "x"), self.scalar_of(op, "y")) {
            (None, Some(s)) if single(x) => (def(x), Some(s)),
            (Some(s), None) if single(y) => (def(y), Some(s)),
            _ => (Some(op), None),
        };
        let Some(inner) = inner else {
            return Ok(None);
        };
        let Some((p, dp)) = self.softmax_backward_parts(inner) else {
            return Ok(None);
        };
        let Some(parts) = self.matmul_parts(self.defs[dp])? else {
            return Ok(None);
        };
        let tri = self.tri[&self.slots[p]].clone();
        let dp_ty = &self.slot_types[self.slots[dp]];
        let r = dp_ty.rank();
        if parts.batches != tri.batches || dp_ty.shape[r - 2..] != [tri.t, tri.t] {
            return Ok(None);
        }
        let e = match parts.tx {
            false => self.slot_types[parts.x].shape[r - 1],
            true => self.slot_types[parts.x].shape[r - 2],
        };
        let kernel = attention::SoftmaxBackward {
            batches: tri.batches,
            t: tri.t,
            a: attention::Layout {
                rows: tri.t,
                cols: e,
                t: parts.tx,
            },
            b: attention::Layout {
                rows: e,
                cols: tri.t,
                t: parts.ty,
            },
            scale,
        };
        Ok(Some(Fused {
            kernel: Kernel::SoftmaxBackward(kernel),
            args: vec![self.slots[p], tri.ext, parts.x, parts.y],
            chain: None,
            hidden: None,
            // The gradient is zero where `P` is, but it is not `P`: no source.
            tri: Some(TriOf::Same(Tri {
                source: None,
                ..tri
            })),
        }))
    }

    /// For `mul(P, sub(dP, reduce_sum(mul(dP, P), axes = [-1], keep_dims = true)))`
    /// (either operand order of each `mul`) with `P` causal, every intermediate
    /// used only here and `dP` a `matmul` used twice (here): `(P, dP)`.
    fn softmax_backward_parts(&self, op: &'p Operation) -> Option<(&'p str, &'p str)> {
        let single = |name: &str| self.uses.get(name) == Some(&1);
        let is_tri = |name: &str| {
            self.slots
                .get(name)
                .is_some_and(|s| self.tri.contains_key(s))
        };
        let def = |name: &str, kind: Op| self.defs.get(name).copied().filter(|d| d.op == kind);
        if op.op != Op::Mul {
            return None;
        }
        let (a, b) = (Self::var_of(op, "x")?, Self::var_of(op, "y")?);
        let (p, centered) = if is_tri(a) { (a, b) } else { (b, a) };
        if !is_tri(p) || !single(centered) {
            return None;
        }
        let sub = def(centered, Op::Sub)?;
        let (dp, row) = (Self::var_of(sub, "x")?, Self::var_of(sub, "y")?);
        let reduce = def(row, Op::ReduceSum).filter(|_| single(row))?;
        let pdp = Self::var_of(reduce, "x")?;
        let product = def(pdp, Op::Mul).filter(|_| single(pdp))?;
        let factors = (Self::var_of(product, "x")?, Self::var_of(product, "y")?);
        let ty = self.type_of(p)?;
        let rank = ty.rank() as i64;
        let ctx = self.ctx(reduce);
        let axes_last = matches!(ctx.ints("axes"), Ok(Some([a])) if *a == -1 || *a == rank - 1);
        let keeps = matches!(ctx.flag("keep_dims"), Ok(Some(true)));
        let fits = (factors == (dp, p) || factors == (p, dp))
            && self.uses.get(dp) == Some(&2)
            && def(dp, Op::Matmul).is_some()
            && axes_last
            && keeps
            && [dp, pdp, centered]
                .iter()
                .all(|v| self.type_of(v) == Some(ty))
            && op.outputs[0].ty == *ty;
        fits.then_some((p, dp))
    }

    fn ctx<'a>(&'a self, op: &'a Operation) -> OpCtx<'a> {
        OpCtx {
            op,
            slots: &self.slots,
            slot_types: &self.slot_types,
            literals: &self.literals,
            precision: self.precision,
        }
    }

    /// Slots of the tensor operands of `op`, in parameter order (tuples expanded).
    fn operand_slots(&mut self, op: &'p Operation) -> Result<Vec<Slot>> {
        let mut slots = Vec::new();
        for param in op.op.params() {
            let Some(arg) = op.arg(param.name) else {
                continue;
            };
            match (param.kind, arg) {
                (ParamKind::Tuple, Arg::Tuple(items)) => {
                    for item in items {
                        slots.push(self.operand_slot(op, param.name, item)?);
                    }
                }
                (ParamKind::Tensor | ParamKind::ConstTensor | ParamKind::Tuple, arg) => {
                    slots.push(self.operand_slot(op, param.name, arg)?)
                }
                _ => {}
            }
        }
        Ok(slots)
    }

    fn operand_slot(&mut self, op: &Operation, param: &str, arg: &Arg) -> Result<Slot> {
        match arg {
            Arg::Var(name) => self.slots.get(name.as_str()).copied().ok_or_else(|| {
                op_error(
                    op,
                    format!("`{param}` refers to `{name}`, which is not a tensor value"),
                )
            }),
            Arg::Lit(lit) => {
                let data = constant::materialize(lit, self.weights, op)?;
                let slot = self.new_slot(lit.ty.clone());
                self.set_constant(slot, data);
                Ok(slot)
            }
            Arg::Tuple(_) => Err(op_error(
                op,
                format!("`{param}` must be a tensor, not a tuple"),
            )),
        }
    }
}

pub(super) fn op_error(op: &Operation, msg: impl ToString) -> Error {
    Error::Op {
        op: op.op.mil_name().to_string(),
        name: op.name.clone(),
        msg: msg.to_string(),
    }
}

/// Reject unknown parameters and missing required ones, whatever the op.
fn check_params(op: &Operation) -> Result<()> {
    for (key, _) in &op.args {
        match op.op.param(key) {
            Some(p) if p.kind != ParamKind::Attr => {}
            _ => return Err(op_error(op, format!("unknown parameter `{key}`"))),
        }
    }
    for param in op.op.params().iter().filter(|p| p.required) {
        let present = match param.kind {
            ParamKind::Attr => op.attr(param.name).is_some(),
            _ => op.arg(param.name).is_some(),
        };
        if !present {
            return Err(op_error(
                op,
                format!("missing required parameter `{}`", param.name),
            ));
        }
    }
    if op.op != Op::Split && op.outputs.len() != 1 {
        return Err(op_error(
            op,
            format!("expected one result, {} are declared", op.outputs.len()),
        ));
    }
    Ok(())
}

fn lower_kernel(ctx: &OpCtx) -> Result<Kernel> {
    match ctx.op.op.category() {
        Category::Unary => return elementwise::compile_unary(ctx),
        Category::Binary => return elementwise::compile_binary(ctx),
        _ => {}
    }
    match ctx.op.op {
        Op::Identity | Op::Reshape => shape::compile_copy(ctx),
        Op::Select => elementwise::compile_select(ctx),
        Op::Cast => elementwise::compile_cast(ctx),
        Op::Quantize => elementwise::compile_quantize(ctx),
        Op::Dequantize => elementwise::compile_dequantize(ctx),
        Op::Softmax => reduce::compile_softmax(ctx),
        Op::ReduceSum | Op::ReduceMean | Op::ReduceMax => reduce::compile_reduce(ctx),
        Op::Transpose => shape::compile_transpose(ctx),
        Op::SliceBySize => shape::compile_slice(ctx),
        Op::Concat => shape::compile_concat(ctx),
        Op::Split => shape::compile_split(ctx),
        Op::Matmul => gemm::compile_matmul(ctx),
        Op::Conv => gemm::compile_conv(ctx),
        Op::ScaledDotProductAttention => gemm::compile_attention(ctx),
        other => unreachable!("`{other}` is lowered by its category or materialized"),
    }
}

/// What a kernel compiler sees of an operation: operand types, constant
/// parameters, declared results, and an error constructor naming the op.
pub(super) struct OpCtx<'a> {
    pub(super) op: &'a Operation,
    slots: &'a HashMap<&'a str, Slot>,
    slot_types: &'a [TensorType],
    literals: &'a HashMap<&'a str, &'a Literal>,
    pub(super) precision: Precision,
}

impl<'a> OpCtx<'a> {
    /// An [`Error::Op`] naming this operation.
    pub(super) fn err(&self, msg: impl ToString) -> Error {
        op_error(self.op, msg)
    }

    fn arg_type(&self, param: &str, arg: &'a Arg) -> Result<&'a TensorType> {
        match arg {
            Arg::Var(name) => match self.slots.get(name.as_str()) {
                Some(&slot) => Ok(&self.slot_types[slot]),
                None if self.literals.contains_key(name.as_str()) => Err(self.err(format!(
                    "`{param}` refers to the string constant `{name}`, expected a tensor"
                ))),
                None => Err(self.err(format!(
                    "`{param}` refers to `{name}`, which is not defined before this op"
                ))),
            },
            Arg::Lit(lit) => Ok(&lit.ty),
            Arg::Tuple(_) => Err(self.err(format!("`{param}` must be a tensor, not a tuple"))),
        }
    }

    /// Type of a required tensor operand.
    pub(super) fn input(&self, param: &str) -> Result<&'a TensorType> {
        self.opt_input(param)?
            .ok_or_else(|| self.err(format!("missing required parameter `{param}`")))
    }

    /// Type of an optional tensor operand.
    pub(super) fn opt_input(&self, param: &str) -> Result<Option<&'a TensorType>> {
        match self.op.arg(param) {
            None => Ok(None),
            Some(arg) => self.arg_type(param, arg).map(Some),
        }
    }

    /// Types of the members of a tuple operand (a single tensor counts as a 1-tuple).
    pub(super) fn tuple(&self, param: &str) -> Result<Vec<&'a TensorType>> {
        match self.op.arg(param) {
            None => Err(self.err(format!("missing required parameter `{param}`"))),
            Some(Arg::Tuple(items)) => items.iter().map(|a| self.arg_type(param, a)).collect(),
            Some(arg) => Ok(vec![self.arg_type(param, arg)?]),
        }
    }

    /// The value of a parameter that must be constant (an inline literal or a
    /// `const` value), or `None` if absent.
    pub(super) fn lit(&self, param: &str) -> Result<Option<&'a Literal>> {
        match self.op.arg(param) {
            None => Ok(None),
            Some(Arg::Lit(lit)) => Ok(Some(lit)),
            Some(Arg::Var(name)) => match self.literals.get(name.as_str()) {
                Some(lit) => Ok(Some(lit)),
                None => Err(self.err(format!(
                    "`{param}` must be a constant, but `{name}` is computed at run time"
                ))),
            },
            Some(Arg::Tuple(_)) => {
                Err(self.err(format!("`{param}` must be a constant, not a tuple")))
            }
        }
    }

    fn wrong_kind(&self, param: &str, lit: &Literal, want: &str) -> Error {
        let got = match &lit.value {
            Value::Blob(_) => "a BLOBFILE tensor".to_string(),
            _ => format!("{}", lit.ty),
        };
        self.err(format!("`{param}` must be an inline {want}, got {got}"))
    }

    /// Integer values of a constant parameter.
    pub(super) fn ints(&self, param: &str) -> Result<Option<&'a [i64]>> {
        match self.lit(param)? {
            None => Ok(None),
            Some(lit) => lit
                .as_ints()
                .map(Some)
                .ok_or_else(|| self.wrong_kind(param, lit, "integer tensor")),
        }
    }

    /// The single integer of a constant parameter.
    pub(super) fn int(&self, param: &str) -> Result<Option<i64>> {
        match self.lit(param)? {
            None => Ok(None),
            Some(lit) => lit
                .as_int()
                .map(Some)
                .ok_or_else(|| self.wrong_kind(param, lit, "integer scalar")),
        }
    }

    /// The boolean of a constant parameter.
    pub(super) fn flag(&self, param: &str) -> Result<Option<bool>> {
        match self.lit(param)? {
            None => Ok(None),
            Some(lit) => lit
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.wrong_kind(param, lit, "bool scalar")),
        }
    }

    /// The string of a constant parameter.
    pub(super) fn string(&self, param: &str) -> Result<Option<&'a str>> {
        match self.lit(param)? {
            None => Ok(None),
            Some(lit) => lit
                .as_str()
                .map(Some)
                .ok_or_else(|| self.wrong_kind(param, lit, "string scalar")),
        }
    }

    /// Float values of a constant parameter.
    pub(super) fn floats(&self, param: &str) -> Result<Option<&'a [f32]>> {
        match self.lit(param)? {
            None => Ok(None),
            Some(lit) => lit
                .as_floats()
                .map(Some)
                .ok_or_else(|| self.wrong_kind(param, lit, "float tensor")),
        }
    }

    /// The single declared result type.
    pub(super) fn output(&self) -> &'a TensorType {
        &self.op.outputs[0].ty
    }

    /// Check that the single result is declared with `dtype` and `shape`.
    pub(super) fn expect_output(&self, dtype: DType, shape: &[usize]) -> Result<&'a TensorType> {
        let out = self.output();
        if out.dtype != dtype || out.shape != shape {
            return Err(self.err(format!(
                "result `{}` is declared {out} but the operands give {}",
                self.op.outputs[0].name,
                TensorType::new(dtype, shape)
            )));
        }
        Ok(out)
    }

    /// Normalize a possibly negative `axis` of a rank-`rank` tensor.
    pub(super) fn axis(&self, param: &str, axis: i64, rank: usize) -> Result<usize> {
        let r = rank as i64;
        if axis < -r || axis >= r.max(1) {
            return Err(self.err(format!(
                "`{param}` = {axis} is out of range for rank {rank}"
            )));
        }
        Ok(if axis < 0 {
            (axis + r) as usize
        } else {
            axis as usize
        })
    }

    /// Require a float (fp16/fp32) operand.
    pub(super) fn expect_float(&self, param: &str, ty: &TensorType) -> Result<()> {
        if ty.dtype.is_float() {
            Ok(())
        } else {
            Err(self.err(format!("`{param}` must be fp16 or fp32, got {ty}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(body: &str, sig: &str, outs: &str) -> Program {
        let text = format!(
            "program(1.3)\n{{\n    func main<ios18>({sig}) {{\n{body}    }} -> ({outs});\n}}\n"
        );
        crate::mil::parse(&text).unwrap()
    }

    /// The plan of a program, unfused (one step per op).
    fn plan(body: &str, sig: &str, outs: &str) -> Plan {
        let program = program(body, sig, outs);
        Plan::lower_unfused(&program, &BTreeMap::new(), Precision::Fp32).unwrap()
    }

    /// Large independent products run side by side: `p = a b` and `q = a c`
    /// share only an input; `r = p c` reads `p` and waits for it; `s = a b`
    /// again is independent of `r` but 4x smaller than the bound, so it runs
    /// alone. Values against f64 sums of products.
    #[test]
    fn independent_large_products_run_side_by_side() {
        let n = 256; // n^3 = 2^24 multiply-adds: just large enough.
        let ty = format!("tensor<fp32, [{n}, {n}]>");
        let small = "tensor<fp32, [128, 256]>";
        let body = format!(
            "        {ty} p = matmul(x = a, y = b)[name = string(\"p\")];\n\
             \x20       {ty} q = matmul(x = a, y = c)[name = string(\"q\")];\n\
             \x20       {ty} r = matmul(x = p, y = c)[name = string(\"r\")];\n\
             \x20       {small} s = matmul(x = h, y = b)[name = string(\"s\")];\n"
        );
        let sig = format!("{ty} a, {ty} b, {ty} c, {small} h");
        let plan = plan(&body, &sig, "q, r, s");
        assert_eq!(plan.group_sizes(), [2, 1, 1]);
        let mut rng = crate::rng::Rng::new(3);
        let mut random =
            |len: usize| -> Vec<f32> { (0..len).map(|_| rng.next_f32() - 0.5).collect() };
        let (a, b, c, h) = (random(n * n), random(n * n), random(n * n), random(128 * n));
        let product = |x: &[f32], y: &[f32], rows: usize| -> Vec<f64> {
            let mut out = vec![0.0f64; rows * n];
            for i in 0..rows {
                for k in 0..n {
                    let xik = f64::from(x[i * n + k]);
                    for j in 0..n {
                        out[i * n + j] += xik * f64::from(y[k * n + j]);
                    }
                }
            }
            out
        };
        let outs = run(&plan, &mut Workspace::default(), &[&a, &b, &c, &h]);
        let p: Vec<f32> = product(&a, &b, n).iter().map(|&v| v as f32).collect();
        for (got, want, name) in [
            (&outs[0], product(&a, &c, n), "q"),
            (&outs[1], product(&p, &c, n), "r"),
            (&outs[2], product(&h, &b, 128), "s"),
        ] {
            let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            let err = got
                .iter()
                .zip(&want)
                .fold(0.0f64, |m, (g, w)| m.max((f64::from(*g) - w).abs()));
            assert!(err <= 1e-5 * scale, "{name}: max error {err} of {scale}");
        }
    }

    /// Consecutive elementwise ops whose intermediates are used once run as
    /// one chain step: dense, scalar and repeated (`[T, D]` over `[H, T, D]`)
    /// operands, a shared leaf, a unary op; the values are the separate ops'
    /// bit for bit. A value used twice (`a`) ends a chain.
    /// RoPE's pair rotation `(a, b) -> (-b, a)` (two slices, a `mul`, a
    /// `concat`) runs as one step with the separate ops' values.
    #[test]
    fn pair_rotation_fuses_and_matches_the_separate_ops() {
        let body = "        tensor<fp32, [1, 3, 1]> e = slice_by_size(x = x, begin = tensor<int32, [3]>([0, 0, 0]), size = tensor<int32, [3]>([1, 3, 1]))[name = string(\"e\")];\n\
                    \x20       tensor<fp32, [1, 3, 1]> o = slice_by_size(x = x, begin = tensor<int32, [3]>([0, 0, 1]), size = tensor<int32, [3]>([1, 3, 1]))[name = string(\"o\")];\n\
                    \x20       tensor<fp32, [1, 3, 1]> n = mul(x = o, y = fp32(-1))[name = string(\"n\")];\n\
                    \x20       tensor<fp32, [1, 3, 2]> r = concat(values = (n, e), axis = int32(-1))[name = string(\"r\")];\n";
        let program = program(body, "tensor<fp32, [1, 3, 2]> x", "r");
        let fused = Plan::compile(&program, &BTreeMap::new(), Precision::Fp32).unwrap();
        let separate = Plan::lower_unfused(&program, &BTreeMap::new(), Precision::Fp32).unwrap();
        assert_eq!(
            fused.step_labels(),
            ["pairs (slices, mul, concat) -> tensor<fp32, [1, 3, 2]>"]
        );
        let x = [1.0, 2.0, 3.0, -4.0, 5.5, 0.0];
        let got = run(&fused, &mut Workspace::default(), &[&x]);
        assert_eq!(got, run(&separate, &mut Workspace::default(), &[&x]));
        assert_eq!(got[0], [-2.0, 1.0, 4.0, 3.0, -0.0, 5.5]);
    }

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
        assert_eq!(separate.steps.len(), 6);
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

    fn run(plan: &Plan, ws: &mut Workspace, inputs: &[&[f32]]) -> Vec<Vec<f32>> {
        let mut outs: Vec<Vec<f32>> = plan
            .outputs
            .iter()
            .map(|v| vec![f32::NAN; v.ty.numel()])
            .collect();
        plan.execute_into(ws, inputs, &mut outs).unwrap();
        outs
    }

    #[test]
    fn reshapes_share_storage_and_outputs_are_written_in_place() {
        // y = reshape(x): an output aliasing an input is copied; z = reshape(x * 2)
        // is written by the mul straight into output 1; z again as output 2 is a copy.
        let p = plan(
            "        tensor<int32, [2]> s = const()[name = string(\"s\"), val = tensor<int32, [2]>([3, 2])];\n\
             \x20       tensor<fp32, [3, 2]> y = reshape(x = x, shape = s)[name = string(\"y\")];\n\
             \x20       tensor<fp32, [2, 3]> m = mul(x = x, y = fp32(2))[name = string(\"m\")];\n\
             \x20       tensor<fp32, [3, 2]> z = reshape(x = m, shape = s)[name = string(\"z\")];\n",
            "tensor<fp32, [2, 3]> x",
            "y, z, z",
        );
        assert_eq!(p.steps.len(), 1, "reshapes run no step");
        assert_eq!(p.temp_sizes.len(), 0);
        let x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let outs = run(&p, &mut Workspace::default(), &[&x]);
        assert_eq!(outs[0], x);
        assert_eq!(outs[1], [2.0, 4.0, 6.0, 8.0, 10.0, 12.0]);
        assert_eq!(outs[2], outs[1]);
    }

    #[test]
    fn temporaries_are_reused_once_dead_and_runs_repeat_exactly() {
        // a = x + 1; b = a * a; c = b - a; e = c * 2; d = e * 3 -> d. A result
        // never shares a buffer with its own operands, so a, b, c need three
        // buffers; e takes a's (dead after c) and the output is written in place.
        let p = plan(
            "        tensor<fp32, [4]> a = add(x = x, y = fp32(1))[name = string(\"a\")];\n\
             \x20       tensor<fp32, [4]> b = mul(x = a, y = a)[name = string(\"b\")];\n\
             \x20       tensor<fp32, [4]> c = sub(x = b, y = a)[name = string(\"c\")];\n\
             \x20       tensor<fp32, [4]> e = mul(x = c, y = fp32(2))[name = string(\"e\")];\n\
             \x20       tensor<fp32, [4]> d = mul(x = e, y = fp32(3))[name = string(\"d\")];\n",
            "tensor<fp32, [4]> x",
            "d",
        );
        // Four temporaries (a, b, c, e) in three buffers.
        assert_eq!(p.temp_sizes, [4, 4, 4]);
        assert_eq!(p.homes.iter().filter(|h| **h == Home::Temp(0)).count(), 2);
        assert!(p.homes.contains(&Home::Output(0)));
        let mut ws = Workspace::default();
        let x = [0.0, 1.0, 2.0, -1.0];
        // (x+1)^2 - (x+1) = (x+1) x; times 6.
        let want = [0.0, 12.0, 36.0, 0.0];
        assert_eq!(run(&p, &mut ws, &[&x])[0], want);
        assert_eq!(run(&p, &mut ws, &[&x])[0], want);
    }

    #[test]
    fn scaled_masked_softmax_fuses_and_matches_the_separate_ops() {
        // p = softmax(s * 0.3 + mask), fused and op by op.
        let body = "        tensor<fp16, [1, 2, 3, 4]> m = mul(x = s, y = fp16(0.3))[name = string(\"m\")];\n\
                    \x20       tensor<fp16, [1, 2, 3, 4]> a = add(x = m, y = mask)[name = string(\"a\")];\n\
                    \x20       tensor<fp16, [1, 2, 3, 4]> p = softmax(x = a, axis = int32(-1))[name = string(\"p\")];\n";
        let sig = "tensor<fp16, [1, 2, 3, 4]> s, tensor<fp16, [1, 1, 3, 4]> mask";
        let mut rng = crate::rng::Rng::new(5);
        let scores: Vec<f32> = (0..24).map(|_| 8.0 * rng.next_f32() - 4.0).collect();
        let mask: Vec<f32> = (0..12)
            .map(|i| if i % 4 > i / 4 { -65504.0 } else { 0.0 })
            .collect();
        for precision in [Precision::Fp32, Precision::Fp16] {
            let program = program(body, sig, "p");
            let fused = Plan::compile(&program, &BTreeMap::new(), precision).unwrap();
            let separate = Plan::lower_unfused(&program, &BTreeMap::new(), precision).unwrap();
            assert_eq!((fused.steps.len(), separate.steps.len()), (1, 3));
            let mut inputs = [scores.clone(), mask.clone()];
            if precision == Precision::Fp16 {
                for v in inputs.iter_mut() {
                    elementwise::round_to_fp16(v);
                }
            }
            let args = [&inputs[0][..], &inputs[1][..]];
            let got = run(&fused, &mut Workspace::default(), &args);
            let want = run(&separate, &mut Workspace::default(), &args);
            assert_eq!(got[0], want[0], "{precision:?}");
            // Masked positions get probability 0; rows sum to 1.
            assert_eq!(got[0][1], 0.0);
            assert!((got[0][20..24].iter().sum::<f32>() - 1.0).abs() < 2e-3);
        }
    }
}
