//! LoRA's adapter path on the host, beside kernels that run the frozen base
//! alone (baked into them on the ANE, or passed as inputs on the CPU): the
//! engine's "unmerged" mode, used where the merged weights `W + s B A`
//! cannot serve: on the ANE, where the base is compiled into the kernels
//! once per run, and with dropout on the adapters' input, which the merged
//! product cannot express.
//!
//! For a projection `y = W x` with an adapter, `y = W x + s B A drop(x)`:
//! - forward: [`AdapterPath::forward`] makes `s B (A drop(x))` (two rank-r
//!   products); for q, k, v, gate and up the kernel adds it inside
//!   (`model::kernels::Deltas`), for o and down the host adds it to the
//!   kernel's output;
//! - backward: [`AdapterPath::add_dx`] adds `s drop'(A^T (B^T dy))` to the
//!   kernel's input gradient `W^T dy`;
//! - gradients: the step's jobs (`grads`) take `drop(x)` as the adapter's
//!   input ([`AdapterPath::dropped`]).
//!
//! Dropout is PEFT's: each adapted projection drops its own input (its own
//! mask), keeping an element with probability `1 - p` and scaling it by
//! `1 / (1 - p)`. A mask is a function of the run's seed, the update, the
//! micro-batch, the sequence's index in the global batch, the layer, the
//! target and the element ([`DropoutKey`]), never of a stream's position:
//! the backward makes the forward's masks again instead of keeping them,
//! two ranks draw the masks one process would, and a resumed run draws
//! those the uninterrupted run would.

use crate::model::lora::{self, Adapters, Target};
use crate::train::buffers::DeltaArrays;

/// Which masks a micro-batch's passes draw (with dropout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropoutKey {
    /// The run's seed.
    pub seed: u64,
    /// The update (optimizer step) the micro-batch belongs to.
    pub step: u64,
    /// The micro-batch within the update.
    pub micro: u64,
    /// The index in the global batch of the engine's first sequence
    /// (`rank * batch` under data parallelism).
    pub first_sequence: u64,
}

/// The adapters of one micro-batch's passes, with their dropout.
#[derive(Clone, Copy)]
pub struct AdapterPath<'a> {
    pub adapters: &'a Adapters,
    /// `None` without dropout (p = 0).
    dropout: Option<(f32, DropoutKey)>,
}

impl<'a> AdapterPath<'a> {
    /// The path of `adapters`, with their config's dropout drawn by `key`.
    pub fn new(adapters: &'a Adapters, key: DropoutKey) -> AdapterPath<'a> {
        let p = adapters.config.dropout;
        AdapterPath {
            adapters,
            dropout: (p > 0.0).then_some((p, key)),
        }
    }

    /// The path of `adapters` without dropout (evaluation; a merged engine's
    /// gradients, where dropout is refused).
    pub fn eval(adapters: &'a Adapters) -> AdapterPath<'a> {
        AdapterPath {
            adapters,
            dropout: None,
        }
    }

    /// Whether `layer`'s `target` has an adapter.
    pub fn has(&self, layer: usize, target: Target) -> bool {
        self.adapters.contains(layer, target)
    }

    /// `(out, in, rank, seq)` of `target`'s products over `x (in, T)`.
    fn shape(&self, target: Target, x_len: usize) -> (usize, usize, usize, usize) {
        let (out, input) = target.shape(self.adapters.model());
        (out, input, self.adapters.config.rank, x_len / input)
    }

    /// `x (in, T)` of sequence `sequence` with `layer`'s `target`'s dropout
    /// applied: `x` itself without dropout, else the dropped copy in `scratch`.
    pub fn dropped<'x>(
        &self,
        layer: usize,
        target: Target,
        sequence: usize,
        x: &'x [f32],
        scratch: &'x mut Vec<f32>,
    ) -> &'x [f32] {
        let Some((p, key)) = self.dropout else {
            return x;
        };
        scratch.resize(x.len(), 0.0);
        let keep = 1.0 / (1.0 - p);
        let stream = mask_stream(key, sequence, layer, target);
        for (i, (dst, &value)) in scratch.iter_mut().zip(x).enumerate() {
            *dst = if uniform(stream, i as u64) >= p {
                value * keep
            } else {
                0.0
            };
        }
        scratch
    }

