//! The CPU backend: a MIL interpreter, and the executable specification of what
//! every op in [`Op::ALL`](crate::mil::Op::ALL) computes.
//!
//! - `plan`: a compiled program (a home for every value, the steps in
//!   side-by-side groups) and running it; `lower`: a program to steps, each
//!   operation checked by [`crate::mil::infer`], fusions tried in order;
//!   `rewrite`: transposes folded into `matmul` flags before lowering.
//! - `kernel`: the plain interpreter, `StepKernel` and the
//!   lowering table from op families to the math files; `values`: slots and
//!   types of the values, and `OpCtx`, what a kernel compiler reads of an op.
//! - `elementwise`, `reduce`, `shape`, `gemm`: the math, one family per file;
//!   `attention`: fused causal attention; `constant`: literals, BLOBFILE
//!   records, `constexpr_affine_dequantize`.
//! - `fuse`: the fusions, op patterns run as one step, each tested against
//!   the program run op by op.
//! - `profile`: opt-in wall time per plan step (`bench train-step --ops`).
//!
//! This file holds the [`Backend`] implementation and [`run_program`]; the
//! files below it import nothing from here.
//!
//! Values are `f32` vectors whatever their declared dtype (integers and bools
//! are exact). In [`Precision::Fp16`] every fp16-typed op result, constant and
//! written buffer is rounded to IEEE half, so overflow to inf and underflow to
//! zero happen as on the ANE; inside one op the math stays `f32` (sums in
//! `f64`), and matrix products go through faer. This module does not model the
//! ANE's accumulation order, nor its quirks (it honours the attention mask the
//! ANE ignores): where they differ, the ANE is wrong.

mod attention;
mod constant;
mod elementwise;
mod fuse;
mod gemm;
mod kernel;
mod lower;
mod plan;
pub mod profile;
mod reduce;
mod rewrite;
mod shape;
mod values;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Mutex;

use self::plan::{Plan, Workspace};
use super::{Backend, Block, BufferId, HostCall, KernelId, KernelInfo, Precision, matrix_dims};
use crate::mil::{DType, Program, TensorType};
use crate::package::ProgramPackage;
use crate::{Error, Result};

/// A tensor in host memory: its declared type and its values, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub ty: TensorType,
    /// `ty.numel()` values; integers and bools as exact `f32`.
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn new(ty: TensorType, data: Vec<f32>) -> HostTensor {
        HostTensor { ty, data }
    }
}

/// Make `data` hold what a `ty` tensor can: rounded to fp16 in fp16 precision,
/// integers truncated and clamped, bools 0 or 1.
fn store(ty: &TensorType, precision: Precision, data: &mut [f32]) {
    match ty.dtype {
        DType::Fp16 if precision == Precision::Fp16 => elementwise::round_to_fp16(data),
        DType::Fp16 | DType::Fp32 => {}
        dtype => data
            .iter_mut()
            .for_each(|v| *v = elementwise::convert(*v, dtype)),
    }
}

fn backend_error(step: &'static str, msg: String) -> Error {
    Error::Backend {
        backend: "cpu",
        step,
        msg,
    }
}

/// Compile `program` and run it once on named inputs; returns the named outputs
/// in signature order. `weights` maps `@model_path/weights/<file>` to file bytes.
pub fn run_program(
    program: &Program,
    weights: &BTreeMap<String, Vec<u8>>,
    inputs: &[(String, HostTensor)],
    precision: Precision,
) -> Result<Vec<(String, HostTensor)>> {
    let plan = checked_plan(program, weights, precision)?;
    let names = || {
        plan.inputs
            .iter()
            .map(|v| format!("{} {}", v.ty, v.name))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some((name, _)) = inputs
        .iter()
        .find(|(name, _)| !plan.inputs.iter().any(|v| &v.name == name))
    {
        return Err(Error::Invalid(format!(
            "unknown input `{name}`; the program takes: {}",
            names()
        )));
    }
    let mut values: Vec<Cow<[f32]>> = Vec::with_capacity(plan.inputs.len());
    for var in &plan.inputs {
        let (_, tensor) = inputs
            .iter()
            .find(|(name, _)| *name == var.name)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "missing input `{}` of type {}; the program takes: {}",
                    var.name,
                    var.ty,
                    names()
                ))
            })?;
        if tensor.ty != var.ty || tensor.data.len() != var.ty.numel() {
            return Err(Error::Invalid(format!(
                "input `{}` is {} with {} values, but the program declares {}",
                var.name,
                tensor.ty,
                tensor.data.len(),
                var.ty
            )));
        }
        let mut data = Cow::Borrowed(tensor.data.as_slice());
        if var.ty.dtype != DType::Fp32 {
            store(&var.ty, precision, data.to_mut());
        }
        values.push(data);
    }
    let args: Vec<&[f32]> = values.iter().map(|v| v.as_ref()).collect();
    let mut outputs: Vec<Vec<f32>> = plan
        .outputs
        .iter()
        .map(|v| vec![0.0; v.ty.numel()])
        .collect();
    plan.execute_into(&mut Workspace::default(), &args, &mut outputs)?;
    Ok(plan
        .outputs
        .iter()
        .zip(outputs)
        .map(|(var, data)| (var.name.clone(), HostTensor::new(var.ty.clone(), data)))
        .collect())
}

