//! A compiled layer kernel and how the host calls it: [`CompiledKernel`]
//! (the backend's kernel with its buffers and clocks, or the parts it runs
//! as where the device refused it whole) and [`Call`], one run on host
//! arrays bound by slot name, alone or as a batch ([`run_many`]).
//!
//! This module knows nothing about layers, gradients or scheduling: which
//! arrays a kernel reads and writes is the caller's business (`stages`).

use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant};

use crate::backend::{self, Backend, Block, BufferId, Compiled, HostCall, KernelId};
use crate::mil::Var;
use crate::model::ModelConfig;
use crate::model::kernels::{
    Baked, KernelOptions, KernelSpec, LAYER_KERNELS, LayerKernels, SlotRole, TensorSlot, transpose,
};
use crate::train::profile::Profile;
use crate::{Error, Result};

/// A compiled kernel with its buffers, or the kernels it runs as.
pub struct CompiledKernel {
    pub spec: KernelSpec,
    form: Form,
    inputs: Vec<BufferId>,
    outputs: Vec<BufferId>,
    /// Whether a [`Call`] may hand host arrays straight to the backend: every
    /// slot is a whole buffer (no packing) and no weight is transposed on the way.
    direct: bool,
    /// Per input slot, the weight array last written to it in this pass
    /// (address, length), so that the buffer path writes each weight once per
    /// pass, not once per sequence.
    written: RefCell<Vec<Option<(usize, usize)>>>,
    /// Time spent running, and writing/reading buffers, since the last `take_times`.
    run_time: Cell<Duration>,
    io_time: Cell<Duration>,
}

/// How a kernel was compiled.
enum Form {
    /// As its spec says: the backend's kernel.
    Whole(KernelId),
    /// The device refused it (`refused`: the compiler's error); its split's
    /// kernels compute it, in order (`train::stages` runs them).
    Split {
        parts: Vec<CompiledKernel>,
        refused: String,
    },
}

/// Compile every kernel of a layer's set (`config` at window `seq`, built
/// with `opts`; `baked` gives the weights of `WeightMode::Baked` by slot
/// name); a kernel the device refuses whole is compiled as its split where
/// it has one ([`backend::compile_or_split`]). A failure names the kernel.
pub fn compile(
    backend: &mut dyn Backend,
    config: &ModelConfig,
    seq: usize,
    opts: KernelOptions,
    baked: Baked,
) -> Result<LayerKernels<CompiledKernel>> {
    let specs = LayerKernels::build(config, seq, opts, baked)?;
    LAYER_KERNELS.zip(specs).try_map(|(decl, spec)| {
        let compiled = match decl.split {
            None => CompiledKernel::new(backend, spec),
            Some(split) => CompiledKernel::new_or_split(backend, spec, || {
                (split.build)(config, seq, opts, baked)
            }),
        };
        compiled.map_err(|e| naming_the_kernel(e, decl.name))
    })
}

/// `error` with the layer kernel it happened to appended (kept a backend
/// error at its step, so a refusal stays one).
fn naming_the_kernel(error: Error, kernel: &str) -> Error {
    match error {
        Error::Backend { backend, step, msg } => Error::Backend {
            backend,
            step,
            msg: format!("{msg} (layer kernel `{kernel}`)"),
        },
        other => other,
    }
}

/// Whether `slots` are the whole buffers `vars`, in order, with no weight
/// transposed by the host.
fn whole_buffers(slots: &[TensorSlot], vars: &[Var]) -> bool {
    slots.len() == vars.len()
        && slots.iter().enumerate().all(|(index, slot)| {
            slot.buffer == index
                && slot.row == 0
                && slot.col == 0
                && slot.rows * slot.cols == vars[index].ty.numel()
                && slot.role != SlotRole::Weight { transposed: true }
        })
}

fn block(slot: &TensorSlot) -> Block {
    Block {
        row: slot.row,
        rows: slot.rows,
        col: slot.col,
        cols: slot.cols,
    }
}

impl CompiledKernel {
    pub fn new(backend: &mut dyn Backend, spec: KernelSpec) -> Result<CompiledKernel> {
        let id = backend.compile(&spec.package)?;
        Self::with_id(backend, spec, id)
    }

