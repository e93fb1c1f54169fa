//! One layer's parameters as views into the flat weight vector: the one
//! place the training step looks a layer's tensors up (adding a tensor to the
//! layer, such as a bias, starts here). Owns no memory.

use crate::model::{Param, Weights};

/// One layer's parameters as the kernels and the host math read them:
/// matrices `[out, in]` row-major, as stored; the features' vectors when the
/// config has them.
pub struct LayerParams<'w> {
    pub layer: usize,
    pub rms_att: &'w [f32],        // (C)
    pub wq: &'w [f32],             // (H*D, C)
    pub wk: &'w [f32],             // (Hkv*D, C)
    pub wv: &'w [f32],             // (Hkv*D, C)
    pub bq: Option<&'w [f32]>,     // (H*D) with qkv_bias
    pub bk: Option<&'w [f32]>,     // (Hkv*D) with qkv_bias
    pub bv: Option<&'w [f32]>,     // (Hkv*D) with qkv_bias
    pub q_norm: Option<&'w [f32]>, // (D) with qk_norm
    pub k_norm: Option<&'w [f32]>, // (D) with qk_norm
    pub wo: &'w [f32],             // (C, H*D)
    pub rms_ffn: &'w [f32],        // (C)
    pub w1: &'w [f32],             // (F, C)
    pub w2: &'w [f32],             // (C, F)
    pub w3: &'w [f32],             // (F, C)
}

impl<'w> LayerParams<'w> {
    pub fn new(weights: &'w Weights, layer: usize) -> LayerParams<'w> {
        let optional = |param: Param| weights.layout.contains(param).then(|| weights.get(param));
        LayerParams {
            layer,
            rms_att: weights.get(Param::RmsAtt(layer)),
            wq: weights.get(Param::Wq(layer)),
            wk: weights.get(Param::Wk(layer)),
            wv: weights.get(Param::Wv(layer)),
            bq: optional(Param::Bq(layer)),
            bk: optional(Param::Bk(layer)),
            bv: optional(Param::Bv(layer)),
            q_norm: optional(Param::QNorm(layer)),
            k_norm: optional(Param::KNorm(layer)),
            wo: weights.get(Param::Wo(layer)),
            rms_ffn: weights.get(Param::RmsFfn(layer)),
            w1: weights.get(Param::W1(layer)),
            w2: weights.get(Param::W2(layer)),
            w3: weights.get(Param::W3(layer)),
        }
    }

    /// The tensor a kernel's slot of this name reads (`wq`, `bq`,
    /// `q_norm`, ...: `model::kernels`' names), for kernels with the
    /// layer's weights baked in; `None` for another name or a feature the
    /// model does not have.
    pub fn by_slot(&self, name: &str) -> Option<&'w [f32]> {
        Some(match name {
            "wq" => self.wq,
            "wk" => self.wk,
            "wv" => self.wv,
            "wo" => self.wo,
            "w1" => self.w1,
            "w2" => self.w2,
            "w3" => self.w3,
            "bq" => self.bq?,
            "bk" => self.bk?,
            "bv" => self.bv?,
            "q_norm" => self.q_norm?,
            "k_norm" => self.k_norm?,
            _ => return None,
        })
    }
}