/// Everything [`run_program`] checks before it executes: the program
/// lowered and planned with its BLOBFILE constants read from `weights`, and
/// the memory a run would take available. Returns those bytes.
pub fn check_program(
    program: &Program,
    weights: &BTreeMap<String, Vec<u8>>,
    precision: Precision,
) -> Result<u64> {
    Ok(checked_plan(program, weights, precision)?.bytes_to_run())
}

/// [`Plan::compile`], refused when a run would not fit in memory.
fn checked_plan(
    program: &Program,
    weights: &BTreeMap<String, Vec<u8>>,
    precision: Precision,
) -> Result<Plan> {
    let plan = Plan::compile(program, weights, precision)?;
    crate::memory::check(
        "running the program on the CPU (inputs, outputs and intermediate values)",
        plan.bytes_to_run(),
        "the tensor types of the program decide this; check its shapes and pads",
    )?;
    Ok(plan)
}

struct CompiledKernel {
    info: KernelInfo,
    plan: Plan,
    workspace: Workspace,
    /// Spare workspaces for `run_host_many`: a call takes one (or makes one
    /// when all are in use) and puts it back when done.
    spares: Mutex<Vec<Workspace>>,
}

struct Buffer {
    ty: TensorType,
    data: Vec<f32>,
}

/// The MIL interpreter behind the [`Backend`] trait.
pub struct CpuBackend {
    precision: Precision,
    kernels: Vec<CompiledKernel>,
    buffers: Vec<Buffer>,
}

impl CpuBackend {
    /// The kernel, if it can run straight on host arrays: every input and
    /// output fp32 (nothing to convert).
    fn host_kernel(&mut self, kernel: KernelId) -> Result<Option<&mut CompiledKernel>> {
        let compiled = self
            .kernels
            .get_mut(kernel.0)
            .ok_or_else(|| backend_error("run", format!("unknown kernel {}", kernel.0)))?;
        let info = &compiled.info;
        let fp32 = info
            .inputs
            .iter()
            .chain(&info.outputs)
            .all(|v| v.ty.dtype == DType::Fp32);
        Ok(fp32.then_some(compiled))
    }

