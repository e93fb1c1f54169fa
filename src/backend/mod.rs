//! The backend trait: compile a [`ProgramPackage`], allocate tensor buffers,
//! write and read blocks of them as `f32`, run a kernel. Deliberately narrow so
//! that the ANE (IOSurfaces, private API) and the CPU (plain memory, MIL
//! interpreter) fit behind it, and so that `model`/`train` never see either.
//!
//! The [`cpu`] backend is the specification: it interprets MIL exactly, in
//! fp32 or with fp16 rounding after every op. The [`ane`] backend runs the same
//! packages on the Apple Neural Engine (macOS); it compiles everywhere and
//! reports "ANE unavailable" where there is none. [`open`] picks one
//! (`open.rs`). What a backend prefers of its callers (weight mode, compile
//! limit) it says through [`Backend::preferences`] (`preferences.rs`), so no
//! caller decides by a backend's name.

pub mod ane;
pub mod cpu;
mod open;
mod preferences;

use std::fmt;
use std::str::FromStr;

use crate::Result;
use crate::mil::{Dialect, TensorType, Var};
use crate::package::ProgramPackage;

pub use open::{BackendKind, Opened, open};
pub use preferences::{CompileLimit, CompilePlan, Preferences, RestartDecision, WeightMode};

/// How the CPU backend evaluates fp16-typed values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    /// Compute everything in f32, whatever the declared dtype.
    #[default]
    Fp32,
    /// Round every fp16-typed value to IEEE half (nearest-even) after each op,
    /// so overflow to inf and underflow to zero happen as on the ANE.
    Fp16,
}

impl Precision {
    /// Every precision, the default first.
    pub const ALL: [Precision; 2] = [Precision::Fp32, Precision::Fp16];

    /// The name `--precision` takes.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
        }
    }
}

/// The largest magnitude an fp16 kernel's products may reach: the ANE's
/// matmul outputs overflow to inf near 32,759, half of fp16's largest finite
/// value (65,504), on every chip tested (field reports; `docs/ane-notes.md`).
/// The dynamic loss scale grows to at most the largest power of two below
/// it, 2^14 (`train::optim::MAX_LOSS_SCALE`).
pub const FP16_MATMUL_LIMIT: f32 = 32_759.0;

impl Precision {
    /// The largest magnitude a kernel output may safely reach in this
    /// precision: [`FP16_MATMUL_LIMIT`] for fp16, `f32::MAX` for fp32.
    pub fn output_limit(self) -> f32 {
        match self {
            Precision::Fp16 => FP16_MATMUL_LIMIT,
            Precision::Fp32 => f32::MAX,
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Precision {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        let names = Precision::ALL.map(Precision::name);
        Precision::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| crate::Error::unknown_name("precision", s, &names))
    }
}

/// Handle to a compiled kernel, valid for the backend that returned it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelId(pub usize);

/// Handle to a tensor buffer, valid for the backend that returned it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BufferId(pub usize);

/// A rectangular block of a tensor viewed as a row-major matrix whose columns
/// are the last axis and whose rows are all other axes flattened. For the ANE's
/// `[1, C, 1, S]` layout, rows are channels and columns are spatial positions, so
/// a block is "channels `row..row+rows`, positions `col..col+cols`".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    pub row: usize,
    pub rows: usize,
    pub col: usize,
    pub cols: usize,
}

impl Block {
    /// The whole tensor of type `ty`.
    pub fn whole(ty: &TensorType) -> Block {
        let (rows, cols) = matrix_dims(ty);
        Block {
            row: 0,
            rows,
            col: 0,
            cols,
        }
    }

    /// Columns `col..col+cols` of every row of `ty`.
    pub fn columns(ty: &TensorType, col: usize, cols: usize) -> Block {
        let (rows, _) = matrix_dims(ty);
        Block {
            row: 0,
            rows,
            col,
            cols,
        }
    }

    /// Rows (channels) `row..row+rows`, all columns of `ty`.
    pub fn rows(ty: &TensorType, row: usize, rows: usize) -> Block {
        let (_, cols) = matrix_dims(ty);
        Block {
            row,
            rows,
            col: 0,
            cols,
        }
    }