    /// `y = s B (A drop(x))` (`add`: `y +=`) of sequence `sequence` for
    /// `x (in, T)`, `y (out, T)` (`model::lora::lora_forward` on the dropped
    /// input).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        layer: usize,
        target: Target,
        sequence: usize,
        x: &[f32],
        y: &mut [f32],
        add: bool,
        scratch: &mut Scratch,
    ) {
        let shape = self.shape(target, x.len());
        let x = self.dropped(layer, target, sequence, x, &mut scratch.input);
        let (a, b, scale) = self.matrices(layer, target);
        lora::lora_forward(x, a, b, shape, scale, y, add, &mut scratch.rank);
    }

    /// `dx += s drop'(A^T (B^T dy))` of sequence `sequence` for `dy (out, T)`,
    /// `dx (in, T)`: the adapter's share of its projection's input gradient
    /// (`model::lora::lora_dx`; dropout's backward is its forward's mask and
    /// scale).
    pub fn add_dx(
        &self,
        layer: usize,
        target: Target,
        sequence: usize,
        dy: &[f32],
        dx: &mut [f32],
        scratch: &mut Scratch,
    ) {
        let shape = self.shape(target, dx.len());
        let (a, b, scale) = self.matrices(layer, target);
        if self.dropout.is_none() {
            return lora::lora_dx(dy, a, b, shape, scale, dx, true, &mut scratch.rank);
        }
        let g = &mut scratch.product;
        g.resize(dx.len(), 0.0);
        lora::lora_dx(dy, a, b, shape, scale, g, false, &mut scratch.rank);
        let dropped = self.dropped(layer, target, sequence, g, &mut scratch.input);
        for (dx, &d) in dx.iter_mut().zip(dropped) {
            *dx += d;
        }
    }

    /// `A`, `B` and the scale of `layer`'s `target`.
    fn matrices(&self, layer: usize, target: Target) -> (&'a [f32], &'a [f32], f32) {
        let adapters = self.adapters;
        let scale = adapters.config.scale();
        (adapters.a(layer, target), adapters.b(layer, target), scale)
    }
}

/// The adapter path of the layer passes of an unmerged engine: the
/// adapters, the kernels' added inputs it writes, its work arrays.
pub struct LoraLayer<'e> {
    pub path: AdapterPath<'e>,
    pub deltas: &'e mut DeltaArrays,
    pub scratch: &'e mut Scratch,
}

impl LoraLayer<'_> {
    /// The kernels' added input of `layer`'s `target` (q, k, v, gate, up)
    /// for every sequence, from its input `xs[b]`: `s B A drop(x)`, or zeros
    /// where the layer has no adapter there. Nothing when the kernels take
    /// no delta for `target`.
    pub fn make_deltas(&mut self, layer: usize, target: Target, xs: &[&[f32]]) {
        let arrays = self.deltas.of_mut(target);
        for (sequence, (delta, x)) in arrays.iter_mut().zip(xs).enumerate() {
            match self.path.has(layer, target) {
                true => (self.path).forward(layer, target, sequence, x, delta, false, self.scratch),
                false => delta.fill(0.0),
            }
        }
    }

    /// `y += s B A drop(x)` of sequence `sequence` where `layer` has an
    /// adapter on `target` (o, down: the host adds theirs to the kernel's
    /// output).
    pub fn add_forward(
        &mut self,
        layer: usize,
        target: Target,
        sequence: usize,
        x: &[f32],
        y: &mut [f32],
    ) {
        if self.path.has(layer, target) {
            (self.path).forward(layer, target, sequence, x, y, true, self.scratch);
        }
    }

    /// `dxs[b] += s drop'(A^T B^T dys[b])` where `layer` has an adapter on
    /// `target`: its share of the projection's input gradient.
    pub fn add_dx(&mut self, layer: usize, target: Target, dys: &[Vec<f32>], dxs: &mut [Vec<f32>]) {
        if !self.path.has(layer, target) {
            return;
        }
        for (sequence, (dy, dx)) in dys.iter().zip(dxs).enumerate() {
            (self.path).add_dx(layer, target, sequence, dy, dx, self.scratch);
        }
    }
}

/// The adapter path's work arrays, reused across calls.
#[derive(Default)]
pub struct Scratch {
    input: Vec<f32>,
    rank: Vec<f32>,
    product: Vec<f32>,
}

/// The key of one mask: `key`'s update and micro-batch, the sequence's index
/// in the global batch, the layer and the target, mixed into 64 bits.
fn mask_stream(key: DropoutKey, sequence: usize, layer: usize, target: Target) -> u64 {
    let target_index = Target::ALL.iter().position(|&t| t == target).unwrap_or(0) as u64;
    [
        key.step,
        key.micro,
        key.first_sequence + sequence as u64,
        layer as u64,
        target_index,
    ]
    .into_iter()
    .fold(mix(key.seed ^ 0x6c6f_7261_6472_6f70), |state, word| {
        mix(state ^ word)
    })
}

