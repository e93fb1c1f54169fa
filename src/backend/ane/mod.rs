//! The ANE backend: [`AneBackend`] implements the [`Backend`] trait over a
//! [`Runtime`] that compiles, loads and evaluates program packages with
//! IOSurface tensors.
//!
//! - `ffi`: every OS call (Objective-C runtime, Foundation, IOSurface,
//!   `dlopen` of the private framework); the only `unsafe` in the crate.
//! - [`private`]: the real runtime, `_ANEInMemoryModel` and friends (macOS).
//! - [`fake`]: a runtime that executes the same packages with the CPU
//!   interpreter in fp16, so everything above the OS runs and is tested anywhere.
//! - [`surface`]: the `[1, C, 1, S]` byte layout and f32 <-> fp16/fp32 conversions.
//! - [`files`]: the weights dictionary and the unique per-model temp directory.
//! - [`budget`], [`restart`]: the ~119-compiles-per-process limit and the
//!   checkpoint + `exec()` restart.
//!
//! The backend owns surfaces (one per allocated buffer, reused across steps)
//! and caches one request per (kernel, input surfaces, output surfaces)
//! binding, so per-layer input surfaces get their own requests. It knows
//! nothing about models or training: what goes where in a surface is the
//! caller's [`Block`].
//!
//! When the compiler refuses a package, the error keeps the step ("compile")
//! and adds what the rule catalogue finds wrong with the package, so a first
//! run says what the chip refused; [`probe`] finds out what the chip takes
//! (conv, width-axis slices, runtime matmul, the ios18 or ios16 dialect)
//! before `--backend auto` commits to it.

pub mod budget;
pub mod fake;
mod ffi;
pub mod files;
pub mod private;
pub mod probe;
pub mod restart;
pub mod surface;

use std::collections::HashMap;

use super::{
    Backend, Block, BufferId, CompileLimit, KernelId, KernelInfo, Preferences, WeightMode,
};
use crate::mil::verify::Target;
use crate::mil::{Dialect, TensorType};
use crate::package::ProgramPackage;
use crate::{Error, Result};
use budget::CompileBudget;
use files::ModelFiles;
use surface::SurfaceLayout;

pub use ffi::{ANE_FRAMEWORK, ChannelValue, IoReport, IoSample, platform_unavailable_reason};
pub use private::{open, open_probed};
pub use probe::ChipReport;

/// What the backend needs from a device: compile + load a program, create
/// surfaces and touch their bytes, bind surfaces into requests, evaluate, unload.
pub trait Runtime {
    /// A compiled and loaded model.
    type Model;
    /// A tensor surface; cloning shares the memory.
    type Surface: Clone;
    /// A binding of input and output surfaces to a model.
    type Request;

    /// Short name for logs.
    fn name(&self) -> &'static str;

    /// Compiles done by this runtime's compiler in this process (the budget's `used`).
    fn compiles(&self) -> usize;

    /// Descriptor, model, temp directory, compile and load.
    fn load(&mut self, files: &ModelFiles) -> Result<Self::Model>;

    /// A zero-filled surface for `layout`.
    fn surface(&mut self, layout: &SurfaceLayout) -> Result<Self::Surface>;

    /// Lock `surface` for writing and hand its bytes to `f`.
    fn write_surface(
        &self,
        surface: &Self::Surface,
        f: &mut dyn FnMut(&mut [u8]) -> Result<()>,
    ) -> Result<()>;

