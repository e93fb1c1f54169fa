//! LoRA adapters: low-rank updates `W x + s B A x` of a frozen model's
//! projections, `A (r, in)`, `B (out, r)`, `s = alpha / r` (PEFT's scale;
//! `alpha / sqrt(r)` with rsLoRA).
//!
//! [`LoraConfig`] says which projections ([`Target`]) of which layers carry
//! an adapter; [`Adapters`] holds them all in one flat `f32` vector (layers
//! ascending, targets in [`Target::ALL`] order, each A then B), so that
//! AdamW, clipping and checkpoints are single passes as for [`Weights`].
//! The rows of B of the q and k projections are in anemone's interleaved
//! RoPE order, like the base rows they add to (`super::hf::rope`; the PEFT
//! files, `super::hf::adapter`, hold HF's order), so `base + s B A` is the
//! permuted HF sum and [`Adapters::fuse_into`] is exact.
//!
//! The gradients, for one projection with input `X (in, T)` and output
//! gradient `dY (out, T)` (channel-major, the host layout):
//! `dB = s dY (A X)^T` and `dA = s B^T dY X^T` ([`lora_grads`]); the
//! forward's `s B (A X)` ([`lora_forward`]) and the input gradient's
//! `s A^T (B^T dY)` ([`lora_dx`]) are the other two host products. Since the
//! full model's weight gradient is `dW = dY X^T`, also `dA = s B^T dW` and
//! `dB = s dW A^T` ([`lora_grads_from_dw`]): the identity the tests use to
//! check adapters' gradients against the full-training engine.
//!
//! Not here: the PEFT file format (`super::hf::adapter`), the kernels and the
//! training step.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::config::ModelConfig;
use super::weights::{Param, Weights};
use crate::linalg::{gemm, n, t};
use crate::rng::Rng;
use crate::{Error, Result};

/// A projection an adapter can target (serialized by its `--lora-targets` name).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    /// Every target, in the order adapters are stored.
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// The name `--lora-targets` takes: `q`, `k`, `v`, `o`, `gate`, `up`, `down`.
    pub fn name(self) -> &'static str {
        match self {
            Target::Q => "q",
            Target::K => "k",
            Target::V => "v",
            Target::O => "o",
            Target::Gate => "gate",
            Target::Up => "up",
            Target::Down => "down",
        }
    }

    /// The Hugging Face module name (PEFT's `target_modules`): `q_proj`, ...
    pub fn module(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// The module's path inside a decoder layer: `self_attn.q_proj`, `mlp.up_proj`, ...
    pub fn path(self) -> String {
        let block = match self {
            Target::Q | Target::K | Target::V | Target::O => "self_attn",
            Target::Gate | Target::Up | Target::Down => "mlp",
        };
        format!("{block}.{}", self.module())
    }

    pub fn from_name(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == name)
    }

    pub fn from_module(module: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.module() == module)
    }

    /// The base weight this target adds to.
    pub fn param(self, layer: usize) -> Param {
        match self {
            Target::Q => Param::Wq(layer),
            Target::K => Param::Wk(layer),
            Target::V => Param::Wv(layer),
            Target::O => Param::Wo(layer),
            Target::Gate => Param::W1(layer),
            Target::Up => Param::W3(layer),
            Target::Down => Param::W2(layer),
        }
    }

    /// The layer and target of a projection weight (`None` for the rest).
    pub fn of(param: Param) -> Option<(usize, Target)> {
        let layer = param.layer()?;
        let target = Target::ALL.into_iter().find(|t| t.param(layer) == param)?;
        Some((layer, target))
    }

    /// Whether B's rows are permuted per head between HF and anemone (q, k).
    pub fn rope_rows(self) -> bool {
        matches!(self, Target::Q | Target::K)
    }

    /// `(out, in)` of the projection in `config`.
    pub fn shape(self, config: &ModelConfig) -> (usize, usize) {
        let (d, q, kv, f) = (
            config.dim,
            config.q_dim(),
            config.kv_dim(),
            config.hidden_dim,
        );
        match self {
            Target::Q => (q, d),
            Target::K | Target::V => (kv, d),
            Target::O => (d, q),
            Target::Gate | Target::Up => (f, d),
            Target::Down => (d, f),
        }
    }
}