/// Uniform in `[0, 1)` for element `index` of the mask `stream`: the top 24
/// bits of a SplitMix64 output (counter-based: any element, any order).
fn uniform(stream: u64, index: u64) -> f32 {
    let bits = mix(stream.wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    (bits >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
}

/// SplitMix64's output function (a bijection of 64-bit words).
fn mix(z: u64) -> u64 {
    let z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;
    use crate::model::lora::LoraConfig;
    use crate::rng::Rng;

    fn adapters(dropout: f32) -> Adapters {
        let model = ModelConfig::llama(16, 1, 2, 2, 32, 48, 8);
        let lora = LoraConfig::new(4, 8.0, dropout, &Target::ALL, None, 1).unwrap();
        let mut adapters = Adapters::init(&model, &lora, &mut Rng::new(1)).unwrap();
        let mut rng = Rng::new(2);
        for value in adapters.data.iter_mut() {
            *value = rng.normal() * 0.3;
        }
        adapters
    }

    const KEY: DropoutKey = DropoutKey {
        seed: 7,
        step: 3,
        micro: 1,
        first_sequence: 2,
    };

    #[test]
    fn masks_keep_one_minus_p_scaled_and_depend_on_every_part_of_the_key() {
        let adapters = adapters(0.25);
        let path = AdapterPath::new(&adapters, KEY);
        let x = vec![1.0f32; 64 * 1024];
        let mut scratch = Vec::new();
        let dropped = path.dropped(0, Target::Q, 0, &x, &mut scratch).to_vec();
        let kept = dropped.iter().filter(|&&v| v != 0.0).count() as f64 / x.len() as f64;
        // 65,536 Bernoulli(0.75) draws: standard deviation 0.0017.
        assert!((kept - 0.75).abs() < 0.01, "kept {kept}");
        assert!(
            dropped
                .iter()
                .all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6)
        );
        // The same key gives the same mask; another part of it another one.
        let again = path.dropped(0, Target::Q, 0, &x, &mut scratch).to_vec();
        assert_eq!(dropped, again);
        let others = [
            path.dropped(0, Target::K, 0, &x, &mut scratch).to_vec(),
            path.dropped(0, Target::Q, 1, &x, &mut scratch).to_vec(),
            AdapterPath::new(&adapters, DropoutKey { step: 4, ..KEY })
                .dropped(0, Target::Q, 0, &x, &mut scratch)
                .to_vec(),
            AdapterPath::new(&adapters, DropoutKey { micro: 0, ..KEY })
                .dropped(0, Target::Q, 0, &x, &mut scratch)
                .to_vec(),
            AdapterPath::new(&adapters, DropoutKey { seed: 8, ..KEY })
                .dropped(0, Target::Q, 0, &x, &mut scratch)
                .to_vec(),
        ];
        for other in &others {
            let same = other.iter().zip(&dropped).filter(|(a, b)| a == b).count();
            // Two independent masks agree on 0.75^2 + 0.25^2 = 62.5 %.
            let share = same as f64 / x.len() as f64;
            assert!((share - 0.625).abs() < 0.01, "share {share}");
        }
        // Sequence 1 of an engine whose first is 2 is sequence 3 of the batch.
        let shifted = AdapterPath::new(
            &adapters,
            DropoutKey {
                first_sequence: 3,
                ..KEY
            },
        );
        assert_eq!(
            shifted.dropped(0, Target::Q, 0, &x, &mut scratch).to_vec(),
            others[1]
        );
    }

    /// The forward and the input gradient against the definition in f64,
    /// with the mask read off `dropped` of a ones input.
    #[test]
    fn forward_and_dx_are_the_dropped_low_rank_products() {
        let adapters = adapters(0.5);
        let path = AdapterPath::new(&adapters, KEY);
        let (layer, target, sequence, seq) = (0, Target::Gate, 1, 5);
        let (out, input) = target.shape(adapters.model());
        let (rank, scale) = (4, 2.0f64);
        let mut rng = Rng::new(9);
        let x: Vec<f32> = (0..input * seq).map(|_| rng.normal()).collect();
        let dy: Vec<f32> = (0..out * seq).map(|_| rng.normal()).collect();
        let mut scratch = Vec::new();
        let mask = path
            .dropped(
                layer,
                target,
                sequence,
                &vec![1.0; input * seq],
                &mut scratch,
            )
            .to_vec();
        assert!(mask.contains(&0.0) && mask.contains(&2.0));
        let (a, b) = (adapters.a(layer, target), adapters.b(layer, target));
        let mut work = Scratch::default();
        let mut y = vec![1.0f32; out * seq];
        path.forward(layer, target, sequence, &x, &mut y, true, &mut work);
        let mut dx = vec![0.5f32; input * seq];
        path.add_dx(layer, target, sequence, &dy, &mut dx, &mut work);
        for o in 0..out {
            for p in 0..seq {
                let mut want = 1.0f64;
                for r in 0..rank {
                    let u: f64 = (0..input)
                        .map(|i| {
                            a[r * input + i] as f64 * (x[i * seq + p] * mask[i * seq + p]) as f64
                        })
                        .sum();
                    want += scale * b[o * rank + r] as f64 * u;
                }
                assert!((y[o * seq + p] as f64 - want).abs() < 1e-4, "y[{o},{p}]");
            }
        }
        for i in 0..input {
            for p in 0..seq {
                let mut g = 0.0f64;
                for r in 0..rank {
                    let v: f64 = (0..out)
                        .map(|o| b[o * rank + r] as f64 * dy[o * seq + p] as f64)
                        .sum();
                    g += scale * a[r * input + i] as f64 * v;
                }
                let want = 0.5 + g * mask[i * seq + p] as f64;
                assert!((dx[i * seq + p] as f64 - want).abs() < 1e-4, "dx[{i},{p}]");
            }
        }
    }
}