    /// Compile `spec`, or, when the device refuses it
    /// ([`backend::is_compile_refusal`]), the kernels `parts` builds, which
    /// run in order compute what it would (its split).
    pub fn new_or_split(
        backend: &mut dyn Backend,
        spec: KernelSpec,
        parts: impl FnOnce() -> Result<Vec<KernelSpec>>,
    ) -> Result<CompiledKernel> {
        let mut specs = Vec::new();
        let compiled = backend::compile_or_split(backend, &spec.package, || {
            specs = parts()?;
            Ok(specs.iter().map(|part| part.package.clone()).collect())
        })?;
        match compiled {
            Compiled::Whole(id) => Self::with_id(backend, spec, id),
            Compiled::Split { parts, refused } => {
                let parts = specs
                    .into_iter()
                    .zip(parts)
                    .map(|(part, id)| Self::with_id(backend, part, id))
                    .collect::<Result<Vec<_>>>()?;
                Ok(CompiledKernel {
                    spec,
                    form: Form::Split { parts, refused },
                    inputs: Vec::new(),
                    outputs: Vec::new(),
                    direct: false,
                    written: RefCell::default(),
                    run_time: Cell::default(),
                    io_time: Cell::default(),
                })
            }
        }
    }

    /// The kernel compiled as `id`, with its buffers.
    fn with_id(
        backend: &mut dyn Backend,
        spec: KernelSpec,
        id: KernelId,
    ) -> Result<CompiledKernel> {
        let info = backend.kernel_info(id).clone();
        let alloc = |backend: &mut dyn Backend, vars: &[Var]| {
            vars.iter()
                .map(|var| backend.alloc(&var.ty))
                .collect::<Result<Vec<_>>>()
        };
        let inputs = alloc(backend, &info.inputs)?;
        let outputs = alloc(backend, &info.outputs)?;
        let direct = whole_buffers(&spec.inputs, &info.inputs)
            && whole_buffers(&spec.outputs, &info.outputs);
        let written = RefCell::new(vec![None; spec.inputs.len()]);
        Ok(CompiledKernel {
            spec,
            form: Form::Whole(id),
            inputs,
            outputs,
            direct,
            written,
            run_time: Cell::default(),
            io_time: Cell::default(),
        })
    }

    /// The kernel's name (`attn_fwd`, ...).
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Whether runs may skip the kernel's buffers (see [`Call`]).
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// The kernels this one runs as, in order, when the device refused it
    /// whole; `None` when it was compiled whole.
    pub fn parts(&self) -> Option<&[CompiledKernel]> {
        match &self.form {
            Form::Whole(_) => None,
            Form::Split { parts, .. } => Some(parts),
        }
    }

    /// The compiler's error for the whole kernel, when it runs as its parts.
    pub fn refused(&self) -> Option<&str> {
        match &self.form {
            Form::Whole(_) => None,
            Form::Split { refused, .. } => Some(refused),
        }
    }

    /// The backend's kernel; an error for a kernel that runs as its parts.
    fn id(&self) -> Result<KernelId> {
        match &self.form {
            Form::Whole(id) => Ok(*id),
            Form::Split { parts, .. } => Err(Error::Invalid(format!(
                "kernel {} was compiled as its {} parts (the device refused it whole): run them",
                self.spec.name,
                parts.len()
            ))),
        }
    }