/// Which projections of which layers carry adapters, and their rank and scale.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// r.
    pub rank: usize,
    pub alpha: f32,
    /// Dropout on the adapters' input while training (0 = none).
    pub dropout: f32,
    /// Sorted as [`Target::ALL`], no repeats.
    pub targets: Vec<Target>,
    /// Adapted layers, ascending, no repeats.
    pub layers: Vec<usize>,
    /// rsLoRA: scale `alpha / sqrt(r)` instead of `alpha / r`.
    pub rslora: bool,
    /// Train with the adapters beside the frozen base rather than merged
    /// into it (`train::engine::Engine::for_lora`; always so on the ANE and
    /// with dropout): less memory, a few percent slower on the CPU. Not
    /// part of the adapters' file format.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unmerged: bool,
}

impl LoraConfig {
    /// Rank `rank`, `alpha`, `dropout`, `targets` (any order, repeats
    /// ignored) on the last `last_layers` of `n_layers` layers (all of them
    /// for `None`); each value checked, the error naming the flag.
    pub fn new(
        rank: usize,
        alpha: f32,
        dropout: f32,
        targets: &[Target],
        last_layers: Option<usize>,
        n_layers: usize,
    ) -> Result<LoraConfig> {
        let last = last_layers.unwrap_or(n_layers);
        if last == 0 || last > n_layers {
            return Err(Error::out_of_range(
                "--lora-layers",
                last,
                &format!("1 to the model's {n_layers} layers"),
            ));
        }
        let mut targets = targets.to_vec();
        targets.sort();
        targets.dedup();
        let config = LoraConfig {
            rank,
            alpha,
            dropout,
            targets,
            layers: (n_layers - last..n_layers).collect(),
            rslora: false,
            unmerged: false,
        };
        config.check()?;
        Ok(config)
    }

    /// Values that make no adapter: rank 0, no targets or layers, a
    /// non-finite alpha, dropout outside `[0, 1)`.
    pub fn check(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::out_of_range("--lora-rank", self.rank, "at least 1"));
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return Err(Error::out_of_range(
                "--lora-alpha",
                self.alpha,
                "a positive number",
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::out_of_range(
                "--lora-dropout",
                self.dropout,
                "a number in [0, 1)",
            ));
        }
        if self.targets.is_empty() {
            return Err(Error::Invalid(
                "--lora-targets: no targets (expected some of q, k, v, o, gate, up, down)".into(),
            ));
        }
        if self.layers.is_empty() {
            return Err(Error::Invalid("--lora-layers: no layers".into()));
        }
        Ok(())
    }

    /// `s`: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f32 {
        if self.rslora {
            self.alpha / (self.rank as f32).sqrt()
        } else {
            self.alpha / self.rank as f32
        }
    }

    /// Every adapted `(layer, target)`, in storage order.
    pub fn entries(&self) -> Vec<(usize, Target)> {
        self.layers
            .iter()
            .flat_map(|&layer| self.targets.iter().map(move |&target| (layer, target)))
            .collect()
    }
}

/// One adapter's place in [`Adapters::data`].
#[derive(Clone, Debug, PartialEq)]
struct Entry {
    layer: usize,
    target: Target,
    /// `(out, in)` of the projection.
    out: usize,
    input: usize,
    /// A's range; B follows it.
    start: usize,
}

/// Every adapter of a model in one flat vector.
#[derive(Clone, Debug, PartialEq)]
pub struct Adapters {
    pub config: LoraConfig,
    model: ModelConfig,
    entries: Vec<Entry>,
    /// Per adapter: A `(r, in)`, then B `(out, r)`, row-major.
    pub data: Vec<f32>,
}

impl Adapters {
    /// Zero adapters of `config` on `model`; an error when a layer is not in
    /// the model or the config has no adapter ([`LoraConfig::check`]).
    pub fn zeros(model: &ModelConfig, config: &LoraConfig) -> Result<Adapters> {
        config.check()?;
        if let Some(&layer) = config.layers.iter().find(|&&l| l >= model.n_layers) {
            return Err(Error::Invalid(format!(
                "LoRA layer {layer} is not in the base model, which has {} layers",
                model.n_layers
            )));
        }
        let r = config.rank;
        let mut entries = Vec::new();
        let mut start = 0usize;
        for (layer, target) in config.entries() {
            let (out, input) = target.shape(model);
            entries.push(Entry {
                layer,
                target,
                out,
                input,
                start,
            });
            // The rank may come from a file: checked before anything is allocated.
            start = r
                .checked_mul(out + input)
                .and_then(|size| start.checked_add(size))
                .unwrap_or(usize::MAX);
        }
        crate::memory::check(
            &format!("LoRA adapters of rank {r}"),
            crate::memory::size(&[start, std::mem::size_of::<f32>()]),
            "a smaller rank (--lora-rank, or r in adapter_config.json)",
        )?;
        Ok(Adapters {
            config: config.clone(),
            model: model.clone(),
            entries,
            data: vec![0.0; start],
        })
    }

