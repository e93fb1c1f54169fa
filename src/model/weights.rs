//! Model parameters as one flat `f32` vector with a fixed layout, so the
//! optimizer, gradient clipping and checkpoints are single passes over memory
//! and gradients/moments share the layout.
//!
//! Layout (llama2.c order, matrices `[out, in]` row-major):
//! `embedding (V, C)`, then per layer `rms_att (C)`, `wq (Hq*D, C)`, `wk (Hkv*D, C)`,
//! `wv (Hkv*D, C)`, then only with `qkv_bias` `bq (Hq*D)`, `bk (Hkv*D)`,
//! `bv (Hkv*D)`, then only with `qk_norm` `q_norm (D)`, `k_norm (D)`, then
//! `wo (C, Hq*D)`, `rms_ffn (C)`, `w1 (F, C)`, `w2 (C, F)`, `w3 (F, C)`,
//! then `rms_final (C)`, then `classifier (V, C)` only when untied. A model
//! without the features has exactly llama2.c's layout.
//!
//! The rows of `wq`, `wk`, `bq`, `bk` and the entries of `q_norm`, `k_norm`
//! are in the interleaved RoPE order of llama2.c (pairs `(2i, 2i+1)` of a
//! head rotate together); Hugging Face checkpoints are permuted on the way
//! in and out (`super::hf`).

use std::collections::HashMap;
use std::ops::Range;

use super::config::ModelConfig;
use crate::rng::Rng;

/// One parameter tensor of the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Param {
    Embedding,
    RmsAtt(usize),
    Wq(usize),
    Wk(usize),
    Wv(usize),
    /// Biases of the q, k and v projections, only with `qkv_bias`.
    Bq(usize),
    Bk(usize),
    Bv(usize),
    /// QK-norm weights of the q and k heads, only with `qk_norm`.
    QNorm(usize),
    KNorm(usize),
    Wo(usize),
    RmsFfn(usize),
    W1(usize),
    W2(usize),
    W3(usize),
    RmsFinal,
    /// Only present when the classifier is untied.
    Classifier,
}

impl Param {
    /// Norm weights (initialised to 1).
    pub fn is_norm(self) -> bool {
        matches!(
            self,
            Param::RmsAtt(_)
                | Param::RmsFfn(_)
                | Param::RmsFinal
                | Param::QNorm(_)
                | Param::KNorm(_)
        )
    }

    /// One-dimensional: norm weights and biases. They get no weight decay
    /// (`torch.optim.AdamW` param groups by dimension), and their gradients
    /// are sums, not products.
    pub fn is_vector(self) -> bool {
        self.is_norm() || matches!(self, Param::Bq(_) | Param::Bk(_) | Param::Bv(_))
    }

    /// The layer a per-layer parameter belongs to.
    pub fn layer(self) -> Option<usize> {
        match self {
            Param::RmsAtt(l)
            | Param::Wq(l)
            | Param::Wk(l)
            | Param::Wv(l)
            | Param::Bq(l)
            | Param::Bk(l)
            | Param::Bv(l)
            | Param::QNorm(l)
            | Param::KNorm(l)
            | Param::Wo(l)
            | Param::RmsFfn(l)
            | Param::W1(l)
            | Param::W2(l)
            | Param::W3(l) => Some(l),
            Param::Embedding | Param::RmsFinal | Param::Classifier => None,
        }
    }

    /// Stable name, e.g. `layers.3.wq`.
    pub fn name(self) -> String {
        let layer = |l: usize, n: &str| format!("layers.{l}.{n}");
        match self {
            Param::Embedding => "embedding".into(),
            Param::RmsAtt(l) => layer(l, "rms_att"),
            Param::Wq(l) => layer(l, "wq"),
            Param::Wk(l) => layer(l, "wk"),
            Param::Wv(l) => layer(l, "wv"),
            Param::Bq(l) => layer(l, "bq"),
            Param::Bk(l) => layer(l, "bk"),
            Param::Bv(l) => layer(l, "bv"),
            Param::QNorm(l) => layer(l, "q_norm"),
            Param::KNorm(l) => layer(l, "k_norm"),
            Param::Wo(l) => layer(l, "wo"),
            Param::RmsFfn(l) => layer(l, "rms_ffn"),
            Param::W1(l) => layer(l, "w1"),
            Param::W2(l) => layer(l, "w2"),
            Param::W3(l) => layer(l, "w3"),
            Param::RmsFinal => "rms_final".into(),
            Param::Classifier => "classifier".into(),
        }
    }
}

