//! A [`Runtime`] without an ANE: surfaces are host byte buffers with the real
//! layout, "compiling" populates the same unique temp directory and compiles
//! the tagged package with the CPU interpreter in fp16, and evaluating reads
//! the input surfaces' bytes, runs the program and writes the output bytes.
//! It lets the whole ANE orchestration (surfaces, packing, requests, budget,
//! temp directories) run and be tested on any machine, and it is what the
//! ANE must match: it computes exactly what `CpuBackend` in fp16 computes.
//! It models no ANE timing or accumulation order. It refuses to compile only
//! what it is told to ([`FakeRuntime::refusing`], [`FakeRuntime::refusing_op`],
//! [`FakeRuntime::refusing_dialect`]): a stand-in for a chip that rejects some
//! form, to test the fallbacks chosen by probing.

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::Runtime;
use super::files::{ModelDir, ModelFiles, content_identifier};
use super::surface::SurfaceLayout;
use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, Block, BufferId, KernelId, Precision};
use crate::mil::{DType, Dialect, Op, Program};
use crate::{Error, Result};

/// A host surface: its layout and bytes.
#[derive(Clone, Debug)]
pub struct FakeSurface {
    layout: SurfaceLayout,
    bytes: Rc<RefCell<Vec<u8>>>,
}

/// A "loaded" model: the CPU kernel, its staging buffers, its temp directory.
pub struct FakeModel {
    kernel: KernelId,
    inputs: Vec<BufferId>,
    outputs: Vec<BufferId>,
    dir: ModelDir,
}

impl FakeModel {
    /// The model's temp directory (exists while loaded).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

/// A binding of surfaces, kept like an `_ANERequest` keeps its IOSurface objects.
pub struct FakeRequest {
    inputs: Vec<FakeSurface>,
    outputs: Vec<FakeSurface>,
}

/// A form of program a [`FakeRuntime`] refuses: its reason, and which programs.
struct Refusal {
    reason: String,
    refuses: Box<dyn Fn(&Program) -> bool>,
}

/// The CPU stand-in for the ANE.
pub struct FakeRuntime {
    cpu: CpuBackend,
    root: PathBuf,
    compiles: usize,
    evaluations: usize,
    live_dirs: Vec<PathBuf>,
    refusals: Vec<Refusal>,
}

impl FakeRuntime {
    /// Model directories go under `root` (the real runtime uses `NSTemporaryDirectory()`).
    pub fn new(root: PathBuf) -> FakeRuntime {
        FakeRuntime {
            cpu: CpuBackend::new(Precision::Fp16),
            root,
            compiles: 0,
            evaluations: 0,
            live_dirs: Vec::new(),
            refusals: Vec::new(),
        }
    }

    /// Refuse to compile every program `refuses` picks, at step "compile",
    /// with `reason` in the error (as a chip's compiler would).
    pub fn refusing(
        mut self,
        reason: &str,
        refuses: impl Fn(&Program) -> bool + 'static,
    ) -> FakeRuntime {
        self.refusals.push(Refusal {
            reason: reason.to_string(),
            refuses: Box::new(refuses),
        });
        self
    }

    /// Refuse every program that contains `op` (e.g. `matmul`, as M1/M2 reportedly do).
    pub fn refusing_op(self, op: Op) -> FakeRuntime {
        let reason = format!("`{op}` is not supported on this (fake) chip");
        self.refusing(&reason, move |p| p.main.ops.iter().any(|o| o.op == op))
    }

    /// Refuse every program written in `dialect` (e.g. ios18 on an M1).
    pub fn refusing_dialect(self, dialect: Dialect) -> FakeRuntime {
        let reason = format!(
            "the {} dialect is not supported on this (fake) chip",
            dialect.opset()
        );
        self.refusing(&reason, move |p| p.dialect == dialect)
    }

    /// In a per-process directory under the system temp dir.
    pub fn in_temp_dir() -> FakeRuntime {
        Self::new(std::env::temp_dir().join(format!("anemone-fake-ane-{}", std::process::id())))
    }

    pub fn evaluations(&self) -> usize {
        self.evaluations
    }

    /// Temp directories of the models loaded now.
    pub fn live_dirs(&self) -> &[PathBuf] {
        &self.live_dirs
    }
}

fn to_f32(layout: &SurfaceLayout, bytes: &[u8]) -> Vec<f32> {
    let n = layout.channels * layout.spatial;
    let mut out = vec![0.0; n];
    match layout.dtype {
        DType::Fp16 => {
            let mut halves = vec![f16::ZERO; n];
            bytemuck::cast_slice_mut::<f16, u8>(&mut halves).copy_from_slice(&bytes[..n * 2]);
            halves.convert_to_f32_slice(&mut out);
        }
        _ => bytemuck::cast_slice_mut::<f32, u8>(&mut out).copy_from_slice(&bytes[..n * 4]),
    }
    out
}

impl Runtime for FakeRuntime {
    type Model = FakeModel;
    type Surface = FakeSurface;
    type Request = FakeRequest;