    /// Adapters initialised as PEFT does: A uniform in `±1/sqrt(in)` (PyTorch's
    /// `kaiming_uniform_(a=sqrt(5))`, the `nn.Linear` default), from `rng`;
    /// B zero, so the model starts as the base.
    pub fn init(model: &ModelConfig, config: &LoraConfig, rng: &mut Rng) -> Result<Adapters> {
        let mut adapters = Adapters::zeros(model, config)?;
        let r = config.rank;
        for entry in adapters.entries.clone() {
            let bound = 1.0 / (entry.input as f32).sqrt();
            let a = &mut adapters.data[entry.start..entry.start + r * entry.input];
            for value in a {
                *value = (2.0 * rng.next_f32() - 1.0) * bound;
            }
        }
        Ok(adapters)
    }

    /// The base model the adapters fit.
    pub fn model(&self) -> &ModelConfig {
        &self.model
    }

    /// Whether `(layer, target)` has an adapter.
    pub fn contains(&self, layer: usize, target: Target) -> bool {
        self.entry(layer, target).is_some()
    }

    fn entry(&self, layer: usize, target: Target) -> Option<&Entry> {
        self.entries
            .iter()
            .find(|e| e.layer == layer && e.target == target)
    }

    fn checked_entry(&self, layer: usize, target: Target) -> &Entry {
        self.entry(layer, target)
            .unwrap_or_else(|| panic!("no LoRA adapter on layer {layer} {}", target.module()))
    }

    /// A's range in [`Adapters::data`]. Panics when `(layer, target)` has no
    /// adapter (a programmer error: see [`Adapters::contains`]).
    pub fn range_a(&self, layer: usize, target: Target) -> Range<usize> {
        let e = self.checked_entry(layer, target);
        e.start..e.start + self.config.rank * e.input
    }

    /// B's range in [`Adapters::data`] (panics like [`Adapters::range_a`]).
    pub fn range_b(&self, layer: usize, target: Target) -> Range<usize> {
        let e = self.checked_entry(layer, target);
        let a_end = e.start + self.config.rank * e.input;
        a_end..a_end + e.out * self.config.rank
    }

    /// A `(r, in)`.
    pub fn a(&self, layer: usize, target: Target) -> &[f32] {
        &self.data[self.range_a(layer, target)]
    }

    /// B `(out, r)`, q/k rows in the interleaved RoPE order.
    pub fn b(&self, layer: usize, target: Target) -> &[f32] {
        &self.data[self.range_b(layer, target)]
    }

    pub fn a_mut(&mut self, layer: usize, target: Target) -> &mut [f32] {
        let range = self.range_a(layer, target);
        &mut self.data[range]
    }

    pub fn b_mut(&mut self, layer: usize, target: Target) -> &mut [f32] {
        let range = self.range_b(layer, target);
        &mut self.data[range]
    }

    /// A and B of one adapter, both writable (for their gradients).
    pub fn a_b_mut(&mut self, layer: usize, target: Target) -> (&mut [f32], &mut [f32]) {
        let (a, b) = (self.range_a(layer, target), self.range_b(layer, target));
        self.data[a.start..b.end].split_at_mut(a.len())
    }

    /// `s B A (out, in)`: what the adapter adds to its projection's weight.
    pub fn delta(&self, layer: usize, target: Target) -> Vec<f32> {
        let e = self.checked_entry(layer, target);
        let r = self.config.rank;
        let mut delta = vec![0.0; e.out * e.input];
        let (a, b) = (self.a(layer, target), self.b(layer, target));
        gemm(
            &mut delta,
            e.out,
            e.input,
            n(b, e.out, r),
            n(a, r, e.input),
            self.config.scale(),
            false,
        );
        delta
    }

    /// Merge the adapters into `weights` of their base model: `W += s B A`.
    /// Panics when `weights` is of another model (programmer error; the
    /// adapters were checked against the base when read).
    pub fn fuse_into(&self, weights: &mut Weights) {
        assert_eq!(weights.config(), &self.model, "fuse_into: another model");
        for e in &self.entries {
            let delta = self.delta(e.layer, e.target);
            let w = weights.get_mut(e.target.param(e.layer));
            for (w, d) in w.iter_mut().zip(&delta) {
                *w += d;
            }
        }
    }
}