    /// Lock `surface` read-only and hand its bytes to `f`.
    fn read_surface(
        &self,
        surface: &Self::Surface,
        f: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()>;

    /// Bind surfaces (input i to the model's i-th input, output j to its j-th output).
    fn request(
        &mut self,
        model: &Self::Model,
        inputs: &[&Self::Surface],
        outputs: &[&Self::Surface],
    ) -> Result<Self::Request>;

    /// Evaluate synchronously.
    fn evaluate(&mut self, model: &Self::Model, request: &Self::Request) -> Result<()>;

    /// Unload and remove the model's temp directory.
    fn unload(&mut self, model: Self::Model) -> Result<()>;
}

struct AneKernel<M> {
    info: KernelInfo,
    model: Option<M>,
}

struct AneBuffer<S> {
    ty: TensorType,
    layout: SurfaceLayout,
    surface: S,
}

/// The [`Backend`] over a [`Runtime`].
pub struct AneBackend<R: Runtime> {
    runtime: R,
    budget: CompileBudget,
    kernels: Vec<AneKernel<R::Model>>,
    buffers: Vec<AneBuffer<R::Surface>>,
    /// (kernel, inputs, outputs) -> request.
    requests: HashMap<(usize, Vec<usize>, Vec<usize>), R::Request>,
    /// Requests created so far (released kernels drop theirs from the map).
    requests_created: usize,
    /// The MIL dialect this chip compiles (`probe` may find it needs ios16).
    dialect: Dialect,
    /// `ANEMONE_DEBUG`: 1 compiles, 2 + per-run timings, 3 + MIL text, 4 + blob layouts.
    debug: u32,
}

/// The `ANEMONE_DEBUG` level (0 when unset or not a number).
pub fn debug_level() -> u32 {
    std::env::var("ANEMONE_DEBUG")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn backend_error(step: &'static str, msg: String) -> Error {
    Error::Backend {
        backend: "ane",
        step,
        msg,
    }
}

impl<R: Runtime> AneBackend<R> {
    pub fn new(runtime: R, budget: CompileBudget) -> AneBackend<R> {
        AneBackend {
            runtime,
            budget,
            kernels: Vec::new(),
            buffers: Vec::new(),
            requests: HashMap::new(),
            requests_created: 0,
            dialect: Dialect::Ios18,
            debug: debug_level(),
        }
    }

    pub fn runtime(&self) -> &R {
        &self.runtime
    }

    /// Requests created so far (one per distinct binding).
    pub fn request_count(&self) -> usize {
        self.requests_created
    }

    /// Kernels compiled and not released.
    pub fn loaded_kernels(&self) -> usize {
        self.kernels.iter().filter(|k| k.model.is_some()).count()
    }

    /// Build kernels for this chip in `dialect` (what [`probe`] found it takes).
    pub fn set_dialect(&mut self, dialect: Dialect) {
        self.dialect = dialect;
    }

    fn buffer(&self, id: BufferId, step: &'static str) -> Result<&AneBuffer<R::Surface>> {
        self.buffers
            .get(id.0)
            .ok_or_else(|| backend_error(step, format!("unknown buffer {}", id.0)))
    }
}

impl<R: Runtime> Drop for AneBackend<R> {
    fn drop(&mut self) {
        // Requests reference surfaces and models: release them first.
        self.requests.clear();
        for kernel in &mut self.kernels {
            if let Some(model) = kernel.model.take()
                && let Err(e) = self.runtime.unload(model)
            {
                eprintln!("warning: {e}");
            }
        }
    }
}

impl<R: Runtime> Backend for AneBackend<R> {
    fn name(&self) -> &'static str {
        "ane"
    }

    /// Packed weights (compile once: one input surface, one output), and the
    /// compile budget of this process.
    fn preferences(&self) -> Preferences {
        Preferences {
            weight_mode: WeightMode::Packed,
            compile_limit: Some(CompileLimit {
                limit: self.budget.limit,
                used: self.runtime.compiles(),
                raised_by: budget::BUDGET_ENV,
            }),
        }
    }

    fn compile(&mut self, package: &ProgramPackage) -> Result<KernelId> {
        let program = package.program()?;
        let info = KernelInfo {
            inputs: program.main.inputs.clone(),
            outputs: program.main.output_vars(),
        };
        for var in info.inputs.iter().chain(&info.outputs) {
            SurfaceLayout::of(&var.ty).map_err(|_| {
                backend_error(
                    "compile",
                    format!(
                        "`{}` is {}: ANE kernel I/O must be fp16 or fp32",
                        var.name, var.ty
                    ),
                )
            })?;
        }
        self.budget.check(self.runtime.compiles(), 1)?;
        let files = ModelFiles::new(package, &files::next_instance_tag());
        let started = std::time::Instant::now();
        let model = self
            .runtime
            .load(&files)
            .map_err(|e| explain_refusal(e, package))?;
        if self.debug >= 1 {
            let sig = |vars: &[crate::mil::Var]| {
                vars.iter()
                    .map(|v| format!("{} {}", v.ty, v.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            eprintln!(
                "[ane] compiled kernel {} ({}) -> ({}) in {:.1} ms on {}; {} compiles so far, budget {}",
                self.kernels.len(),
                sig(&info.inputs),
                sig(&info.outputs),
                started.elapsed().as_secs_f64() * 1e3,
                self.runtime.name(),
                self.runtime.compiles(),
                self.budget.limit
            );
        }
        if self.debug >= 3 {
            eprintln!("[ane] MIL:\n{}", files.mil);
        }
        if self.debug >= 4 {
            for w in &files.weights {
                match crate::blob::BlobFile::parse(&w.data) {
                    Ok(blob) => eprintln!("[ane] {}: {blob}", w.key),
                    Err(e) => eprintln!("[ane] {}: {e}", w.key),
                }
            }
        }
        self.kernels.push(AneKernel {
            info,
            model: Some(model),
        });
        Ok(KernelId(self.kernels.len() - 1))
    }

    /// Panics if `kernel` was not returned by this backend.
    fn kernel_info(&self, kernel: KernelId) -> &KernelInfo {
        &self.kernels[kernel.0].info
    }

    /// Unload the model (its requests first) and remove its temp directory.
    fn release(&mut self, kernel: KernelId) -> Result<()> {
        let compiled = self
            .kernels
            .get_mut(kernel.0)
            .ok_or_else(|| backend_error("unload", format!("unknown kernel {}", kernel.0)))?;
        self.requests.retain(|key, _| key.0 != kernel.0);
        match compiled.model.take() {
            Some(model) => self.runtime.unload(model),
            None => Ok(()),
        }
    }

    fn dialect(&self) -> Dialect {
        self.dialect
    }

    fn alloc(&mut self, ty: &TensorType) -> Result<BufferId> {
        let layout = SurfaceLayout::of(ty)?;
        let surface = self.runtime.surface(&layout)?;
        self.buffers.push(AneBuffer {
            ty: ty.clone(),
            layout,
            surface,
        });
        Ok(BufferId(self.buffers.len() - 1))
    }

    fn write(&mut self, buffer: BufferId, block: Block, src: &[f32]) -> Result<()> {
        let buf = self.buffer(buffer, "write")?;
        block.check(&buf.ty)?;
        let layout = buf.layout;
        self.runtime.write_surface(&buf.surface, &mut |bytes| {
            layout.write_block(bytes, block, src)
        })
    }

    fn read(&self, buffer: BufferId, block: Block, dst: &mut [f32]) -> Result<()> {
        let buf = self.buffer(buffer, "read")?;
        block.check(&buf.ty)?;
        let layout = buf.layout;
        self.runtime.read_surface(&buf.surface, &mut |bytes| {
            layout.read_block(bytes, block, dst)
        })
    }

    fn run(&mut self, kernel: KernelId, inputs: &[BufferId], outputs: &[BufferId]) -> Result<()> {
        let compiled = self
            .kernels
            .get(kernel.0)
            .ok_or_else(|| backend_error("run", format!("unknown kernel {}", kernel.0)))?;
        super::check_binding("ane", &compiled.info, inputs, outputs, |id| {
            self.buffer(id, "run").map(|b| &b.ty)
        })?;
        let model = compiled
            .model
            .as_ref()
            .ok_or_else(|| backend_error("run", format!("kernel {} was released", kernel.0)))?;
        let key = (
            kernel.0,
            inputs.iter().map(|b| b.0).collect::<Vec<_>>(),
            outputs.iter().map(|b| b.0).collect::<Vec<_>>(),
        );
        if !self.requests.contains_key(&key) {
            let ins: Vec<&R::Surface> = inputs.iter().map(|b| &self.buffers[b.0].surface).collect();
            let outs: Vec<&R::Surface> =
                outputs.iter().map(|b| &self.buffers[b.0].surface).collect();
            let request = self.runtime.request(model, &ins, &outs)?;
            self.requests.insert(key.clone(), request);
            self.requests_created += 1;
        }
        let request = &self.requests[&key];
        let started = std::time::Instant::now();
        self.runtime.evaluate(model, request)?;
        if self.debug >= 2 {
            eprintln!(
                "[ane] kernel {} ran in {:.3} ms",
                kernel.0,
                started.elapsed().as_secs_f64() * 1e3
            );
        }
        Ok(())
    }
}

/// A failed compile or load of `package`, with the error rules of the ANE
/// catalogue the package breaks appended (the step stays, so a refusal is
/// still recognised as one).
fn explain_refusal(error: Error, package: &ProgramPackage) -> Error {
    let Error::Backend { backend, step, msg } = error else {
        return error;
    };
    let findings: Vec<String> = match package.verify(Target::Ane) {
        Ok(report) => report.errors().map(|d| d.to_string()).collect(),
        Err(e) => vec![e.to_string()],
    };
    let msg = if findings.is_empty() {
        format!("{msg} (the package passes every error rule of the ANE catalogue)")
    } else {
        format!(
            "{msg}; the package breaks the ANE rules: {}",
            findings.join("; ")
        )
    };
    Error::Backend { backend, step, msg }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeRuntime;
    use super::*;
    use crate::mil::{Builder, DType};

    /// `y = x * 2` on `[1, 64, 1, 8]` fp16.
    fn doubling() -> ProgramPackage {
        let mut b = Builder::new(Dialect::Ios18);
        let x = b.input("x", DType::Fp16, &[1, 64, 1, 8]);
        let two = b.scalar(DType::Fp16, 2.0);
        let y = b.mul(&x, &two);
        b.output(&y);
        ProgramPackage::from_program(&b.finish(), [])
    }

    #[test]
    fn surfaces_persist_and_each_binding_gets_one_request() {
        let mut be = AneBackend::new(FakeRuntime::in_temp_dir(), CompileBudget::default());
        let k = be.compile(&doubling()).unwrap();
        let ty = be.kernel_info(k).inputs[0].ty.clone();
        let (x1, x2, y) = (
            be.alloc(&ty).unwrap(),
            be.alloc(&ty).unwrap(),
            be.alloc(&ty).unwrap(),
        );
        // Fresh surfaces are zero.
        let mut out = vec![1.0; 512];
        be.read(y, Block::whole(&ty), &mut out).unwrap();
        assert!(out.iter().all(|v| *v == 0.0));
        let x: Vec<f32> = (0..512).map(|i| i as f32 * 0.25).collect();
        be.write(x1, Block::whole(&ty), &x).unwrap();
        be.write(x2, Block::rows(&ty, 3, 1), &[1.5; 8]).unwrap();
        for _ in 0..3 {
            be.run(k, &[x1], &[y]).unwrap();
        }
        assert_eq!(be.request_count(), 1, "one binding, one request");
        be.read(y, Block::whole(&ty), &mut out).unwrap();
        let want: Vec<f32> = x.iter().map(|v| v * 2.0).collect();
        assert_eq!(out, want);
        // Per-layer input surfaces: another binding, its own request, its own data.
        be.run(k, &[x2], &[y]).unwrap();
        assert_eq!(be.request_count(), 2);
        let mut row = vec![0.0; 8];
        be.read(y, Block::rows(&ty, 3, 1), &mut row).unwrap();
        assert_eq!(row, [3.0; 8]);
        be.run(k, &[x1], &[y]).unwrap();
        assert_eq!(be.request_count(), 2);
        assert_eq!(be.runtime().evaluations(), 5);
    }

    #[test]
    fn released_kernels_unload_their_model_and_directory() {
        let root = std::env::temp_dir().join(format!("anemone-release-{}", std::process::id()));
        let mut be = AneBackend::new(FakeRuntime::new(root.clone()), CompileBudget::default());
        let k = be.compile(&doubling()).unwrap();
        let ty = be.kernel_info(k).inputs[0].ty.clone();
        let (x, y) = (be.alloc(&ty).unwrap(), be.alloc(&ty).unwrap());
        be.run(k, &[x], &[y]).unwrap();
        assert_eq!(
            (be.loaded_kernels(), be.runtime().live_dirs().len()),
            (1, 1)
        );
        let dir = be.runtime().live_dirs()[0].clone();
        assert!(
            dir.join("weights").is_dir(),
            "weights/ exists for a weight-free kernel"
        );
        be.release(k).unwrap();
        assert_eq!(
            (be.loaded_kernels(), be.runtime().live_dirs().len()),
            (0, 0)
        );
        assert!(!dir.exists());
        let e = be.run(k, &[x], &[y]).unwrap_err().to_string();
        assert_eq!(e, "ane backend: run: kernel 0 was released");
        assert_eq!(be.kernel_info(k).inputs[0].ty, ty, "the signature stays");
        be.release(k).unwrap();
        assert_eq!(be.request_count(), 1, "requests created so far");
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn a_refused_compile_keeps_its_step_and_names_the_rules_the_package_breaks() {
        // The doubling kernel is 8 positions wide: below three I/O rules.
        let runtime = FakeRuntime::in_temp_dir().refusing("too small", |_| true);
        let mut be = AneBackend::new(runtime, CompileBudget::default());
        let e = be.compile(&doubling()).unwrap_err();
        assert!(crate::backend::is_compile_refusal(&e));
        let text = e.to_string();
        assert!(
            text.starts_with("ane backend: compile: compileWithQoS:options:error: failed: (fake runtime) too small; the package breaks the ANE rules: error[ANE010]"),
            "{text}"
        );
        assert!(
            text.contains("error[ANE015]") && text.contains("pad it to [1, 768, 1, 32]"),
            "{text}"
        );
        assert_eq!(
            be.runtime().compiles(),
            0,
            "a refused compile is not counted"
        );
        // A clean package refused anyway says so.
        let mut b = Builder::new(Dialect::Ios18);
        let x = b.input("x", DType::Fp16, &[1, 64, 1, 384]);
        let y = b.mul(&x, &x);
        b.output(&y);
        let text = be
            .compile(&ProgramPackage::from_program(&b.finish(), []))
            .unwrap_err()
            .to_string();
        assert!(
            text.ends_with("(the package passes every error rule of the ANE catalogue)"),
            "{text}"
        );
    }

    #[test]
    fn bad_bindings_and_non_float_io_name_the_step() {
        let mut be = AneBackend::new(FakeRuntime::in_temp_dir(), CompileBudget::default());
        let k = be.compile(&doubling()).unwrap();
        let wrong = be
            .alloc(&TensorType::new(DType::Fp32, [1, 64, 1, 8]))
            .unwrap();
        let ty = be.kernel_info(k).inputs[0].ty.clone();
        let y = be.alloc(&ty).unwrap();
        let e = be.run(k, &[wrong], &[y]).unwrap_err().to_string();
        assert!(
            e.starts_with("ane backend: run: input `x` is tensor<fp16"),
            "{e}"
        );
        assert!(be.run(k, &[y], &[]).is_err());
        let e = be
            .alloc(&TensorType::new(DType::Int32, [1, 4, 1, 4]))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("ane backend: alloc:"), "{e}");
        let mut b = Builder::new(Dialect::Ios18);
        let x = b.input("x", DType::Int32, &[1, 4, 1, 4]);
        let y = b.identity(&x);
        b.output(&y);
        let e = be
            .compile(&ProgramPackage::from_program(&b.finish(), []))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("ane backend: compile: `x` is tensor<int32"),
            "{e}"
        );
    }
}