    /// Number of elements in the block.
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Check that the block lies inside a tensor of type `ty`.
    pub fn check(&self, ty: &TensorType) -> Result<()> {
        let (rows, cols) = matrix_dims(ty);
        if self.row + self.rows > rows || self.col + self.cols > cols {
            return Err(crate::Error::Invalid(format!(
                "block rows {}..{} cols {}..{} outside tensor {ty} ({rows} x {cols})",
                self.row,
                self.row + self.rows,
                self.col,
                self.col + self.cols
            )));
        }
        Ok(())
    }
}

/// `(rows, cols)` of `ty` seen as a matrix: cols = last axis (1 for scalars).
pub fn matrix_dims(ty: &TensorType) -> (usize, usize) {
    match ty.shape.split_last() {
        None => (1, 1),
        Some((last, rest)) => (rest.iter().product(), *last),
    }
}

/// The inputs and outputs of a compiled kernel, in function-signature order.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelInfo {
    pub inputs: Vec<Var>,
    pub outputs: Vec<Var>,
}

/// Check that `inputs` and `outputs` bind every argument of a kernel whose
/// signature is `info`, each to a buffer of the declared type (`buffer_type`
/// looks a buffer up). Errors are `backend`'s, at step "run".
pub(crate) fn check_binding<'a>(
    backend: &'static str,
    info: &KernelInfo,
    inputs: &[BufferId],
    outputs: &[BufferId],
    buffer_type: impl Fn(BufferId) -> Result<&'a TensorType>,
) -> Result<()> {
    let error = |msg: String| crate::Error::Backend {
        backend,
        step: "run",
        msg,
    };
    if inputs.len() != info.inputs.len() || outputs.len() != info.outputs.len() {
        return Err(error(format!(
            "the kernel takes {} inputs and {} outputs, got {} and {} buffers",
            info.inputs.len(),
            info.outputs.len(),
            inputs.len(),
            outputs.len()
        )));
    }
    for (role, ids, vars) in [
        ("input", inputs, &info.inputs),
        ("output", outputs, &info.outputs),
    ] {
        for (&id, var) in ids.iter().zip(vars) {
            let ty = buffer_type(id)?;
            if *ty != var.ty {
                return Err(error(format!(
                    "{role} `{}` is {} but buffer {} holds {ty}",
                    var.name, var.ty, id.0
                )));
            }
        }
    }
    Ok(())
}

/// A device that compiles MIL program packages and runs them on tensor buffers.
pub trait Backend {
    /// Short name for logs ("cpu", "ane"); never a reason to decide anything
    /// (that is [`Backend::preferences`]).
    fn name(&self) -> &'static str;

    /// What this backend prefers of the code that builds and runs its kernels.
    /// The default is a backend without device constraints (the CPU's):
    /// weights as inputs, compiles free.
    fn preferences(&self) -> Preferences {
        Preferences::default()
    }

    /// Compile a program package; the returned kernel can be run many times.
    /// A package the device's compiler refuses fails at step "compile"
    /// ([`is_compile_refusal`]), distinct from budget, load and I/O failures.
    fn compile(&mut self, package: &ProgramPackage) -> Result<KernelId>;

    /// Unload a compiled kernel the caller is done with (the ANE unloads the
    /// model and removes its temp directory); running it afterwards is an
    /// error, its [`Backend::kernel_info`] stays. The default keeps it.
    fn release(&mut self, kernel: KernelId) -> Result<()> {
        let _ = kernel;
        Ok(())
    }

    /// The MIL dialect kernels for this backend are written in: ios18 unless
    /// the device was found to need ios16 (M1/M2, see `ane::probe`).
    fn dialect(&self) -> Dialect {
        Dialect::Ios18
    }

    /// Input and output signature of a compiled kernel.
    fn kernel_info(&self, kernel: KernelId) -> &KernelInfo;

    /// Allocate a zero-filled buffer able to hold a tensor of type `ty`.
    fn alloc(&mut self, ty: &TensorType) -> Result<BufferId>;

    /// Write `src` (row-major, `block.len()` values) into `block` of `buffer`,
    /// converting to the buffer's dtype.
    fn write(&mut self, buffer: BufferId, block: Block, src: &[f32]) -> Result<()>;

    /// Read `block` of `buffer` into `dst` (row-major, `block.len()` values).
    fn read(&self, buffer: BufferId, block: Block, dst: &mut [f32]) -> Result<()>;

