//! One training step over the backend trait: embedding, then per layer the
//! forward kernels (with RMSNorm and residuals on the CPU), classifier and loss
//! on the CPU, then the backward-dx kernels in reverse with weight gradients
//! by CPU GEMM. Layer-major: every sequence of the batch passes through layer
//! `l` before layer `l+1`, so each layer's weights are written once per pass.
//!
//! Activations are `(C, T)` channel-major on the host, the layout of the
//! kernels' `[1, C, 1, T]` tensors; all buffers are allocated once and reused.

use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant};

use crate::backend::{Backend, Block, BufferId, HostCall, KernelId};
use crate::linalg::{gemm, n, t};
use crate::model::host;
use crate::model::kernels::{
    KernelOptions, KernelSpec, LayerKernels, Slot, SlotKind, WeightMode, transpose,
};
use crate::model::{ModelConfig, Param, Weights};
use crate::train::optim;
use crate::{Error, Result};

/// A compiled kernel with its buffers.
pub struct Kernel {
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

impl Kernel {
    pub fn new(backend: &mut dyn Backend, spec: KernelSpec) -> Result<Kernel> {
        let id = backend.compile(&spec.package)?;
        let info = backend.kernel_info(id).clone();
        let inputs = info
            .inputs
            .iter()
            .map(|v| backend.alloc(&v.ty))
            .collect::<Result<Vec<_>>>()?;
        let outputs = info
            .outputs
            .iter()
            .map(|v| backend.alloc(&v.ty))
            .collect::<Result<Vec<_>>>()?;
        let whole = |slots: &[Slot], vars: &[crate::mil::Var]| {
            slots.len() == vars.len()
                && slots.iter().enumerate().all(|(i, s)| {
                    s.buffer == i
                        && s.row == 0
                        && s.col == 0
                        && s.rows * s.cols == vars[i].ty.numel()
                        && s.kind != SlotKind::Weight { transposed: true }
                })
        };
        let direct = whole(&spec.inputs, &info.inputs) && whole(&spec.outputs, &info.outputs);
        let written = RefCell::new(vec![None; spec.inputs.len()]);
        Ok(Kernel {
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

    /// Write an activation `(rows, cols)` row-major.
    pub fn write(&self, backend: &mut dyn Backend, name: &str, data: &[f32]) -> Result<()> {
        let s = self.spec.input(name);
        debug_assert_eq!(s.kind, SlotKind::Activation);
        let block = Block {
            row: s.row,
            rows: s.rows,
            col: s.col,
            cols: s.cols,
        };
        let start = Instant::now();
        let result = backend.write(self.inputs[s.buffer], block, data);
        self.io_time.set(self.io_time.get() + start.elapsed());
        result
    }

    /// Write a weight given as the parameter is stored (`[out, in]` row-major);
    /// transposes when the slot wants `W^T`.
    pub fn write_weight(&self, backend: &mut dyn Backend, name: &str, w: &[f32]) -> Result<()> {
        let s = self.spec.input(name);
        let block = Block {
            row: s.row,
            rows: s.rows,
            col: s.col,
            cols: s.cols,
        };
        let start = Instant::now();
        let result = match s.kind {
            SlotKind::Weight { transposed: true } => {
                // Slot holds W^T (rows x cols), so W is (cols x rows).
                let wt = transpose(w, s.cols, s.rows);
                backend.write(self.inputs[s.buffer], block, &wt)
            }
            _ => backend.write(self.inputs[s.buffer], block, w),
        };
        self.io_time.set(self.io_time.get() + start.elapsed());
        result
    }

    pub fn run(&self, backend: &mut dyn Backend) -> Result<()> {
        let start = Instant::now();
        let result = backend.run(self.id, &self.inputs, &self.outputs);
        self.run_time.set(self.run_time.get() + start.elapsed());
        result
    }

    /// Read an output `(rows, cols)` row-major into `dst`.
    pub fn read(&self, backend: &dyn Backend, name: &str, dst: &mut [f32]) -> Result<()> {
        let s = self.spec.output(name);
        let block = Block {
            row: s.row,
            rows: s.rows,
            col: s.col,
            cols: s.cols,
        };
        let start = Instant::now();
        let result = backend.read(self.outputs[s.buffer], block, dst);
        self.io_time.set(self.io_time.get() + start.elapsed());
        result
    }

    /// Add this kernel's run time (under its name) and buffer I/O time (under
    /// `io`) to `profile`, and reset them.
    fn take_times(&self, profile: &mut Profile) {
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
    kernel: &'k Kernel,
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
            .position(|s| s.name == name)
            .unwrap_or_else(|| panic!("kernel {} has no input `{name}`", spec.name))
    }

    /// Bind activation `name`, `(rows, cols)` row-major.
    pub fn input(mut self, name: &str, data: &'a [f32]) -> Self {
        let i = self.input_index(name);
        self.inputs[i] = Some(data);
        self
    }

    /// Bind weight `name` as the parameter is stored (`[out, in]` row-major).
    /// Its values must not change until [`Kernel::new_pass`].
    pub fn weight(mut self, name: &str, w: &'a [f32]) -> Self {
        let i = self.input_index(name);
        self.inputs[i] = Some(w);
        self.weights[i] = true;
        self
    }

    /// Bind output `name`, `(rows, cols)` row-major, overwritten by the run.
    pub fn output(mut self, name: &str, dst: &'a mut [f32]) -> Self {
        let spec = &self.kernel.spec;
        let j = spec
            .outputs
            .iter()
            .position(|s| s.name == name)
            .unwrap_or_else(|| panic!("kernel {} has no output `{name}`", spec.name));
        self.outputs[j] = Some(dst);
        self
    }

    pub fn run(self, backend: &mut dyn Backend) -> Result<()> {
        self.bind()?.run(backend)
    }

    /// Check that every slot is bound and take the arrays in slot order.
    fn bind(self) -> Result<Bound<'k, 'a>> {
        let k = self.kernel;
        let unbound = |slots: &[Slot], bound: Vec<bool>| {
            slots
                .iter()
                .zip(bound)
                .filter(|(_, b)| !b)
                .map(|(s, _)| s.name.clone())
                .collect::<Vec<_>>()
        };
        let missing: Vec<String> = unbound(
            &k.spec.inputs,
            self.inputs.iter().map(Option::is_some).collect(),
        )
        .into_iter()
        .chain(unbound(
            &k.spec.outputs,
            self.outputs.iter().map(Option::is_some).collect(),
        ))
        .collect();
        if !missing.is_empty() {
            return Err(Error::Invalid(format!(
                "kernel {}: nothing bound to {}",
                k.spec.name,
                missing.join(", ")
            )));
        }
        Ok(Bound {
            kernel: k,
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
    let Some(k) = bound.first().map(|b| b.kernel) else {
        return Ok(());
    };
    if k.direct && bound.len() > 1 {
        let mut host: Vec<HostCall> = bound
            .iter_mut()
            .map(|b| HostCall {
                inputs: b.inputs.clone(),
                outputs: b.outputs.iter_mut().map(|o| &mut **o).collect(),
            })
            .collect();
        let start = Instant::now();
        if backend.run_host_many(k.id, &mut host)? {
            k.run_time.set(k.run_time.get() + start.elapsed());
            return Ok(());
        }
    }
    bound.into_iter().try_for_each(|b| b.run(backend))
}

/// A [`Call`] with every slot bound, arrays in slot order.
struct Bound<'k, 'a> {
    kernel: &'k Kernel,
    inputs: Vec<&'a [f32]>,
    weights: Vec<bool>,
    outputs: Vec<&'a mut [f32]>,
}

impl Bound<'_, '_> {
    fn run(mut self, backend: &mut dyn Backend) -> Result<()> {
        let k = self.kernel;
        if k.direct {
            let start = Instant::now();
            let ran = backend.run_host(k.id, &self.inputs, &mut self.outputs)?;
            if ran {
                k.run_time.set(k.run_time.get() + start.elapsed());
                return Ok(());
            }
        }
        for (i, (data, slot)) in self.inputs.iter().zip(&k.spec.inputs).enumerate() {
            if self.weights[i] {
                let key = Some((data.as_ptr() as usize, data.len()));
                if k.written.borrow()[i] == key {
                    continue;
                }
                k.write_weight(backend, &slot.name, data)?;
                k.written.borrow_mut()[i] = key;
            } else {
                k.write(backend, &slot.name, data)?;
            }
        }
        k.run(backend)?;
        for (dst, slot) in self.outputs.iter_mut().zip(&k.spec.outputs) {
            k.read(backend, &slot.name, dst)?;
        }
        Ok(())
    }
}

/// Wall time per phase, summed over the passes since the last
/// [`Engine::take_profile`]. Kernel phases are named after the kernel
/// (`attn_fwd`, ...); `io` is writing inputs to and reading outputs from kernel
/// buffers (conversion to the buffer's dtype included).
///
/// `phases` split the wall time: no two run at once. Work that runs beside
/// them (the weight gradients beside the backward kernels, see
/// [`overlapped`]) is in `phases` only for the time the step waited for it,
/// and in `side_by_side` for its whole time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Profile {
    pub phases: Vec<(String, Duration)>,
    pub side_by_side: Vec<(String, Duration)>,
}

impl Profile {
    /// Add the time elapsed since `start` to `phase`.
    pub fn add(&mut self, phase: &str, start: Instant) {
        self.add_duration(phase, start.elapsed());
    }

    /// Run `f`, adding its wall time to `phase`.
    pub fn time<R>(&mut self, phase: &str, f: impl FnOnce() -> R) -> R {
        let start = Instant::now();
        let result = f();
        self.add(phase, start);
        result
    }

    pub fn add_duration(&mut self, phase: &str, d: Duration) {
        add_to(&mut self.phases, phase, d);
    }

    /// Add `d` to the time of `phase` run beside the phases.
    pub fn add_side_by_side(&mut self, phase: &str, d: Duration) {
        add_to(&mut self.side_by_side, phase, d);
    }

    pub fn total(&self) -> Duration {
        self.phases.iter().map(|(_, d)| *d).sum()
    }
}

fn add_to(phases: &mut Vec<(String, Duration)>, phase: &str, d: Duration) {
    match phases.iter_mut().find(|(name, _)| name == phase) {
        Some((_, total)) => *total += d,
        None => phases.push((phase.to_string(), d)),
    }
}

/// Saved forward state of one layer for one sequence (shapes `(channels, T)`).
#[derive(Clone, Default)]
struct LayerActs {
    x: Vec<f32>,      // (C, T) layer input
    xn: Vec<f32>,     // (C, T)
    rrms1: Vec<f32>,  // (T)
    attn: Vec<f32>,   // (Qd, T)
    q_rope: Vec<f32>, // (Qd, T)
    k_rope: Vec<f32>, // (KVd, T)
    v: Vec<f32>,      // (KVd, T)
    x2: Vec<f32>,     // (C, T)
    x2n: Vec<f32>,    // (C, T)
    rrms2: Vec<f32>,  // (T)
    h1: Vec<f32>,     // (F, T)
    h3: Vec<f32>,     // (F, T)
    gate: Vec<f32>,   // (F, T)
}

impl LayerActs {
    fn new(c: &ModelConfig, seq: usize) -> LayerActs {
        let (d, q, kv, f) = (c.dim, c.q_dim(), c.kv_dim(), c.hidden_dim);
        LayerActs {
            x: vec![0.0; d * seq],
            xn: vec![0.0; d * seq],
            rrms1: vec![0.0; seq],
            attn: vec![0.0; q * seq],
            q_rope: vec![0.0; q * seq],
            k_rope: vec![0.0; kv * seq],
            v: vec![0.0; kv * seq],
            x2: vec![0.0; d * seq],
            x2n: vec![0.0; d * seq],
            rrms2: vec![0.0; seq],
            h1: vec![0.0; f * seq],
            h3: vec![0.0; f * seq],
            gate: vec![0.0; f * seq],
        }
    }
}

/// The nine compiled layer kernels.
struct Kernels {
    attn_fwd: Kernel,
    wo_fwd: Kernel,
    ffn_fwd: Kernel,
    ffn_bwd_w2: Kernel,
    ffn_bwd_w13: Kernel,
    wo_bwd: Kernel,
    attn_bwd: Kernel,
    q_bwd: Kernel,
    kv_bwd: Kernel,
}

impl Kernels {
    fn all(&self) -> [&Kernel; 9] {
        [
            &self.attn_fwd,
            &self.wo_fwd,
            &self.ffn_fwd,
            &self.ffn_bwd_w2,
            &self.ffn_bwd_w13,
            &self.wo_bwd,
            &self.attn_bwd,
            &self.q_bwd,
            &self.kv_bwd,
        ]
    }
}

/// Runs forward and backward passes of a model on a backend.
pub struct Engine {
    backend: Box<dyn Backend>,
    config: ModelConfig,
    seq: usize,
    batch: usize,
    kernels: Kernels,
    /// `[layer][sequence]`.
    acts: Vec<Vec<LayerActs>>,
    /// Final residual stream, its norm and rrms per sequence.
    x_final: Vec<Vec<f32>>,
    xf: Vec<Vec<f32>>,
    rrms_final: Vec<Vec<f32>>,
    /// Sequences whose positions go through the classifier together.
    head_group: usize,
    /// `(V, head_group * T)`: the logits of one group, then their gradient.
    logits: Vec<f32>,
    /// Host-side phases since the last `take_profile`.
    profile: Profile,
    scratch: Scratch,
    /// Squared norms of the parameters' gradients, each taken as the last
    /// pass finished it (see [`Engine::grad_norm`]).
    grad_sq: Vec<f64>,
}

impl Engine {
    /// Compile the layer kernels for `config` at window `seq` for `batch` sequences.
    pub fn new(
        mut backend: Box<dyn Backend>,
        config: &ModelConfig,
        seq: usize,
        batch: usize,
        opts: KernelOptions,
    ) -> Result<Engine> {
        config.validate()?;
        if opts.mode == WeightMode::Baked {
            return Err(Error::Invalid(
                "training needs kernels with runtime weights (packed or inputs); baked weights are for frozen models".into(),
            ));
        }
        if seq == 0 || seq > config.seq_len {
            return Err(Error::Invalid(format!(
                "sequence length {seq} must be between 1 and the model's seq_len {}",
                config.seq_len
            )));
        }
        let specs = LayerKernels::build(config, seq, opts, &|_| None)?;
        let b = backend.as_mut();
        let kernels = Kernels {
            attn_fwd: Kernel::new(b, specs.attn_fwd)?,
            wo_fwd: Kernel::new(b, specs.wo_fwd)?,
            ffn_fwd: Kernel::new(b, specs.ffn_fwd)?,
            ffn_bwd_w2: Kernel::new(b, specs.ffn_bwd_w2)?,
            ffn_bwd_w13: Kernel::new(b, specs.ffn_bwd_w13)?,
            wo_bwd: Kernel::new(b, specs.wo_bwd)?,
            attn_bwd: Kernel::new(b, specs.attn_bwd)?,
            q_bwd: Kernel::new(b, specs.q_bwd)?,
            kv_bwd: Kernel::new(b, specs.kv_bwd)?,
        };
        let acts = (0..config.n_layers)
            .map(|_| (0..batch).map(|_| LayerActs::new(config, seq)).collect())
            .collect();
        let d = config.dim;
        let head_group = (LOGITS_FLOATS / (config.vocab_size * seq)).clamp(1, batch);
        Ok(Engine {
            backend,
            config: config.clone(),
            seq,
            batch,
            kernels,
            acts,
            x_final: vec![vec![0.0; d * seq]; batch],
            xf: vec![vec![0.0; d * seq]; batch],
            rrms_final: vec![vec![0.0; seq]; batch],
            head_group,
            logits: vec![0.0; head_group * seq * config.vocab_size],
            profile: Profile::default(),
            scratch: Scratch::default(),
            grad_sq: Vec::new(),
        })
    }

    /// Wall time per phase since the last call: every kernel by name, `io`, and
    /// the host phases (`embedding`, `rmsnorm`, `residual`, `classifier`, `loss`,
    /// `dW gemm`). With two or more worker threads the weight gradients run
    /// beside the backward kernels and are also listed as run side by side
    /// (see [`Profile`]).
    pub fn take_profile(&mut self) -> Profile {
        let mut profile = std::mem::take(&mut self.profile);
        for kernel in self.kernels.all() {
            kernel.take_times(&mut profile);
        }
        profile
    }

    /// The L2 norm of the gradients as the last [`Engine::forward_backward`]
    /// (or `_as`) left them: each parameter's sum of squares is taken
    /// right after its last product or sum of that pass, while it is still in
    /// cache (most of them beside the next backward kernel), instead of in a
    /// pass over every gradient after the step. Each sum is
    /// [`optim::sum_squares`]'s, added in a fixed order, so the value does not
    /// depend on the threads; it equals [`optim::global_norm`] of the whole
    /// gradient up to rounding.
    pub fn grad_norm(&self) -> f64 {
        self.grad_sq.iter().sum::<f64>().sqrt()
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    pub fn seq(&self) -> usize {
        self.seq
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    fn check_tokens(&self, tokens: &[u32], what: &str) -> Result<()> {
        if tokens.len() != self.batch * self.seq {
            return Err(Error::Invalid(format!(
                "{what}: expected {} tokens (batch {} x seq {}), got {}",
                self.batch * self.seq,
                self.batch,
                self.seq,
                tokens.len()
            )));
        }
        if let Some((i, &tok)) = tokens
            .iter()
            .enumerate()
            .find(|(_, t)| **t as usize >= self.config.vocab_size)
        {
            return Err(Error::Invalid(format!(
                "{what}: token id {tok} at position {i} is outside the model's vocabulary of {}",
                self.config.vocab_size
            )));
        }
        Ok(())
    }

    /// Forward through every layer, saving activations; leaves the final norm in `xf`.
    fn forward(&mut self, w: &Weights, inputs: &[u32]) -> Result<()> {
        let c = self.config.clone();
        let (seq, d) = (self.seq, c.dim);
        let be = self.backend.as_mut();
        let k = &self.kernels;
        for b in 0..self.batch {
            let x = &mut self.acts[0][b].x;
            self.profile.time("embedding", || {
                host::embedding_forward(
                    x,
                    w.get(Param::Embedding),
                    &inputs[b * seq..(b + 1) * seq],
                    d,
                )
            });
        }
        for kernel in k.all() {
            kernel.new_pass();
        }
        // Stage by stage, every sequence of the batch through each kernel in
        // one `run_many` (side by side where the backend can).
        for l in 0..c.n_layers {
            let (done, rest) = self.acts.split_at_mut(l + 1);
            let acts = &mut done[l];
            for a in acts.iter_mut() {
                self.profile.time("rmsnorm", || {
                    host::rmsnorm_forward(
                        &mut a.xn,
                        &mut a.rrms1,
                        &a.x,
                        w.get(Param::RmsAtt(l)),
                        c.norm_eps,
                    )
                });
            }
            run_many(
                be,
                acts.iter_mut().map(|a| {
                    k.attn_fwd
                        .call()
                        .weight("wq", w.get(Param::Wq(l)))
                        .weight("wk", w.get(Param::Wk(l)))
                        .weight("wv", w.get(Param::Wv(l)))
                        .input("xn", &a.xn)
                        .output("attn", &mut a.attn)
                        .output("q_rope", &mut a.q_rope)
                        .output("k_rope", &mut a.k_rope)
                        .output("v", &mut a.v)
                }),
            )?;
            run_many(
                be,
                acts.iter_mut().map(|a| {
                    k.wo_fwd
                        .call()
                        .weight("wo", w.get(Param::Wo(l)))
                        .input("attn", &a.attn)
                        .output("o", &mut a.x2)
                }),
            )?;
            for a in acts.iter_mut() {
                for (x2, x) in a.x2.iter_mut().zip(&a.x) {
                    *x2 += x;
                }
                self.profile.time("rmsnorm", || {
                    host::rmsnorm_forward(
                        &mut a.x2n,
                        &mut a.rrms2,
                        &a.x2,
                        w.get(Param::RmsFfn(l)),
                        c.norm_eps,
                    )
                });
            }
            let mut outs: Vec<&mut Vec<f32>> = match rest.first_mut() {
                Some(next) => next.iter_mut().map(|a| &mut a.x).collect(),
                None => self.x_final.iter_mut().collect(),
            };
            run_many(
                be,
                acts.iter_mut().zip(outs.iter_mut()).map(|(a, out)| {
                    k.ffn_fwd
                        .call()
                        .weight("w1", w.get(Param::W1(l)))
                        .weight("w3", w.get(Param::W3(l)))
                        .weight("w2", w.get(Param::W2(l)))
                        .input("x2n", &a.x2n)
                        .output("h1", &mut a.h1)
                        .output("h3", &mut a.h3)
                        .output("gate", &mut a.gate)
                        .output("ffn", out)
                }),
            )?;
            for (a, out) in acts.iter().zip(outs) {
                for (o, x2) in out.iter_mut().zip(&a.x2) {
                    *o += x2;
                }
            }
        }
        for b in 0..self.batch {
            self.profile.time("rmsnorm", || {
                host::rmsnorm_forward(
                    &mut self.xf[b],
                    &mut self.rrms_final[b],
                    &self.x_final[b],
                    w.get(Param::RmsFinal),
                    c.norm_eps,
                )
            });
        }
        Ok(())
    }

    /// Logits `(V, P)` of sequences `b0..b1` side by side (`P = (b1 - b0) T`)
    /// into `self.logits`, after a forward pass.
    fn classify(&mut self, w: &Weights, b0: usize, b1: usize) {
        let (d, p) = (self.config.dim, (b1 - b0) * self.seq);
        let x = gather(&mut self.scratch.head_x, &self.xf[b0..b1], d, self.seq);
        let logits = &mut self.logits[..self.config.vocab_size * p];
        self.profile.time("classifier", || {
            host::classifier_forward(logits, x, w.classifier(), d)
        });
    }

    /// Sequences per classifier group: by default as many as fit in
    /// [`LOGITS_FLOATS`] logits (at least one). Fewer means less memory.
    pub fn set_head_group(&mut self, sequences: usize) {
        self.head_group = sequences.clamp(1, self.batch);
        self.logits = vec![0.0; self.head_group * self.seq * self.config.vocab_size];
    }

    /// The groups of sequences that go through the classifier together.
    fn head_groups(&self) -> impl Iterator<Item = (usize, usize)> + use<> {
        let (group, batch) = (self.head_group, self.batch);
        (0..batch)
            .step_by(group)
            .map(move |b0| (b0, (b0 + group).min(batch)))
    }

    /// Mean cross-entropy over all `batch * seq` positions, forward only.
    pub fn loss(&mut self, w: &Weights, inputs: &[u32], targets: &[u32]) -> Result<f64> {
        self.check_tokens(inputs, "inputs")?;
        self.check_tokens(targets, "targets")?;
        self.forward(w, inputs)?;
        let seq = self.seq;
        let mut total = 0.0;
        for (b0, b1) in self.head_groups() {
            self.classify(w, b0, b1);
            let p = (b1 - b0) * seq;
            let logits = &mut self.logits[..self.config.vocab_size * p];
            let stats = &mut self.scratch.head_stats;
            total += self.profile.time("loss", || {
                host::cross_entropy(logits, &targets[b0 * seq..b1 * seq], None, stats)
            });
        }
        Ok(total / (self.batch * seq) as f64)
    }

    /// Logits `(T, V)` of every sequence after a forward pass over `inputs`.
    pub fn logits(&mut self, w: &Weights, inputs: &[u32]) -> Result<Vec<Vec<f32>>> {
        self.check_tokens(inputs, "inputs")?;
        self.forward(w, inputs)?;
        let (seq, vocab) = (self.seq, self.config.vocab_size);
        let mut out = Vec::new();
        for b in 0..self.batch {
            self.classify(w, b, b + 1);
            let mut rows = vec![0.0; seq * vocab];
            crate::linalg::transpose_into(&self.logits[..vocab * seq], vocab, seq, &mut rows);
            out.push(rows);
        }
        Ok(out)
    }

    /// Forward and backward: adds `loss_scale * d(mean loss)/dw` to `grads` and
    /// returns the mean loss (unscaled).
    pub fn forward_backward(
        &mut self,
        w: &Weights,
        grads: &mut Weights,
        inputs: &[u32],
        targets: &[u32],
        loss_scale: f32,
    ) -> Result<f64> {
        self.forward_backward_as(w, grads, GradWrite::Add, inputs, targets, loss_scale)
    }

    /// [`Engine::forward_backward`], adding to the gradients or, with
    /// [`GradWrite::Overwrite`] (the first micro-batch of a step), writing
    /// over them, whatever they held: the weight matrices' first products
    /// replace instead of adding (no pass to zero them, no read of the zeros),
    /// and only the gradients made by sums (norm weights, an untied embedding)
    /// are zeroed first. The values equal those of zeroing `grads` and adding.
    #[allow(clippy::needless_range_loop)]
    pub fn forward_backward_as(
        &mut self,
        w: &Weights,
        grads: &mut Weights,
        write: GradWrite,
        inputs: &[u32],
        targets: &[u32],
        loss_scale: f32,
    ) -> Result<f64> {
        self.check_tokens(inputs, "inputs")?;
        self.check_tokens(targets, "targets")?;
        self.forward(w, inputs)?;
        if write == GradWrite::Overwrite {
            // The gradients made by sums start from zero: the norm weights'
            // and an untied embedding's (a tied one is the classifier's,
            // whose first product writes it before the scatter adds).
            for p in grads.layout.params() {
                let summed = p.is_norm() || p == Param::Embedding && !self.config.tied_embeddings;
                if summed {
                    let range = grads.layout.range(p);
                    grads.data[range].fill(0.0);
                }
            }
        }
        let mut sq = std::mem::take(&mut self.grad_sq);
        sq.clear();
        let c = self.config.clone();
        let (seq, d, q, kv, f) = (self.seq, c.dim, c.q_dim(), c.kv_dim(), c.hidden_dim);
        let classifier = w.layout.classifier();
        let grad_scale = loss_scale / (self.batch * seq) as f32;
        let mut total = 0.0;
        // dx (C, T) per sequence: gradient flowing into the residual stream.
        let mut dx: Vec<Vec<f32>> = std::mem::take(&mut self.scratch.dx);
        dx.resize_with(self.batch, Vec::new);
        for dx in &mut dx {
            dx.clear();
            dx.resize(d * seq, 0.0);
        }
        // With several groups, E^T once per step: the classifier's dx product
        // then has a row-major left operand (faer's fast form) for all of them.
        let vocab = c.vocab_size;
        let groups = self.batch.div_ceil(self.head_group);
        let mut classifier_t = std::mem::take(&mut self.scratch.classifier_t);
        if groups > 1 {
            classifier_t.resize(d * vocab, 0.0);
            self.profile.time("classifier", || {
                crate::linalg::transpose_into(w.classifier(), vocab, d, &mut classifier_t)
            });
        }
        let mut dxf = reuse(&mut self.scratch.dxf, d * seq);
        let mut head_dx = std::mem::take(&mut self.scratch.head_dx);
        for (b0, b1) in self.head_groups() {
            self.classify(w, b0, b1);
            let p = (b1 - b0) * seq;
            let logits = &mut self.logits[..vocab * p];
            let stats = &mut self.scratch.head_stats;
            total += self.profile.time("loss", || {
                host::cross_entropy(
                    logits,
                    &targets[b0 * seq..b1 * seq],
                    Some(grad_scale),
                    stats,
                )
            });
            let dcls = grads.get_mut(classifier);
            // The group's activations, as `classify` gathered them.
            let x = match &self.xf[b0..b1] {
                [one] => one.as_slice(),
                _ => &self.scratch.head_x[..d * p],
            };
            let dx_group = if b1 - b0 == 1 {
                &mut dxf
            } else {
                head_dx.resize(d * p, 0.0);
                &mut head_dx
            };
            let add = write == GradWrite::Add || b0 > 0;
            self.profile.time("classifier", || {
                let e_t = (groups > 1).then_some(classifier_t.as_slice());
                host::classifier_backward(dx_group, dcls, logits, x, w.classifier(), e_t, d, add)
            });
            for b in b0..b1 {
                if b1 - b0 > 1 {
                    let k = b - b0;
                    for (ch, row) in dxf.chunks_exact_mut(seq).enumerate() {
                        row.copy_from_slice(&head_dx[ch * p + k * seq..][..seq]);
                    }
                }
                self.profile.time("rmsnorm", || {
                    host::rmsnorm_backward(
                        &mut dx[b],
                        &mut grads.data[w.layout.range(Param::RmsFinal)],
                        &dxf,
                        &self.x_final[b],
                        w.get(Param::RmsFinal),
                        &self.rrms_final[b],
                    )
                });
            }
        }
        self.scratch.classifier_t = classifier_t;
        self.scratch.head_dx = head_dx;
        finished(&mut sq, grads, Param::RmsFinal);
        if !c.tied_embeddings {
            finished(&mut sq, grads, Param::Classifier);
        }
        let be = self.backend.as_mut();
        let k = &self.kernels;
        let batch = self.batch;
        let sc = &mut self.scratch;
        let mut dgate = reuse_each(&mut sc.dgate, batch, f * seq);
        let mut dh1 = reuse_each(&mut sc.dh1, batch, f * seq);
        let mut dh3 = reuse_each(&mut sc.dh3, batch, f * seq);
        let mut dx2n = reuse_each(&mut sc.dx2n, batch, d * seq);
        let mut dattn = reuse_each(&mut sc.dattn, batch, q * seq);
        let mut dq = reuse_each(&mut sc.dq, batch, q * seq);
        let mut dk = reuse_each(&mut sc.dk, batch, kv * seq);
        let mut dv = reuse_each(&mut sc.dv, batch, kv * seq);
        let mut dxn = reuse_each(&mut sc.dxn, batch, d * seq);
        let mut dxn_kv = reuse_each(&mut sc.dxn_kv, batch, d * seq);
        let profile = &mut self.profile;
        let acts = &self.acts;
        // Stage by stage, every sequence of the batch through each backward
        // kernel in one `run_many` (side by side where the backend can), while
        // the weight gradients of a finished stage run beside it (see
        // `overlapped`), in shares of about the kernel's size: `dW2`, `dW1`,
        // `dW3` beside the next kernel each, `dWo` and `dWq` beside `q_bwd` and
        // `kv_bwd`, and `dWk`, `dWv` beside the next `ffn_bwd_w2` (the layer
        // below), whose inputs (`dk`, `dv`) are not overwritten before then.
        // Each gradient sums its sequences in batch order.
        let mut pending_kv: Option<usize> = None;
        let kv_grads =
            |grads: &mut Weights, sq: &mut Vec<f64>, l: usize, dk: &[Vec<f32>], dv: &[Vec<f32>]| {
                for (p, dys) in [(Param::Wk(l), dk), (Param::Wv(l), dv)] {
                    param_grads(grads, sq, p, dys, &acts[l], |a| &a.xn, (seq, write));
                }
            };
        for l in (0..c.n_layers).rev() {
            let la = &acts[l];
            // x_out = x2 + W2 gate: dffn = dx; dx2 starts as dx.
            overlapped(
                profile,
                || {
                    run_many(
                        be,
                        dx.iter().zip(dgate.iter_mut()).map(|(dffn, dgate)| {
                            k.ffn_bwd_w2
                                .call()
                                .weight("w2", w.get(Param::W2(l)))
                                .input("dffn", dffn)
                                .output("dgate", dgate)
                        }),
                    )
                },
                || {
                    if let Some(at) = pending_kv.take() {
                        kv_grads(grads, &mut sq, at, &dk, &dv);
                    }
                },
            )?;
            overlapped(
                profile,
                || {
                    run_many(
                        be,
                        la.iter()
                            .zip(&dgate)
                            .zip(dx2n.iter_mut().zip(dh1.iter_mut().zip(dh3.iter_mut())))
                            .map(|((a, dgate), (dx2n, (dh1, dh3)))| {
                                k.ffn_bwd_w13
                                    .call()
                                    .weight("w1", w.get(Param::W1(l)))
                                    .weight("w3", w.get(Param::W3(l)))
                                    .input("dgate", dgate)
                                    .input("h1", &a.h1)
                                    .input("h3", &a.h3)
                                    .output("dx2n", dx2n)
                                    .output("dh1", dh1)
                                    .output("dh3", dh3)
                            }),
                    )
                },
                || {
                    param_grads(
                        grads,
                        &mut sq,
                        Param::W2(l),
                        &dx,
                        la,
                        |a| &a.gate,
                        (seq, write),
                    );
                },
            )?;
            // dx2 = dx + rmsnorm_backward(dx2n); computed in place in dx[b].
            let range = w.layout.range(Param::RmsFfn(l));
            for ((dx, dx2n), a) in dx.iter_mut().zip(&dx2n).zip(la) {
                profile.time("rmsnorm", || {
                    host::rmsnorm_backward(
                        dx,
                        &mut grads.data[range.clone()],
                        dx2n,
                        &a.x2,
                        w.get(Param::RmsFfn(l)),
                        &a.rrms2,
                    )
                });
            }
            finished(&mut sq, grads, Param::RmsFfn(l));
            overlapped(
                profile,
                || {
                    run_many(
                        be,
                        dx.iter().zip(dattn.iter_mut()).map(|(dx2, dattn)| {
                            k.wo_bwd
                                .call()
                                .weight("wo", w.get(Param::Wo(l)))
                                .input("dx2", dx2)
                                .output("dattn", dattn)
                        }),
                    )
                },
                || {
                    param_grads(
                        grads,
                        &mut sq,
                        Param::W1(l),
                        &dh1,
                        la,
                        |a| &a.x2n,
                        (seq, write),
                    );
                },
            )?;
            overlapped(
                profile,
                || {
                    run_many(
                        be,
                        la.iter()
                            .zip(&dattn)
                            .zip(dq.iter_mut().zip(dk.iter_mut().zip(dv.iter_mut())))
                            .map(|((a, dattn), (dq, (dk, dv)))| {
                                k.attn_bwd
                                    .call()
                                    .input("q_rope", &a.q_rope)
                                    .input("k_rope", &a.k_rope)
                                    .input("v", &a.v)
                                    .input("dattn", dattn)
                                    .output("dq", dq)
                                    .output("dk", dk)
                                    .output("dv", dv)
                            }),
                    )
                },
                || {
                    param_grads(
                        grads,
                        &mut sq,
                        Param::W3(l),
                        &dh3,
                        la,
                        |a| &a.x2n,
                        (seq, write),
                    );
                },
            )?;
            overlapped(
                profile,
                || {
                    run_many(
                        be,
                        dq.iter().zip(dxn.iter_mut()).map(|(dq, dxn)| {
                            k.q_bwd
                                .call()
                                .weight("wq", w.get(Param::Wq(l)))
                                .input("dq", dq)
                                .output("dxn", dxn)
                        }),
                    )?;
                    run_many(
                        be,
                        dk.iter()
                            .zip(&dv)
                            .zip(dxn_kv.iter_mut())
                            .map(|((dk, dv), dxn)| {
                                k.kv_bwd
                                    .call()
                                    .weight("wk", w.get(Param::Wk(l)))
                                    .weight("wv", w.get(Param::Wv(l)))
                                    .input("dk", dk)
                                    .input("dv", dv)
                                    .output("dxn", dxn)
                            }),
                    )?;
                    for (dxn, dxn_kv) in dxn.iter_mut().zip(&dxn_kv) {
                        for (a, b) in dxn.iter_mut().zip(dxn_kv) {
                            *a += b;
                        }
                    }
                    Ok(())
                },
                || {
                    param_grads(
                        grads,
                        &mut sq,
                        Param::Wo(l),
                        &dx,
                        la,
                        |a| &a.attn,
                        (seq, write),
                    );
                    param_grads(
                        grads,
                        &mut sq,
                        Param::Wq(l),
                        &dq,
                        la,
                        |a| &a.xn,
                        (seq, write),
                    );
                },
            )?;
            pending_kv = Some(l);
            let range = w.layout.range(Param::RmsAtt(l));
            for ((dx, dxn), a) in dx.iter_mut().zip(&dxn).zip(la) {
                profile.time("rmsnorm", || {
                    host::rmsnorm_backward(
                        dx,
                        &mut grads.data[range.clone()],
                        dxn,
                        &a.x,
                        w.get(Param::RmsAtt(l)),
                        &a.rrms1,
                    )
                });
            }
            finished(&mut sq, grads, Param::RmsAtt(l));
        }
        if let Some(at) = pending_kv {
            profile.time("dW gemm", || kv_grads(grads, &mut sq, at, &dk, &dv));
        }
        for b in 0..self.batch {
            self.profile.time("embedding", || {
                host::embedding_backward(
                    grads.get_mut(Param::Embedding),
                    &dx[b],
                    &inputs[b * seq..(b + 1) * seq],
                    d,
                )
            });
        }
        finished(&mut sq, grads, Param::Embedding);
        self.grad_sq = sq;
        self.scratch = Scratch {
            dx,
            dxf,
            head_x: std::mem::take(&mut self.scratch.head_x),
            head_dx: std::mem::take(&mut self.scratch.head_dx),
            classifier_t: std::mem::take(&mut self.scratch.classifier_t),
            head_stats: std::mem::take(&mut self.scratch.head_stats),
            dgate,
            dh1,
            dh3,
            dx2n,
            dattn,
            dq,
            dk,
            dv,
            dxn,
            dxn_kv,
        };
        Ok(total / (self.batch * seq) as f64)
    }
}

/// Backward-pass buffers kept between steps (shapes `(channels, T)`; the
/// per-stage ones one per sequence of the batch), so that a step allocates
/// nothing. Taken out of the engine during a pass.
#[derive(Default)]
struct Scratch {
    dx: Vec<Vec<f32>>,
    dxf: Vec<f32>,
    /// The classifier's groups: final-norm activations and their gradient
    /// `(C, head_group * T)`, `E^T (C, V)`, and cross-entropy statistics.
    head_x: Vec<f32>,
    head_dx: Vec<f32>,
    classifier_t: Vec<f32>,
    head_stats: host::CrossEntropyScratch,
    dgate: Vec<Vec<f32>>,
    dh1: Vec<Vec<f32>>,
    dh3: Vec<Vec<f32>>,
    dx2n: Vec<Vec<f32>>,
    dattn: Vec<Vec<f32>>,
    dq: Vec<Vec<f32>>,
    dk: Vec<Vec<f32>>,
    dv: Vec<Vec<f32>>,
    dxn: Vec<Vec<f32>>,
    dxn_kv: Vec<Vec<f32>>,
}

/// Logits of at most this many values (128 MiB) go through the classifier at
/// once: sequences are grouped up to it, because wider products run faster
/// (`stories15m`'s vocabulary products: about 13 % for 4 sequences against 1).
const LOGITS_FLOATS: usize = 1 << 25;

/// Records the sum of squares of `p`'s gradient, which the pass has finished.
fn finished(sq: &mut Vec<f64>, grads: &Weights, p: Param) {
    sq.push(optim::sum_squares(grads.get(p)));
}

/// How [`Engine::forward_backward_as`] writes the gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradWrite {
    /// Add to them.
    Add,
    /// Write over them: each gradient's first contribution replaces.
    Overwrite,
}

/// `dw (O, I) += dy (O, T) x^T` with `x (I, T)` (`=` unless `add`): one
/// sequence's contribution to a weight gradient.
fn weight_grad(dw: &mut [f32], dy: &[f32], x: &[f32], seq: usize, add: bool) {
    let (o, i) = (dy.len() / seq, x.len() / seq);
    gemm(dw, o, i, n(dy, o, seq), t(x, i, seq), 1.0, add);
}

/// [`weight_grad`] of every sequence of a batch into parameter `p`'s gradient:
/// `dys[b]` against `x` of `acts[b]`, summed in batch order (the first
/// replacing the gradient with [`GradWrite::Overwrite`]); then its sum of
/// squares (see [`finished`]).
fn param_grads(
    grads: &mut Weights,
    sq: &mut Vec<f64>,
    p: Param,
    dys: &[Vec<f32>],
    acts: &[LayerActs],
    x: fn(&LayerActs) -> &Vec<f32>,
    (seq, write): (usize, GradWrite),
) {
    let dw = grads.get_mut(p);
    for (b, (dy, a)) in dys.iter().zip(acts).enumerate() {
        weight_grad(dw, dy, x(a), seq, write == GradWrite::Add || b > 0);
    }
    finished(sq, grads, p);
}

/// Runs `kernel` on this thread (the backend belongs to it) while `dw`, the
/// weight gradients of a stage already done, runs on the rayon pool: the
/// products of `dW = dY X^T` are independent of the next backward-dx kernel,
/// and two products side by side use two cores better than one product split
/// over both. The `dW gemm` phase gets the time the step waits for `dw` after
/// the kernel; its whole time is also kept as run side by side (see
/// [`Profile`]). With one worker thread the two run one after the other: the
/// pool's only worker would be busy with `dw` while the kernel waits for it to
/// run its parallel loops.
fn overlapped(
    profile: &mut Profile,
    kernel: impl FnOnce() -> Result<()>,
    dw: impl FnOnce() + Send,
) -> Result<()> {
    const PHASE: &str = "dW gemm";
    if rayon::current_num_threads() < 2 {
        kernel()?;
        profile.time(PHASE, dw);
        return Ok(());
    }
    let mut dw_time = Duration::ZERO;
    let dw_time_ref = &mut dw_time;
    let mut kernel_done = Instant::now();
    let result = rayon::in_place_scope(|s| {
        s.spawn(move |_| {
            let start = Instant::now();
            dw();
            *dw_time_ref = start.elapsed();
        });
        let result = kernel();
        kernel_done = Instant::now();
        result
    });
    profile.add(PHASE, kernel_done);
    profile.add_side_by_side(PHASE, dw_time);
    result
}

/// `x (C, P)` of the sequences `seqs` (each `(C, T)`) side by side: column
/// `k T + t` is position `t` of `seqs[k]`. One sequence is used in place.
fn gather<'a>(buf: &'a mut Vec<f32>, seqs: &'a [Vec<f32>], dim: usize, seq: usize) -> &'a [f32] {
    if let [one] = seqs {
        return one;
    }
    let p = seqs.len() * seq;
    buf.resize(dim * p, 0.0);
    for (k, s) in seqs.iter().enumerate() {
        for (c, row) in s.chunks_exact(seq).enumerate() {
            buf[c * p + k * seq..][..seq].copy_from_slice(row);
        }
    }
    buf
}

/// `buf`'s allocations as `count` vectors of `n` values each (contents
/// unspecified: every user overwrites them), made where missing.
fn reuse_each(buf: &mut Vec<Vec<f32>>, count: usize, n: usize) -> Vec<Vec<f32>> {
    let mut v = std::mem::take(buf);
    v.resize_with(count, Vec::new);
    for b in &mut v {
        b.resize(n, 0.0);
    }
    v
}

/// `buf`'s allocation as a vector of `n` values (contents unspecified: every
/// user overwrites it), or a new one.
fn reuse(buf: &mut Vec<f32>, n: usize) -> Vec<f32> {
    let mut v = std::mem::take(buf);
    v.resize(n, 0.0);
    v
}
