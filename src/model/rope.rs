//! Rotary position embeddings as the model computes them: how the rotation
//! frequencies are rescaled ([`RopeScaling`], part of a
//! [`super::ModelConfig`]), the inverse frequencies of a head ([`inv_freq`])
//! and the cos/sin tables that rotate llama2.c's interleaved pairs
//! `(x[2i], x[2i+1])` ([`tables`]), which the kernels and the decoder use.
//!
//! The unscaled frequencies are `theta^(-2i/D)` computed in `f64`, the
//! expression llama2.c and anemone always used, so the tables of existing
//! models are unchanged bit for bit; the scalings follow transformers'
//! `modeling_rope_utils` formulas. Pure functions, no I/O. Not here: the
//! half-split <-> interleaved row permutation of Hugging Face checkpoints
//! (`super::hf::rope`).

use serde::{Deserialize, Serialize};

/// How RoPE frequencies are rescaled (transformers' `rope_type`). In a JSON
/// model config: absent (no scaling), `{"type": "linear", "factor": 2.0}` or
/// `{"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
/// "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// `default`: `theta^(-2i/D)`.
    #[default]
    None,
    /// `linear`: every frequency divided by `factor` (position interpolation).
    Linear { factor: f64 },
    /// `llama3`: low frequencies divided by `factor`, high ones kept, a smooth
    /// blend between (transformers' `_compute_llama3_parameters`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

impl RopeScaling {
    pub fn is_none(&self) -> bool {
        *self == RopeScaling::None
    }

    /// Why the parameters cannot be used, if they cannot (a factor that is
    /// not finite and positive, a llama3 band that is empty).
    pub fn problem(&self) -> Option<String> {
        let positive = |x: f64| x.is_finite() && x > 0.0;
        match *self {
            RopeScaling::None => None,
            RopeScaling::Linear { factor } => {
                (!positive(factor)).then(|| format!("linear factor {factor} must be positive"))
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                if !positive(factor) || !positive(low_freq_factor) || !positive(high_freq_factor) {
                    Some("llama3 factors must be positive".into())
                } else if high_freq_factor <= low_freq_factor {
                    Some(format!(
                        "llama3 high_freq_factor ({high_freq_factor}) must exceed \
                         low_freq_factor ({low_freq_factor})"
                    ))
                } else if original_max_position_embeddings == 0 {
                    Some("llama3 original_max_position_embeddings must be positive".into())
                } else {
                    None
                }
            }
        }
    }
}

/// The `head_dim / 2` inverse frequencies of pair `i`: `theta^(-2i/D)`,
/// divided by `factor` for `Linear`; for `Llama3`, frequencies whose
/// wavelength exceeds `original_max_position_embeddings / low_freq_factor`
/// are divided by `factor`, those shorter than `.. / high_freq_factor` kept,
/// and those in between blended linearly in `original / wavelength`.
pub fn inv_freq(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Vec<f64> {
    let base = (0..head_dim / 2).map(|i| theta.powf(-((2 * i) as f64) / head_dim as f64));
    match *scaling {
        RopeScaling::None => base.collect(),
        RopeScaling::Linear { factor } => base.map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let original = original_max_position_embeddings as f64;
            let low_freq_wavelen = original / low_freq_factor;
            let high_freq_wavelen = original / high_freq_factor;
            base.map(|freq| {
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                if wavelen > low_freq_wavelen {
                    freq / factor
                } else if wavelen < high_freq_wavelen {
                    freq
                } else {
                    let smooth = (original / wavelen - low_freq_factor)
                        / (high_freq_factor - low_freq_factor);
                    (1.0 - smooth) * freq / factor + smooth * freq
                }
            })
            .collect()
        }
    }
}

/// `(cos, sin)` of `pos * inv_freq[i]` for one position, one value per pair
/// (`head_dim / 2` each), each angle in `f64` and rounded once.
pub fn angles_at(pos: usize, inv_freq: &[f64], cos: &mut [f32], sin: &mut [f32]) {
    for ((c, s), &freq) in cos.iter_mut().zip(sin.iter_mut()).zip(inv_freq) {
        let angle = pos as f64 * freq;
        *c = angle.cos() as f32;
        *s = angle.sin() as f32;
    }
}

/// RoPE tables `[1, 1, T, D]` for `seq` positions: entries `2i` and `2i+1` of
/// row `p` hold `cos(p * inv_freq[i])` (resp. `sin`), llama2.c's interleaved
/// pairs.
pub fn tables(seq: usize, inv_freq: &[f64]) -> (Vec<f32>, Vec<f32>) {
    let head_dim = 2 * inv_freq.len();
    let mut cos = vec![0.0; seq * head_dim];
    let mut sin = vec![0.0; seq * head_dim];
    let (mut c, mut s) = (vec![0.0; inv_freq.len()], vec![0.0; inv_freq.len()]);
    for p in 0..seq {
        angles_at(p, inv_freq, &mut c, &mut s);
        for i in 0..inv_freq.len() {
            for j in [2 * i, 2 * i + 1] {
                cos[p * head_dim + j] = c[i];
                sin[p * head_dim + j] = s[i];
            }
        }
    }
    (cos, sin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_forms_of_the_scalings() {
        let llama3 = RopeScaling::Llama3 {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let text = serde_json::to_string(&llama3).unwrap();
        assert!(
            text.starts_with(r#"{"type":"llama3","factor":32.0"#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<RopeScaling>(&text).unwrap(), llama3);
        let linear: RopeScaling = serde_json::from_str(r#"{"type":"linear","factor":2}"#).unwrap();
        assert_eq!(linear, RopeScaling::Linear { factor: 2.0 });
        assert!(serde_json::from_str::<RopeScaling>(r#"{"type":"yarn","factor":2}"#).is_err());
        assert!(llama3.problem().is_none());
        let empty_band = RopeScaling::Llama3 {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 1.0,
            original_max_position_embeddings: 8192,
        };
        assert!(empty_band.problem().unwrap().contains("high_freq_factor"));
        assert!(RopeScaling::Linear { factor: 0.0 }.problem().is_some());
    }

    #[test]
    fn unscaled_tables_are_llama2c_s_expression() {
        let freqs = inv_freq(8, 10000.0, &RopeScaling::None);
        let (cos, sin) = tables(3, &freqs);
        for p in 0..3 {
            for i in 0..4 {
                let freq = 10000f64.powf(-2.0 * i as f64 / 8.0);
                let angle = p as f64 * freq;
                for j in [2 * i, 2 * i + 1] {
                    assert_eq!(cos[p * 8 + j].to_bits(), (angle.cos() as f32).to_bits());
                    assert_eq!(sin[p * 8 + j].to_bits(), (angle.sin() as f32).to_bits());
                }
            }
        }
    }
}