    /// Run `kernel` with `inputs[i]` bound to its i-th input and `outputs[j]`
    /// to its j-th output. Synchronous.
    fn run(&mut self, kernel: KernelId, inputs: &[BufferId], outputs: &[BufferId]) -> Result<()>;

    /// Run `kernel` straight on host arrays, without buffers: `inputs[i]` holds
    /// the i-th input's values and `outputs[j]` receives the j-th output's, each
    /// row-major with the declared element count. A backend that would have to
    /// copy anyway (device memory, dtype conversion) returns `Ok(false)` and
    /// touches nothing; the caller then goes through `write`/`run`/`read`.
    fn run_host(
        &mut self,
        kernel: KernelId,
        inputs: &[&[f32]],
        outputs: &mut [&mut [f32]],
    ) -> Result<bool> {
        let _ = (kernel, inputs, outputs);
        Ok(false)
    }

    /// [`run_host`](Backend::run_host) for several independent sets of host
    /// arrays (several sequences through the same kernel), which the backend
    /// may run at the same time. `Ok(false)` and nothing touched where
    /// `run_host` would decline; the caller then runs them one by one.
    fn run_host_many(&mut self, kernel: KernelId, calls: &mut [HostCall<'_>]) -> Result<bool> {
        let _ = (kernel, calls);
        Ok(false)
    }
}

/// Whether `error` is a device compiler refusing a program (step "compile"),
/// as opposed to a spent compile budget, a failed load or bad I/O: the case
/// in which a different form of the kernel may still compile.
pub fn is_compile_refusal(error: &crate::Error) -> bool {
    matches!(
        error,
        crate::Error::Backend {
            step: "compile",
            ..
        }
    )
}

/// A kernel compiled whole, or split into parts because the whole was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Compiled {
    Whole(KernelId),
    /// The parts, run in order, compute what the whole would; `refused` is the
    /// compiler's error for the whole (for the user's log).
    Split {
        parts: Vec<KernelId>,
        refused: String,
    },
}

/// Compile `whole`; if the device's compiler refuses it
/// ([`is_compile_refusal`]), compile the packages `parts` builds instead (the
/// reference's split of a kernel that is too big for some chips, e.g. the
/// attention backward in two). Any other failure is returned as it is.
pub fn compile_or_split(
    backend: &mut dyn Backend,
    whole: &ProgramPackage,
    parts: impl FnOnce() -> Result<Vec<ProgramPackage>>,
) -> Result<Compiled> {
    match backend.compile(whole) {
        Ok(kernel) => Ok(Compiled::Whole(kernel)),
        Err(e) if is_compile_refusal(&e) => {
            let parts = parts()?
                .iter()
                .map(|package| backend.compile(package))
                .collect::<Result<Vec<_>>>()?;
            Ok(Compiled::Split {
                parts,
                refused: e.to_string(),
            })
        }
        Err(e) => Err(e),
    }
}

/// One set of host arrays for [`Backend::run_host_many`]: as
/// [`Backend::run_host`]'s `inputs` and `outputs`.
pub struct HostCall<'a> {
    pub inputs: Vec<&'a [f32]>,
    pub outputs: Vec<&'a mut [f32]>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mil::DType;

    #[test]
    fn precisions_parse_their_names_and_name_the_choices_otherwise() {
        for p in Precision::ALL {
            assert_eq!(p.to_string().parse::<Precision>().unwrap(), p);
        }
        let e = "fp8".parse::<Precision>().unwrap_err().to_string();
        assert_eq!(e, "unknown precision `fp8` (expected one of fp32, fp16)");
    }

    #[test]
    fn blocks_view_ane_layout_as_channels_by_positions() {
        let ty = TensorType::new(DType::Fp16, [1, 768, 1, 256]);
        assert_eq!(matrix_dims(&ty), (768, 256));
        let b = Block::columns(&ty, 64, 128);
        assert_eq!(
            (b.row, b.rows, b.col, b.cols, b.len()),
            (0, 768, 64, 128, 768 * 128)
        );
        assert!(b.check(&ty).is_ok());
        assert!(Block::columns(&ty, 200, 57).check(&ty).is_err());
        assert_eq!(matrix_dims(&TensorType::scalar(DType::Fp32)), (1, 1));
    }
}