    /// Start binding host arrays for one run (see [`Call`]).
    pub fn call<'a>(&self) -> Call<'_, 'a> {
        Call {
            kernel: self,
            inputs: vec![None; self.spec.inputs.len()],
            weights: vec![false; self.spec.inputs.len()],
            outputs: (0..self.spec.outputs.len()).map(|_| None).collect(),
        }
    }

    /// Forget which weights the buffers hold: the next [`Call`] writes them
    /// again. The engine calls this whenever the weights may have changed.
    pub fn new_pass(&self) {
        self.written.borrow_mut().fill(None);
        for part in self.parts().unwrap_or_default() {
            part.new_pass();
        }
    }

    /// Add the time of `io` to the buffer I/O clock.
    fn timed_io(&self, io: impl FnOnce() -> Result<()>) -> Result<()> {
        let start = Instant::now();
        let result = io();
        self.io_time.set(self.io_time.get() + start.elapsed());
        result
    }

    /// Write an activation `(rows, cols)` row-major.
    pub fn write(&self, backend: &mut dyn Backend, name: &str, data: &[f32]) -> Result<()> {
        let slot = self.spec.input(name);
        debug_assert_eq!(slot.role, SlotRole::Activation);
        self.timed_io(|| backend.write(self.inputs[slot.buffer], block(slot), data))
    }

    /// Write a weight given as the parameter is stored (`[out, in]` row-major);
    /// transposes when the slot wants `W^T`.
    pub fn write_weight(
        &self,
        backend: &mut dyn Backend,
        name: &str,
        weight: &[f32],
    ) -> Result<()> {
        let slot = self.spec.input(name);
        let buffer = self.inputs[slot.buffer];
        self.timed_io(|| match slot.role {
            SlotRole::Weight { transposed: true } => {
                // The slot holds W^T (rows x cols), so W is (cols x rows).
                let weight_t = transpose(weight, slot.cols, slot.rows);
                backend.write(buffer, block(slot), &weight_t)
            }
            _ => backend.write(buffer, block(slot), weight),
        })
    }

    pub fn run(&self, backend: &mut dyn Backend) -> Result<()> {
        let id = self.id()?;
        let start = Instant::now();
        let result = backend.run(id, &self.inputs, &self.outputs);
        self.run_time.set(self.run_time.get() + start.elapsed());
        result
    }

    /// Read an output `(rows, cols)` row-major into `dst`.
    pub fn read(&self, backend: &dyn Backend, name: &str, dst: &mut [f32]) -> Result<()> {
        let slot = self.spec.output(name);
        self.timed_io(|| backend.read(self.outputs[slot.buffer], block(slot), dst))
    }

    /// Add this kernel's run time (under its name; a split kernel's parts
    /// under theirs) and buffer I/O time (under `io`) to `profile`, and reset them.
    pub fn take_times(&self, profile: &mut Profile) {
        match self.parts() {
            None => profile.add_duration(&self.spec.name, self.run_time.take()),
            Some(parts) => parts.iter().for_each(|part| part.take_times(profile)),
        }
        profile.add_duration("io", self.io_time.take());
    }
}

/// One run of a kernel on host arrays bound by slot name: every input and
/// every output must be bound. Where the backend can run on host arrays and the
/// kernel's slots allow it, the arrays go straight to the backend (no copies);
/// otherwise they are written to the kernel's buffers, the kernel runs and the
/// outputs are read back.
pub struct Call<'k, 'a> {
    kernel: &'k CompiledKernel,
    inputs: Vec<Option<&'a [f32]>>,
    /// Which inputs are weights (written once per pass on the buffer path).
    weights: Vec<bool>,
    outputs: Vec<Option<&'a mut [f32]>>,
}

impl<'k, 'a> Call<'k, 'a> {
    fn input_index(&self, name: &str) -> usize {
        let spec = &self.kernel.spec;
        spec.inputs
            .iter()
            .position(|slot| slot.name == name)
            .unwrap_or_else(|| panic!("kernel {} has no input `{name}`", spec.name))
    }

    /// Bind activation `name`, `(rows, cols)` row-major.
    pub fn input(mut self, name: &str, data: &'a [f32]) -> Self {
        let index = self.input_index(name);
        self.inputs[index] = Some(data);
        self
    }

    /// Bind activation `name` when given (an optional input, `Some`).
    pub fn input_if(self, name: &str, data: Option<&'a [f32]>) -> Self {
        match data {
            Some(data) => self.input(name, data),
            None => self,
        }
    }

    /// Bind weight `name` as the parameter is stored (`[out, in]` row-major).
    /// Its values must not change until [`CompiledKernel::new_pass`]. A
    /// weight baked into the kernel is not bound (its values are the
    /// program's).
    pub fn weight(mut self, name: &str, weight: &'a [f32]) -> Self {
        if self.kernel.spec.is_baked(name) {
            return self;
        }
        let index = self.input_index(name);
        self.inputs[index] = Some(weight);
        self.weights[index] = true;
        self
    }

    /// Bind weight `name` when the model has it (a feature's vector, `Some`).
    pub fn weight_if(self, name: &str, weight: Option<&'a [f32]>) -> Self {
        match weight {
            Some(weight) => self.weight(name, weight),
            None => self,
        }
    }

