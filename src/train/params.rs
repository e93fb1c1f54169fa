//! One layer's parameters as views into the flat weight vector: the one
//! place the training step looks a layer's tensors up (adding a tensor to the
//! layer, such as a bias, starts here). Owns no memory.

use crate::model::{Param, Weights};

/// One layer's parameters as the kernels and the host math read them:
/// matrices `[out, in]` row-major, as stored.
pub struct LayerParams<'w> {
    pub layer: usize,
    pub rms_att: &'w [f32], // (C)
    pub wq: &'w [f32],      // (H*D, C)
    pub wk: &'w [f32],      // (Hkv*D, C)
    pub wv: &'w [f32],      // (Hkv*D, C)
    pub wo: &'w [f32],      // (C, H*D)
    pub rms_ffn: &'w [f32], // (C)
    pub w1: &'w [f32],      // (F, C)
    pub w2: &'w [f32],      // (C, F)
    pub w3: &'w [f32],      // (F, C)
}

impl<'w> LayerParams<'w> {
    pub fn new(weights: &'w Weights, layer: usize) -> LayerParams<'w> {
        LayerParams {
            layer,
            rms_att: weights.get(Param::RmsAtt(layer)),
            wq: weights.get(Param::Wq(layer)),
            wk: weights.get(Param::Wk(layer)),
            wv: weights.get(Param::Wv(layer)),
            wo: weights.get(Param::Wo(layer)),
            rms_ffn: weights.get(Param::RmsFfn(layer)),
            w1: weights.get(Param::W1(layer)),
            w2: weights.get(Param::W2(layer)),
            w3: weights.get(Param::W3(layer)),
        }
    }
}
