//! A compiled layer kernel and how the host calls it: [`CompiledKernel`]
//! (the backend's kernel with its buffers and clocks) and [`Call`], one run
//! on host arrays bound by slot name, alone or as a batch ([`run_many`]).
//!
//! This module knows nothing about layers, gradients or scheduling: which
//! arrays a kernel reads and writes is the caller's business (`stages`).

use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant};

use crate::backend::{Backend, Block, BufferId, HostCall, KernelId};
use crate::mil::Var;
use crate::model::kernels::{KernelSpec, LayerKernels, SlotRole, TensorSlot, transpose};
use crate::train::profile::Profile;
use crate::{Error, Result};

/// A compiled kernel with its buffers.
pub struct CompiledKernel {
    pub spec: KernelSpec,
    id: KernelId,
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

/// Compile every kernel of a layer's set.
pub fn compile(
    backend: &mut dyn Backend,
    specs: LayerKernels<KernelSpec>,
) -> Result<LayerKernels<CompiledKernel>> {
    specs.try_map(|spec| CompiledKernel::new(backend, spec))
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
            id,
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
        let start = Instant::now();
        let result = backend.run(self.id, &self.inputs, &self.outputs);
        self.run_time.set(self.run_time.get() + start.elapsed());
        result
    }

    /// Read an output `(rows, cols)` row-major into `dst`.
    pub fn read(&self, backend: &dyn Backend, name: &str, dst: &mut [f32]) -> Result<()> {
        let slot = self.spec.output(name);
        self.timed_io(|| backend.read(self.outputs[slot.buffer], block(slot), dst))
    }

    /// Add this kernel's run time (under its name) and buffer I/O time (under
    /// `io`) to `profile`, and reset them.
    pub fn take_times(&self, profile: &mut Profile) {
        profile.add_duration(&self.spec.name, self.run_time.take());
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

    /// Bind weight `name` as the parameter is stored (`[out, in]` row-major).
    /// Its values must not change until [`CompiledKernel::new_pass`].
    pub fn weight(mut self, name: &str, weight: &'a [f32]) -> Self {
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
        if backend.run_host_many(kernel.id, &mut host)? {
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
            let ran = backend.run_host(kernel.id, &self.inputs, &mut self.outputs)?;
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