/// Offsets of every [`Param`] inside the flat vector.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    config: ModelConfig,
    layer_start: usize,
    layer_stride: usize,
    total: usize,
}

impl Layout {
    pub fn new(config: &ModelConfig) -> Layout {
        let emb = config.vocab_size * config.dim;
        let layer_stride = config.layer_params();
        let after_layers = emb + config.n_layers * layer_stride;
        let total = after_layers + config.dim + if config.tied_embeddings { 0 } else { emb };
        Layout {
            config: config.clone(),
            layer_start: emb,
            layer_stride,
            total,
        }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Number of floats.
    pub fn len(&self) -> usize {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Shape of `p` (`[out, in]` for matrices).
    pub fn shape(&self, p: Param) -> Vec<usize> {
        let c = &self.config;
        let (d, q, kv, f, v) = (c.dim, c.q_dim(), c.kv_dim(), c.hidden_dim, c.vocab_size);
        match p {
            Param::Embedding | Param::Classifier => vec![v, d],
            Param::RmsAtt(_) | Param::RmsFfn(_) | Param::RmsFinal => vec![d],
            Param::Bq(_) => vec![q],
            Param::Bk(_) | Param::Bv(_) => vec![kv],
            Param::QNorm(_) | Param::KNorm(_) => vec![c.head_dim],
            Param::Wq(_) => vec![q, d],
            Param::Wk(_) | Param::Wv(_) => vec![kv, d],
            Param::Wo(_) => vec![d, q],
            Param::W1(_) | Param::W3(_) => vec![f, d],
            Param::W2(_) => vec![d, f],
        }
    }

    /// Whether the model has parameter `p` (a bias or QK-norm weight only
    /// with its feature, the classifier only when untied, a layer in range).
    pub fn contains(&self, p: Param) -> bool {
        let c = &self.config;
        let in_range = p.layer().is_none_or(|l| l < c.n_layers);
        in_range
            && match p {
                Param::Bq(_) | Param::Bk(_) | Param::Bv(_) => c.qkv_bias,
                Param::QNorm(_) | Param::KNorm(_) => c.qk_norm,
                Param::Classifier => !c.tied_embeddings,
                _ => true,
            }
    }

    /// Element range of `p` in the flat vector. Panics on a parameter the
    /// model does not have ([`Layout::contains`]; programmer errors).
    pub fn range(&self, p: Param) -> Range<usize> {
        let c = &self.config;
        assert!(self.contains(p), "the model has no {}", p.name());
        let (d, q, kv, f, hd) = (c.dim, c.q_dim(), c.kv_dim(), c.hidden_dim, c.head_dim);
        let biases = if c.qkv_bias { q + 2 * kv } else { 0 };
        let norms = if c.qk_norm { 2 * hd } else { 0 };
        // Offsets inside a layer: the attention's matrices, the features'
        // vectors, then the rest.
        let after_wv = d + q * d + 2 * kv * d;
        let after_vectors = after_wv + biases + norms;
        let in_layer = |l: usize, off: usize| self.layer_start + l * self.layer_stride + off;
        let start = match p {
            Param::Embedding => 0,
            Param::RmsAtt(l) => in_layer(l, 0),
            Param::Wq(l) => in_layer(l, d),
            Param::Wk(l) => in_layer(l, d + q * d),
            Param::Wv(l) => in_layer(l, d + q * d + kv * d),
            Param::Bq(l) => in_layer(l, after_wv),
            Param::Bk(l) => in_layer(l, after_wv + q),
            Param::Bv(l) => in_layer(l, after_wv + q + kv),
            Param::QNorm(l) => in_layer(l, after_wv + biases),
            Param::KNorm(l) => in_layer(l, after_wv + biases + hd),
            Param::Wo(l) => in_layer(l, after_vectors),
            Param::RmsFfn(l) => in_layer(l, after_vectors + q * d),
            Param::W1(l) => in_layer(l, after_vectors + q * d + d),
            Param::W2(l) => in_layer(l, after_vectors + q * d + d + f * d),
            Param::W3(l) => in_layer(l, after_vectors + q * d + d + 2 * f * d),
            Param::RmsFinal => self.layer_start + c.n_layers * self.layer_stride,
            Param::Classifier => self.layer_start + c.n_layers * self.layer_stride + d,
        };
        start..start + self.shape(p).iter().product::<usize>()
    }

    /// Every parameter in layout order.
    pub fn params(&self) -> Vec<Param> {
        let mut out = vec![Param::Embedding];
        for l in 0..self.config.n_layers {
            out.extend([Param::RmsAtt(l), Param::Wq(l), Param::Wk(l), Param::Wv(l)]);
            if self.config.qkv_bias {
                out.extend([Param::Bq(l), Param::Bk(l), Param::Bv(l)]);
            }
            if self.config.qk_norm {
                out.extend([Param::QNorm(l), Param::KNorm(l)]);
            }
            out.extend([
                Param::Wo(l),
                Param::RmsFfn(l),
                Param::W1(l),
                Param::W2(l),
                Param::W3(l),
            ]);
        }
        out.push(Param::RmsFinal);
        if !self.config.tied_embeddings {
            out.push(Param::Classifier);
        }
        out
    }

    /// The classifier matrix `(V, C)`: the embedding when tied.
    pub fn classifier(&self) -> Param {
        if self.config.tied_embeddings {
            Param::Embedding
        } else {
            Param::Classifier
        }
    }
}

/// A flat parameter vector (weights, gradients or optimizer moments) with its layout.
#[derive(Clone, Debug, PartialEq)]
pub struct Weights {
    pub layout: Layout,
    pub data: Vec<f32>,
}

impl Weights {
    /// All zeros (gradients, moments).
    pub fn zeros(config: &ModelConfig) -> Weights {
        let layout = Layout::new(config);
        let data = vec![0.0; layout.len()];
        Weights { layout, data }
    }

    /// GPT-2/llama2.c-style initialisation: matrices N(0, 0.02), the residual
    /// projections `wo` and `w2` N(0, 0.02/sqrt(2 n_layers)), norms 1, biases 0
    /// (which draw nothing from the generator).
    pub fn init(config: &ModelConfig, seed: u64) -> Weights {
        let mut w = Weights::zeros(config);
        let mut rng = Rng::new(seed);
        let resid_std = 0.02 / (2.0 * config.n_layers as f32).sqrt();
        for p in w.layout.params() {
            let range = w.layout.range(p);
            let slice = &mut w.data[range];
            match p {
                _ if p.is_norm() => slice.fill(1.0),
                Param::Bq(_) | Param::Bk(_) | Param::Bv(_) => slice.fill(0.0),
                Param::Wo(_) | Param::W2(_) => {
                    slice.iter_mut().for_each(|x| *x = resid_std * rng.normal())
                }
                _ => slice.iter_mut().for_each(|x| *x = 0.02 * rng.normal()),
            }
        }
        w
    }

    pub fn config(&self) -> &ModelConfig {
        self.layout.config()
    }

    pub fn get(&self, p: Param) -> &[f32] {
        &self.data[self.layout.range(p)]
    }

    pub fn get_mut(&mut self, p: Param) -> &mut [f32] {
        let range = self.layout.range(p);
        &mut self.data[range]
    }

    /// The classifier matrix `(V, C)` (the embedding when tied).
    pub fn classifier(&self) -> &[f32] {
        self.get(self.layout.classifier())
    }

    /// An error naming `path`, the tensor and the element when a weight is
    /// NaN or infinite (a diverged run's weights, or a corrupt file).
    pub fn check_finite(&self, path: &std::path::Path) -> crate::Result<()> {
        self.view().check_finite(path)
    }

    /// Every tensor borrowed, for code that only reads them (the decoder).
    pub fn view(&self) -> WeightsView<'_> {
        let tensors = self
            .layout
            .params()
            .into_iter()
            .map(|p| (p, self.get(p)))
            .collect();
        WeightsView::new(self.layout.clone(), tensors)
    }
}

/// The model's tensors borrowed read-only, each from wherever it lives: a
/// [`Weights`] vector ([`Weights::view`]) or a memory-mapped llama2.c file
/// (`super::llama2c::Mapped`), whose per-kind order differs from the flat
/// layout. Only what the decoder reads; training uses [`Weights`].
#[derive(Clone, Debug)]
pub struct WeightsView<'a> {
    pub layout: Layout,
    tensors: HashMap<Param, &'a [f32]>,
}

