//! A plan: a lowered program (`lower.rs`) with a home for every value and
//! the steps grouped for running. Reshapes alias their operand; every other
//! value lives in a function input, a constant, a caller's output buffer (the
//! step that defines an output writes straight into it) or a temporary buffer
//! of the plan's [`Workspace`], shared by values whose lifetimes do not
//! overlap. Steps whose results nothing reads are dropped. Consecutive large
//! products that touch no home another writes run side by side
//! ([`side_by_side`]). Running a plan is a loop over steps with no lookups by
//! name and, after the first run, no allocation of tensor memory.
//!
//! This file does not know what an op computes (`kernel.rs`) or which ops fuse
//! (`fuse`).

use std::collections::BTreeMap;

use rayon::prelude::*;

use super::elementwise;
use super::kernel::{Step, StepKernel};
use super::lower::{Lowered, lower};
use super::values::{Slots, ValueSlot};
use crate::backend::Precision;
use crate::mil::{DType, Program, TensorType, Var};
use crate::{Error, Result};

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
    output_copies: Vec<(ValueSlot, usize)>,
    precision: Precision,
}

impl Plan {
    /// Compile `program`, resolving BLOBFILE constants from `weights`
    /// (`@model_path/weights/<file>` -> file bytes), after the rewrites of
    /// [`rewrite`](super::rewrite) that remove copies, with the fusions.
    pub(super) fn compile(
        program: &Program,
        weights: &BTreeMap<String, Vec<u8>>,
        precision: Precision,
    ) -> Result<Plan> {
        let lowered = lower(&super::rewrite::rewrite(program), weights, precision, true)?;
        Ok(Plan::build(lowered, precision))
    }

    /// Compile `program` exactly as written, one step per operation: no
    /// rewrites and no fusions (the reference the fused plans are tested against).
    #[cfg(test)]
    pub(super) fn lower_unfused(
        program: &Program,
        weights: &BTreeMap<String, Vec<u8>>,
        precision: Precision,
    ) -> Result<Plan> {
        let lowered = lower(program, weights, precision, false)?;
        Ok(Plan::build(lowered, precision))
    }

    fn build(lowered: Lowered, precision: Precision) -> Plan {
        let Lowered {
            inputs,
            outputs,
            slots,
            steps,
        } = lowered;
        let Slots {
            types: slot_types,
            alias_of,
            constants,
        } = slots;
        let root = |slot: ValueSlot| alias_of[slot].unwrap_or(slot);
        let output_slots: Vec<ValueSlot> = outputs.iter().map(|(slot, _)| *slot).collect();
        let steps = live_steps(steps, &output_slots, slot_types.len(), root);
        let mut homes: Vec<Option<Home>> = vec![None; slot_types.len()];
        for (i, home) in homes.iter_mut().take(inputs.len()).enumerate() {
            *home = Some(Home::Input(i));
        }
        for (i, (slot, _)) in constants.iter().enumerate() {
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
        let temp_sizes = place_temporaries(&steps, &slot_types, root, &mut homes);
        let homes: Vec<Home> = (0..slot_types.len())
            .map(|slot| homes[root(slot)].unwrap_or(Home::Temp(usize::MAX)))
            .collect();
        let groups = side_by_side(&steps, &homes);
        Plan {
            inputs,
            outputs: outputs.into_iter().map(|(_, var)| var).collect(),
            slot_types,
            homes,
            constants: constants.into_iter().map(|(_, data)| data).collect(),
            temp_sizes,
            steps,
            groups,
            output_copies,
            precision,
        }
    }

    /// Bytes one run holds besides the constants: its inputs, its outputs and
    /// the workspace's temporaries, as `f32` (saturating: never wraps).
    pub(super) fn bytes_to_run(&self) -> u64 {
        let elements = self
            .inputs
            .iter()
            .chain(&self.outputs)
            .map(|v| v.ty.numel())
            .chain(self.temp_sizes.iter().copied())
            .fold(0u64, |sum, n| sum.saturating_add(n as u64));
        elements.saturating_mul(4)
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
        slot: ValueSlot,
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

/// The steps whose results the outputs need, in order: every op was
/// lowered, so checked; steps whose results nothing reads (a recomputed
/// attention output in a backward kernel, say) are dropped.
fn live_steps(
    steps: Vec<Step>,
    outputs: &[ValueSlot],
    n_slots: usize,
    root: impl Fn(ValueSlot) -> ValueSlot,
) -> Vec<Step> {
    let mut needed = vec![false; n_slots];
    for &slot in outputs {
        needed[root(slot)] = true;
    }
    let mut kept = Vec::with_capacity(steps.len());
    for step in steps.into_iter().rev() {
        if step.results.iter().any(|&r| needed[root(r)]) {
            for &arg in &step.args {
                needed[root(arg)] = true;
            }
            kept.push(step);
        }
    }
    kept.reverse();
    kept
}

/// Give every step result without a home a temporary buffer: a buffer is free
/// again after the last step that touches any slot stored in it; a result
/// takes a free buffer of its exact size. Returns the buffers' sizes.
fn place_temporaries(
    steps: &[Step],
    slot_types: &[TensorType],
    root: impl Fn(ValueSlot) -> ValueSlot,
    homes: &mut [Option<Home>],
) -> Vec<usize> {
    let mut last_use = vec![0usize; slot_types.len()];
    for (step_idx, step) in steps.iter().enumerate() {
        for &slot in step.args.iter().chain(&step.results) {
            last_use[root(slot)] = step_idx;
        }
    }
    let mut temp_sizes: Vec<usize> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    for (step_idx, step) in steps.iter().enumerate() {
        for &slot in &step.results {
            let r = root(slot);
            if homes[r].is_none() {
                let size = slot_types[r].numel();
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
    temp_sizes
}

fn run_error(msg: String) -> Error {
    Error::Backend {
        backend: "cpu",
        step: "run",
        msg,
    }
}

/// Products at least this large (multiply-adds) may run side by side.
const SIDE_BY_SIDE_FLOPS: usize = 1 << 24;

/// Splits the steps into runs (as start indices, with the end appended): a run
/// is one step, or consecutive large products that are independent: none reads
/// or overwrites a buffer another one writes. Two products each on its own
/// core run faster than one after the other each split over both (measured:
/// `docs/performance.md`), and rayon balances the pair when one finishes first.
fn side_by_side(steps: &[Step], homes: &[Home]) -> Vec<usize> {
    let large = |s: &Step| matches!(&s.kernel, StepKernel::Matmul(m) if m.multiply_adds() >= SIDE_BY_SIDE_FLOPS);
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A one-function program from its body, signature and outputs.
    pub(crate) fn program(body: &str, sig: &str, outs: &str) -> Program {
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

    /// The outputs of one run (NaN-filled buffers, so every value must be written).
    pub(crate) fn run(plan: &Plan, ws: &mut Workspace, inputs: &[&[f32]]) -> Vec<Vec<f32>> {
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
}