    fn name(&self) -> &'static str {
        "fake"
    }

    fn compiles(&self) -> usize {
        self.compiles
    }

    fn load(&mut self, files: &ModelFiles) -> Result<FakeModel> {
        let dir = ModelDir::create(&self.root, &content_identifier(files), files)?;
        let program = crate::mil::parse(&files.mil)?;
        if let Some(refusal) = self.refusals.iter().find(|r| (r.refuses)(&program)) {
            return Err(Error::Backend {
                backend: "ane",
                step: "compile",
                msg: format!(
                    "compileWithQoS:options:error: failed: (fake runtime) {}",
                    refusal.reason
                ),
            });
        }
        let kernel = self
            .cpu
            .compile(&files.package())
            .map_err(|e| Error::Backend {
                backend: "ane",
                step: "compile",
                msg: format!("(fake runtime) {e}"),
            })?;
        let info = self.cpu.kernel_info(kernel).clone();
        let inputs = info
            .inputs
            .iter()
            .map(|v| self.cpu.alloc(&v.ty))
            .collect::<Result<Vec<_>>>()?;
        let outputs = info
            .outputs
            .iter()
            .map(|v| self.cpu.alloc(&v.ty))
            .collect::<Result<Vec<_>>>()?;
        self.compiles += 1;
        self.live_dirs.push(dir.path().to_path_buf());
        Ok(FakeModel {
            kernel,
            inputs,
            outputs,
            dir,
        })
    }

    fn surface(&mut self, layout: &SurfaceLayout) -> Result<FakeSurface> {
        Ok(FakeSurface {
            layout: *layout,
            bytes: Rc::new(RefCell::new(vec![0; layout.bytes()])),
        })
    }

    fn write_surface(
        &self,
        surface: &FakeSurface,
        f: &mut dyn FnMut(&mut [u8]) -> Result<()>,
    ) -> Result<()> {
        f(&mut surface.bytes.borrow_mut())
    }

    fn read_surface(
        &self,
        surface: &FakeSurface,
        f: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        f(&surface.bytes.borrow())
    }

    fn request(
        &mut self,
        model: &FakeModel,
        inputs: &[&FakeSurface],
        outputs: &[&FakeSurface],
    ) -> Result<FakeRequest> {
        if inputs.len() != model.inputs.len() || outputs.len() != model.outputs.len() {
            return Err(Error::Backend {
                backend: "ane",
                step: "request",
                msg: format!(
                    "model takes {} inputs and {} outputs, got {} and {}",
                    model.inputs.len(),
                    model.outputs.len(),
                    inputs.len(),
                    outputs.len()
                ),
            });
        }
        Ok(FakeRequest {
            inputs: inputs.iter().map(|s| (*s).clone()).collect(),
            outputs: outputs.iter().map(|s| (*s).clone()).collect(),
        })
    }

    fn evaluate(&mut self, model: &FakeModel, request: &FakeRequest) -> Result<()> {
        for (surface, &buffer) in request.inputs.iter().zip(&model.inputs) {
            let values = to_f32(&surface.layout, &surface.bytes.borrow());
            let ty = crate::mil::TensorType::new(
                surface.layout.dtype,
                [1, surface.layout.channels, 1, surface.layout.spatial],
            );
            self.cpu.write(buffer, Block::whole(&ty), &values)?;
        }
        self.cpu.run(model.kernel, &model.inputs, &model.outputs)?;
        for (surface, &buffer) in request.outputs.iter().zip(&model.outputs) {
            let layout = surface.layout;
            let ty =
                crate::mil::TensorType::new(layout.dtype, [1, layout.channels, 1, layout.spatial]);
            let block = Block::whole(&ty);
            let mut values = vec![0.0; block.len()];
            self.cpu.read(buffer, block, &mut values)?;
            layout.write_block(&mut surface.bytes.borrow_mut(), block, &values)?;
        }
        self.evaluations += 1;
        Ok(())
    }

    fn unload(&mut self, model: FakeModel) -> Result<()> {
        let path = model.dir.path().to_path_buf();
        self.live_dirs.retain(|p| *p != path);
        drop(model);
        Ok(())
    }
}