impl<'a> WeightsView<'a> {
    /// Panics unless `tensors` holds exactly the layout's parameters, each
    /// with its shape's number of values (programmer errors).
    pub fn new(layout: Layout, tensors: HashMap<Param, &'a [f32]>) -> WeightsView<'a> {
        let params = layout.params();
        assert_eq!(tensors.len(), params.len(), "one slice per parameter");
        for p in params {
            assert_eq!(tensors[&p].len(), layout.range(p).len(), "{}", p.name());
        }
        WeightsView { layout, tensors }
    }

    pub fn config(&self) -> &ModelConfig {
        self.layout.config()
    }

    /// The tensor `p`; panics on a parameter the model does not have.
    pub fn get(&self, p: Param) -> &'a [f32] {
        self.tensors
            .get(&p)
            .copied()
            .unwrap_or_else(|| panic!("the model has no {}", p.name()))
    }

    /// The tensor `p` when the model has it (a bias, a QK-norm weight).
    pub fn optional(&self, p: Param) -> Option<&'a [f32]> {
        self.tensors.get(&p).copied()
    }

    /// The classifier matrix `(V, C)` (the embedding when tied).
    pub fn classifier(&self) -> &'a [f32] {
        self.get(self.layout.classifier())
    }

    /// [`Weights::check_finite`] over the borrowed tensors, in layout order.
    pub fn check_finite(&self, path: &std::path::Path) -> crate::Result<()> {
        for p in self.layout.params() {
            let tensor = self.get(p);
            if all_finite(tensor) {
                continue;
            }
            let index = tensor
                .iter()
                .position(|x| !x.is_finite())
                .expect("a NaN sum has a non-finite term");
            return Err(crate::Error::format(
                path,
                format!("weights.{}", p.name()),
                format!(
                    "element {index} is {}: the weights are not finite (a diverged run, or a \
                     corrupt file)",
                    tensor[index]
                ),
            ));
        }
        Ok(())
    }
}