impl Adapters {
    /// The adapters' gradients (same layout) from the gradient `dw` of the
    /// merged weights `W + s B A` of their model ([`lora_grads_from_dw`] per
    /// adapter): the adapters' training step on an engine that computes full
    /// weight gradients.
    pub fn grads_from_dw(&self, dw: &Weights) -> Adapters {
        assert_eq!(dw.config(), &self.model, "grads_from_dw: another model");
        let mut grads = self.clone();
        let (r, s) = (self.config.rank, self.config.scale());
        for e in &self.entries {
            let (ra, rb) = (
                self.range_a(e.layer, e.target),
                self.range_b(e.layer, e.target),
            );
            let (head, tail) = grads.data.split_at_mut(rb.start);
            lora_grads_from_dw(
                dw.get(e.target.param(e.layer)),
                &self.data[ra.clone()],
                &self.data[rb.clone()],
                (e.out, e.input, r),
                s,
                &mut head[ra],
                &mut tail[..rb.len()],
            );
        }
        grads
    }
}

/// The adapter's part of its projection's forward: `y += s B (A x)`
/// (`add`; else `y =`) for `x (in, T)`, `y (out, T)` (channel-major);
/// `u = A x (r, T)` is left in `u` (resized), which the backward's
/// [`lora_grads`] makes again.
#[allow(clippy::too_many_arguments)]
pub fn lora_forward(
    x: &[f32],
    a: &[f32],
    b: &[f32],
    (out, input, rank, seq): (usize, usize, usize, usize),
    scale: f32,
    y: &mut [f32],
    add: bool,
    u: &mut Vec<f32>,
) {
    u.resize(rank * seq, 0.0);
    gemm(
        u,
        rank,
        seq,
        n(a, rank, input),
        n(x, input, seq),
        1.0,
        false,
    );
    gemm(y, out, seq, n(b, out, rank), n(u, rank, seq), scale, add);
}

/// The adapter's part of its projection's input gradient: `dx += s A^T
/// (B^T dy)` (`add`; else `dx =`) for `dy (out, T)`, `dx (in, T)`; `v =
/// B^T dy (r, T)` goes through `v` (resized).
#[allow(clippy::too_many_arguments)]
pub fn lora_dx(
    dy: &[f32],
    a: &[f32],
    b: &[f32],
    (out, input, rank, seq): (usize, usize, usize, usize),
    scale: f32,
    dx: &mut [f32],
    add: bool,
    v: &mut Vec<f32>,
) {
    v.resize(rank * seq, 0.0);
    gemm(v, rank, seq, t(b, out, rank), n(dy, out, seq), 1.0, false);
    gemm(
        dx,
        input,
        seq,
        t(a, rank, input),
        n(v, rank, seq),
        scale,
        add,
    );
}

/// The gradients of one adapter from its projection's input `x (in, T)` and
/// output gradient `dy (out, T)` (channel-major): `da (r, in) = s B^T dy x^T`,
/// `db (out, r) = s dy (A x)^T`, added to `da` and `db` (`add`) or written
/// over them. Four products of rank-r width, `r T (2 in + 2 out)`
/// multiply-adds, through `scratch` (sized to `(r, T)`: `U = A x`, then
/// `V = B^T dy`): the training step's job per adapted projection and
/// sequence, in place of the frozen weight's `dy x^T`.
#[allow(clippy::too_many_arguments)]
pub fn lora_grads(
    dy: &[f32],
    x: &[f32],
    a: &[f32],
    b: &[f32],
    (out, input, rank, seq): (usize, usize, usize, usize),
    scale: f32,
    da: &mut [f32],
    db: &mut [f32],
    add: bool,
    scratch: &mut Vec<f32>,
) {
    scratch.resize(rank * seq, 0.0);
    let u = scratch.as_mut_slice(); // (r, T)
    gemm(
        u,
        rank,
        seq,
        n(a, rank, input),
        n(x, input, seq),
        1.0,
        false,
    );
    gemm(db, out, rank, n(dy, out, seq), t(u, rank, seq), scale, add);
    let v = u; // (r, T)
    gemm(v, rank, seq, t(b, out, rank), n(dy, out, seq), 1.0, false);
    gemm(
        da,
        rank,
        input,
        n(v, rank, seq),
        t(x, input, seq),
        scale,
        add,
    );
}