    pub fn new(precision: Precision) -> CpuBackend {
        CpuBackend {
            precision,
            kernels: Vec::new(),
            buffers: Vec::new(),
        }
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Compile an already parsed program; BLOBFILE paths resolve in `weights`
    /// (`@model_path/weights/<file>` -> file bytes).
    pub fn compile_program(
        &mut self,
        program: &Program,
        weights: &BTreeMap<String, Vec<u8>>,
    ) -> Result<KernelId> {
        let plan = checked_plan(program, weights, self.precision)?;
        let info = KernelInfo {
            inputs: plan.inputs.clone(),
            outputs: plan.outputs.clone(),
        };
        self.kernels.push(CompiledKernel {
            info,
            plan,
            workspace: Workspace::default(),
            spares: Mutex::default(),
        });
        Ok(KernelId(self.kernels.len() - 1))
    }

    fn buffer(&self, id: BufferId, step: &'static str) -> Result<&Buffer> {
        self.buffers
            .get(id.0)
            .ok_or_else(|| backend_error(step, format!("unknown buffer {}", id.0)))
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn compile(&mut self, package: &ProgramPackage) -> Result<KernelId> {
        let program = package.program()?;
        self.compile_program(&program, &package.weights)
    }

    /// Panics if `kernel` was not returned by this backend.
    fn kernel_info(&self, kernel: KernelId) -> &KernelInfo {
        &self.kernels[kernel.0].info
    }

    fn alloc(&mut self, ty: &TensorType) -> Result<BufferId> {
        if ty.dtype == DType::String {
            return Err(backend_error(
                "alloc",
                format!("cannot allocate a {ty} buffer"),
            ));
        }
        self.buffers.push(Buffer {
            ty: ty.clone(),
            data: vec![0.0; ty.numel()],
        });
        Ok(BufferId(self.buffers.len() - 1))
    }

    fn write(&mut self, buffer: BufferId, block: Block, src: &[f32]) -> Result<()> {
        let precision = self.precision;
        self.buffer(buffer, "write")?;
        let buf = &mut self.buffers[buffer.0];
        block.check(&buf.ty)?;
        if src.len() != block.len() {
            return Err(backend_error(
                "write",
                format!(
                    "block of {} x {} needs {} values, got {}",
                    block.rows,
                    block.cols,
                    block.len(),
                    src.len()
                ),
            ));
        }
        if block.is_empty() {
            return Ok(());
        }
        let (_, cols) = matrix_dims(&buf.ty);
        for (r, row) in src.chunks_exact(block.cols).enumerate() {
            let start = (block.row + r) * cols + block.col;
            let dst = &mut buf.data[start..start + block.cols];
            dst.copy_from_slice(row);
            store(&buf.ty, precision, dst);
        }
        Ok(())
    }

    fn read(&self, buffer: BufferId, block: Block, dst: &mut [f32]) -> Result<()> {
        let buf = self.buffer(buffer, "read")?;
        block.check(&buf.ty)?;
        if dst.len() != block.len() {
            return Err(backend_error(
                "read",
                format!(
                    "block of {} x {} needs room for {} values, got {}",
                    block.rows,
                    block.cols,
                    block.len(),
                    dst.len()
                ),
            ));
        }
        if block.is_empty() {
            return Ok(());
        }
        let (_, cols) = matrix_dims(&buf.ty);
        for (r, row) in dst.chunks_exact_mut(block.cols).enumerate() {
            let start = (block.row + r) * cols + block.col;
            row.copy_from_slice(&buf.data[start..start + block.cols]);
        }
        Ok(())
    }

    fn run(&mut self, kernel: KernelId, inputs: &[BufferId], outputs: &[BufferId]) -> Result<()> {
        let compiled = self
            .kernels
            .get(kernel.0)
            .ok_or_else(|| backend_error("run", format!("unknown kernel {}", kernel.0)))?;
        super::check_binding("cpu", &compiled.info, inputs, outputs, |id| {
            self.buffer(id, "run").map(|b| &b.ty)
        })?;
        if let Some(id) = outputs
            .iter()
            .enumerate()
            .find(|(j, id)| inputs.contains(id) || outputs[..*j].contains(id))
            .map(|(_, id)| id)
        {
            return Err(backend_error(
                "run",
                format!(
                    "buffer {} is bound twice; outputs need their own buffers",
                    id.0
                ),
            ));
        }
        // Outputs move out of their buffers while the plan writes them.
        let mut results: Vec<Vec<f32>> = outputs
            .iter()
            .map(|id| std::mem::take(&mut self.buffers[id.0].data))
            .collect();
        let CompiledKernel {
            plan, workspace, ..
        } = &mut self.kernels[kernel.0];
        let args: Vec<&[f32]> = inputs
            .iter()
            .map(|id| self.buffers[id.0].data.as_slice())
            .collect();
        let result = crate::math::on_pool(|| plan.execute_into(workspace, &args, &mut results));
        for (id, data) in outputs.iter().zip(results) {
            self.buffers[id.0].data = data;
        }
        result
    }

    /// Runs the plan straight on the caller's arrays when every input and
    /// output is fp32 (nothing to convert); otherwise declines.
    fn run_host(
        &mut self,
        kernel: KernelId,
        inputs: &[&[f32]],
        outputs: &mut [&mut [f32]],
    ) -> Result<bool> {
        let Some(compiled) = self.host_kernel(kernel)? else {
            return Ok(false);
        };
        let CompiledKernel {
            plan, workspace, ..
        } = compiled;
        crate::math::on_pool(|| plan.execute(workspace, inputs, outputs))?;
        Ok(true)
    }

    /// Runs the calls on the rayon pool, one task per call, each on a spare
    /// workspace of the kernel's (made when none is free, so memory grows with
    /// the calls running at once, not with the calls). Two sequences through a
    /// layer side by side, each product on its own core, beat one after the
    /// other with each product split over both (see `plan::side_by_side`);
    /// and tasks of one call each keep both cores busy when other work (the
    /// weight gradients beside the backward kernels) holds one of them for
    /// part of the time. A workspace belongs to a call, not to a thread: a
    /// thread waiting inside one call's parallel loop may run another call.
    fn run_host_many(&mut self, kernel: KernelId, calls: &mut [HostCall<'_>]) -> Result<bool> {
        use rayon::prelude::*;
        let Some(compiled) = self.host_kernel(kernel)? else {
            return Ok(false);
        };
        if rayon::current_num_threads() == 1 || calls.len() == 1 {
            let CompiledKernel {
                plan, workspace, ..
            } = compiled;
            crate::math::on_pool(|| {
                for call in calls {
                    plan.execute(workspace, &call.inputs, &mut call.outputs)?;
                }
                Ok::<_, crate::Error>(())
            })?;
            return Ok(true);
        }
        let (plan, spares) = (&compiled.plan, &compiled.spares);
        let spares = || spares.lock().unwrap_or_else(|e| e.into_inner());
        calls.par_iter_mut().with_max_len(1).try_for_each(|call| {
            let mut workspace = spares().pop().unwrap_or_default();
            let result = plan.execute(&mut workspace, &call.inputs, &mut call.outputs);
            spares().push(workspace);
            result
        })?;
        Ok(true)
    }
}