/// Whether every value is finite, in one vectorizable pass (`x - x` is 0
/// for a finite `x` and NaN otherwise; sixteen independent sums).
#[allow(clippy::eq_op)] // `x - x` is the test itself, not a mistake
fn all_finite(values: &[f32]) -> bool {
    const LANES: usize = 16;
    let chunks = values.chunks_exact(LANES);
    let tail = chunks.remainder().iter().all(|x| x.is_finite());
    let mut acc = [0.0f32; LANES];
    for chunk in chunks {
        for k in 0..LANES {
            acc[k] += chunk[k] - chunk[k];
        }
    }
    tail && acc.iter().all(|&a| a == 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_tile_the_vector_in_llama2c_order() {
        for tied in [true, false] {
            let config = ModelConfig {
                tied_embeddings: tied,
                ..ModelConfig::preset("stories260k").unwrap()
            };
            let layout = Layout::new(&config);
            let mut next = 0;
            for p in layout.params() {
                let r = layout.range(p);
                assert_eq!(r.start, next, "{}", p.name());
                next = r.end;
            }
            assert_eq!(next, layout.len());
            assert_eq!(layout.len(), config.n_params());
        }
    }

    #[test]
    fn feature_parameters_tile_the_vector_and_exist_only_with_their_feature() {
        let plain = ModelConfig::preset("stories260k").unwrap();
        let config = ModelConfig {
            qkv_bias: true,
            qk_norm: true,
            ..plain.clone()
        };
        let layout = Layout::new(&config);
        let mut next = 0;
        for p in layout.params() {
            let r = layout.range(p);
            assert_eq!(r.start, next, "{}", p.name());
            next = r.end;
        }
        assert_eq!(next, layout.len());
        assert_eq!(layout.len(), config.n_params());
        assert_eq!(layout.shape(Param::Bk(1)), vec![32]);
        assert_eq!(layout.shape(Param::QNorm(4)), vec![8]);
        let plain_layout = Layout::new(&plain);
        assert!(!plain_layout.contains(Param::Bq(0)) && !plain_layout.contains(Param::KNorm(0)));
        assert_eq!(plain_layout.params().len() + 5 * 5, layout.params().len());
        let w = Weights::init(&config, 2);
        assert!(w.get(Param::Bv(3)).iter().all(|&x| x == 0.0));
        assert!(w.get(Param::KNorm(3)).iter().all(|&x| x == 1.0));
        // The features draw nothing: the shared matrices get the same values.
        assert_eq!(
            w.get(Param::W2(4)),
            Weights::init(&plain, 2).get(Param::W2(4))
        );
    }

    #[test]
    fn gqa_shapes() {
        let c = ModelConfig::preset("stories260k").unwrap();
        let l = Layout::new(&c);
        assert_eq!(l.shape(Param::Wq(0)), vec![64, 64]);
        assert_eq!(l.shape(Param::Wk(4)), vec![32, 64]);
        assert_eq!(l.shape(Param::W2(1)), vec![64, 172]);
    }

    #[test]
    fn init_statistics() {
        let c = ModelConfig::preset("tiny").unwrap();
        let w = Weights::init(&c, 1);
        assert!(w.get(Param::RmsFfn(2)).iter().all(|&x| x == 1.0));
        let wq = w.get(Param::Wq(0));
        let std = (wq.iter().map(|x| x * x).sum::<f32>() / wq.len() as f32).sqrt();
        assert!((std - 0.02).abs() < 0.001, "{std}");
        let wo = w.get(Param::Wo(0));
        let std = (wo.iter().map(|x| x * x).sum::<f32>() / wo.len() as f32).sqrt();
        assert!((std - 0.02 / 8f32.sqrt()).abs() < 0.0005, "{std}");
        assert_eq!(Weights::init(&c, 1), w);
    }

    #[test]
    fn a_view_borrows_every_tensor_and_finds_non_finite_values() {
        let c = ModelConfig::preset("stories260k").unwrap();
        let mut w = Weights::init(&c, 3);
        let view = w.view();
        for p in w.layout.params() {
            assert_eq!(view.get(p), w.get(p), "{}", p.name());
        }
        assert_eq!(view.classifier(), w.get(Param::Embedding));
        assert!(view.optional(Param::Bq(0)).is_none());
        assert!(view.check_finite(std::path::Path::new("m.bin")).is_ok());
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            // Past the first sixteen values, and in a remainder of a chunk.
            for index in [37, w.get(Param::W2(1)).len() - 1] {
                let mut broken = w.clone();
                broken.get_mut(Param::W2(1))[index] = bad;
                let err = broken
                    .check_finite(std::path::Path::new("m.bin"))
                    .unwrap_err();
                let text = err.to_string();
                assert!(text.contains("layers.1.w2"), "{text}");
                assert!(text.contains(&format!("element {index} ")), "{text}");
            }
        }
        w.get_mut(Param::RmsFinal)[0] = f32::MAX;
        assert!(w.check_finite(std::path::Path::new("m.bin")).is_ok());
    }
}