    /// Bind output `name`, `(rows, cols)` row-major, overwritten by the run.
    pub fn output(mut self, name: &str, dst: &'a mut [f32]) -> Self {
        let spec = &self.kernel.spec;
        let index = spec
            .outputs
            .iter()
            .position(|slot| slot.name == name)
            .unwrap_or_else(|| panic!("kernel {} has no output `{name}`", spec.name));
        self.outputs[index] = Some(dst);
        self
    }

    pub fn run(self, backend: &mut dyn Backend) -> Result<()> {
        self.bind()?.run(backend)
    }

    /// Check that every slot is bound and take the arrays in slot order.
    fn bind(self) -> Result<Bound<'k, 'a>> {
        let kernel = self.kernel;
        let unbound = |slots: &[TensorSlot], bound: Vec<bool>| {
            slots
                .iter()
                .zip(bound)
                .filter(|(_, is_bound)| !is_bound)
                .map(|(slot, _)| slot.name.clone())
                .collect::<Vec<_>>()
        };
        let missing: Vec<String> = unbound(
            &kernel.spec.inputs,
            self.inputs.iter().map(Option::is_some).collect(),
        )
        .into_iter()
        .chain(unbound(
            &kernel.spec.outputs,
            self.outputs.iter().map(Option::is_some).collect(),
        ))
        .collect();
        if !missing.is_empty() {
            return Err(Error::Invalid(format!(
                "kernel {}: nothing bound to {}",
                kernel.spec.name,
                missing.join(", ")
            )));
        }
        Ok(Bound {
            kernel,
            inputs: self.inputs.into_iter().flatten().collect(),
            weights: self.weights,
            outputs: self.outputs.into_iter().flatten().collect(),
        })
    }
}

/// Several runs of one kernel on independent arrays (the sequences of a
/// batch), which the backend may run at the same time
/// ([`Backend::run_host_many`]); otherwise they run one by one as [`Call`]s.
/// Every call must bind the same weights.
pub fn run_many<'k, 'a>(
    backend: &mut dyn Backend,
    calls: impl IntoIterator<Item = Call<'k, 'a>>,
) -> Result<()> {
    let mut bound = calls
        .into_iter()
        .map(Call::bind)
        .collect::<Result<Vec<_>>>()?;
    let Some(kernel) = bound.first().map(|call| call.kernel) else {
        return Ok(());
    };
    if kernel.direct && bound.len() > 1 {
        let mut host: Vec<HostCall> = bound
            .iter_mut()
            .map(|call| HostCall {
                inputs: call.inputs.clone(),
                outputs: call.outputs.iter_mut().map(|out| &mut **out).collect(),
            })
            .collect();
        let start = Instant::now();
        if backend.run_host_many(kernel.id()?, &mut host)? {
            kernel.run_time.set(kernel.run_time.get() + start.elapsed());
            return Ok(());
        }
    }
    bound.into_iter().try_for_each(|call| call.run(backend))
}

/// A [`Call`] with every slot bound, arrays in slot order.
struct Bound<'k, 'a> {
    kernel: &'k CompiledKernel,
    inputs: Vec<&'a [f32]>,
    weights: Vec<bool>,
    outputs: Vec<&'a mut [f32]>,
}

impl Bound<'_, '_> {
    fn run(mut self, backend: &mut dyn Backend) -> Result<()> {
        let kernel = self.kernel;
        if kernel.direct {
            let start = Instant::now();
            let ran = backend.run_host(kernel.id()?, &self.inputs, &mut self.outputs)?;
            if ran {
                kernel.run_time.set(kernel.run_time.get() + start.elapsed());
                return Ok(());
            }
        }
        for (index, (data, slot)) in self.inputs.iter().zip(&kernel.spec.inputs).enumerate() {
            if self.weights[index] {
                let key = Some((data.as_ptr() as usize, data.len()));
                if kernel.written.borrow()[index] == key {
                    continue;
                }
                kernel.write_weight(backend, &slot.name, data)?;
                kernel.written.borrow_mut()[index] = key;
            } else {
                kernel.write(backend, &slot.name, data)?;
            }
        }
        kernel.run(backend)?;
        for (dst, slot) in self.outputs.iter_mut().zip(&kernel.spec.outputs) {
            kernel.read(backend, &slot.name, dst)?;
        }
        Ok(())
    }
}