/// The gradients of one adapter from the gradient `dw (out, in)` of the
/// merged weight `W + s B A`: `da = s B^T dw`, `db = s dw A^T` (exact, since
/// `dw = dy x^T`).
pub fn lora_grads_from_dw(
    dw: &[f32],
    a: &[f32],
    b: &[f32],
    (out, input, rank): (usize, usize, usize),
    scale: f32,
    da: &mut [f32],
    db: &mut [f32],
) {
    gemm(
        da,
        rank,
        input,
        t(b, out, rank),
        n(dw, out, input),
        scale,
        false,
    );
    gemm(
        db,
        out,
        rank,
        n(dw, out, input),
        t(a, rank, input),
        scale,
        false,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, nn: usize) -> Vec<f64> {
        let mut c = vec![0.0; m * nn];
        for i in 0..m {
            for j in 0..nn {
                c[i * nn + j] = (0..k)
                    .map(|p| a[i * k + p] as f64 * b[p * nn + j] as f64)
                    .sum();
            }
        }
        c
    }

    fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        (0..cols * rows)
            .map(|i| x[(i % rows) * cols + i / rows])
            .collect()
    }

    fn random(len: usize, rng: &mut Rng) -> Vec<f32> {
        (0..len).map(|_| rng.normal()).collect()
    }

    /// Both gradient forms against plain f64 products of their definitions.
    #[test]
    fn gradients_from_dy_and_from_dw_agree_with_their_definitions() {
        let (out, input, rank, seq, s) = (6, 5, 3, 7, 2.5f32);
        let mut rng = Rng::new(11);
        let (dy, x) = (random(out * seq, &mut rng), random(input * seq, &mut rng));
        let (a, b) = (random(rank * input, &mut rng), random(out * rank, &mut rng));
        let (mut da, mut db) = (vec![9.0; rank * input], vec![9.0; out * rank]);
        lora_grads(
            &dy,
            &x,
            &a,
            &b,
            (out, input, rank, seq),
            s,
            &mut da,
            &mut db,
            false,
            &mut Vec::new(),
        );
        // dB = s dY (A X)^T; dA = s B^T dY X^T, from f64 products.
        let ax: Vec<f32> = naive(&a, &x, rank, input, seq)
            .iter()
            .map(|&v| v as f32)
            .collect();
        let want_db = naive(&dy, &transpose(&ax, rank, seq), out, seq, rank);
        let bt_dy: Vec<f32> = naive(&transpose(&b, out, rank), &dy, rank, out, seq)
            .iter()
            .map(|&v| v as f32)
            .collect();
        let want_da = naive(&bt_dy, &transpose(&x, input, seq), rank, seq, input);
        for (got, want) in [(&da, &want_da), (&db, &want_db)] {
            for (g, w) in got.iter().zip(want.iter()) {
                assert!(
                    (*g as f64 - s as f64 * w).abs() < 1e-4,
                    "{g} vs {}",
                    s as f64 * w
                );
            }
        }
        let dw: Vec<f32> = naive(&dy, &transpose(&x, input, seq), out, seq, input)
            .iter()
            .map(|&v| v as f32)
            .collect();
        let (mut da2, mut db2) = (vec![0.0; rank * input], vec![0.0; out * rank]);
        lora_grads_from_dw(&dw, &a, &b, (out, input, rank), s, &mut da2, &mut db2);
        for (got, want) in [(&da2, &da), (&db2, &db)] {
            for (g, w) in got.iter().zip(want.iter()) {
                assert!((g - w).abs() < 1e-4, "{g} vs {w}");
            }
        }
    }

    /// The forward and input-gradient parts equal the merged weight's
    /// products: `(W + s B A) x` and `(W + s B A)^T dy`.
    #[test]
    fn forward_and_input_gradient_equal_the_merged_weight() {
        let (out, input, rank, seq, s) = (6, 5, 3, 4, 1.5f32);
        let mut rng = Rng::new(12);
        let (x, dy) = (random(input * seq, &mut rng), random(out * seq, &mut rng));
        let (a, b) = (random(rank * input, &mut rng), random(out * rank, &mut rng));
        let w = random(out * input, &mut rng);
        let ba = naive(&b, &a, out, rank, input);
        let merged: Vec<f32> = w.iter().zip(&ba).map(|(&w, &d)| w + s * d as f32).collect();
        let mut y: Vec<f32> = naive(&w, &x, out, input, seq)
            .iter()
            .map(|&v| v as f32)
            .collect();
        let mut u = Vec::new();
        lora_forward(&x, &a, &b, (out, input, rank, seq), s, &mut y, true, &mut u);
        let want_u = naive(&a, &x, rank, input, seq);
        let want_y = naive(&merged, &x, out, input, seq);
        let mut dx: Vec<f32> = naive(&transpose(&w, out, input), &dy, input, out, seq)
            .iter()
            .map(|&v| v as f32)
            .collect();
        lora_dx(
            &dy,
            &a,
            &b,
            (out, input, rank, seq),
            s,
            &mut dx,
            true,
            &mut Vec::new(),
        );
        let want_dx = naive(&transpose(&merged, out, input), &dy, input, out, seq);
        for (got, want) in [(&u, &want_u), (&y, &want_y), (&dx, &want_dx)] {
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(want.iter()) {
                assert!((*g as f64 - w).abs() < 1e-4, "{g} vs {w}");
            }
        }
    }

    #[test]
    fn layout_init_and_fuse() {
        let model = ModelConfig::llama(32, 2, 4, 2, 64, 50, 16);
        let config = LoraConfig::new(2, 4.0, 0.0, &[Target::Down, Target::Q], Some(1), 2).unwrap();
        assert_eq!(config.entries(), vec![(1, Target::Q), (1, Target::Down)]);
        let adapters = Adapters::init(&model, &config, &mut Rng::new(3)).unwrap();
        // A (2, 32), B (32, 2) for q; A (2, 64), B (32, 2) for down.
        assert_eq!(adapters.data.len(), 2 * 32 + 32 * 2 + 2 * 64 + 32 * 2);
        assert_eq!(adapters.range_b(1, Target::Down), 256..320);
        let bound = 1.0 / 8.0;
        let a = adapters.a(1, Target::Down);
        assert!(a.iter().all(|v| v.abs() <= bound) && a.iter().any(|v| v.abs() > 0.9 * bound));
        assert!(adapters.b(1, Target::Q).iter().all(|&v| v == 0.0));
        assert!(!adapters.contains(0, Target::Q));

        let mut adapters = adapters;
        adapters
            .b_mut(1, Target::Q)
            .copy_from_slice(&random(64, &mut Rng::new(5)));
        let base = Weights::init(&model, 1);
        let mut fused = base.clone();
        adapters.fuse_into(&mut fused);
        let (a, b) = (adapters.a(1, Target::Q), adapters.b(1, Target::Q));
        let ba = naive(b, a, 32, 2, 32);
        let (w, w0) = (fused.get(Param::Wq(1)), base.get(Param::Wq(1)));
        for i in 0..32 * 32 {
            assert!((w[i] as f64 - w0[i] as f64 - 2.0 * ba[i]).abs() < 1e-5);
        }
        assert_eq!(fused.get(Param::Wq(0)), base.get(Param::Wq(0)));
        assert_eq!(
            fused.get(Param::W2(1)),
            base.get(Param::W2(1)),
            "B of down is zero"
        );
    }

    #[test]
    fn a_huge_rank_is_refused_before_allocating() {
        let model = ModelConfig::llama(32, 2, 4, 2, 64, 50, 16);
        let config = LoraConfig::new(1 << 40, 8.0, 0.0, &Target::ALL, None, 2).unwrap();
        let err = Adapters::zeros(&model, &config).unwrap_err().to_string();
        assert!(
            err.starts_with("LoRA adapters of rank 1099511627776 needs"),
            "{err}"
        );
        assert!(err.contains("hint: a smaller rank"), "{err}");
    }

    #[test]
    fn config_errors_name_the_flag() {
        let err = |r: Result<LoraConfig>| r.unwrap_err().to_string();
        assert!(
            err(LoraConfig::new(0, 8.0, 0.0, &Target::ALL, None, 2)).starts_with("--lora-rank 0")
        );
        assert!(
            err(LoraConfig::new(4, 8.0, 0.0, &Target::ALL, Some(3), 2))
                .starts_with("--lora-layers 3")
        );
        assert!(
            err(LoraConfig::new(4, 8.0, 1.0, &Target::ALL, None, 2)).starts_with("--lora-dropout")
        );
        assert!(err(LoraConfig::new(4, 8.0, 0.0, &[], None, 2)).starts_with("--lora-targets"));
        let c = LoraConfig::new(4, 8.0, 0.0, &[Target::V, Target::Q, Target::V], None, 3).unwrap();
        assert_eq!(
            (c.targets.clone(), c.layers.clone(), c.scale()),
            (vec![Target::Q, Target::V], vec![0, 1, 2], 2.0)
        );
    }
}
