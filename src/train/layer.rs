//! One transformer layer over the batch, as a forward/backward pair:
//! [`layer_forward`] and [`layer_backward`], with the layer's parameters
//! looked up in one place ([`LayerParams`]). Each stage runs every sequence
//! through one kernel (`stages`); RMSNorm and the residual adds run on the
//! host in fp32 between them.
//!
//! The backward says which weight gradient each stage makes computable
//! (`dw.due`); when it runs is the scheduler's decision (`schedule`), and
//! the timing of the host math is `profile`'s.

use crate::Result;
use crate::backend::Backend;
use crate::model::kernels::LayerKernels;
use crate::model::{Param, Weights};
use crate::train::buffers::{BackwardScratch, Dy, LayerActs};
use crate::train::kernel::CompiledKernel;
use crate::train::profile::TimedHost;
use crate::train::schedule::DwPass;
use crate::train::stages;

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

/// What the layer passes run on.
pub struct LayerContext<'e> {
    pub backend: &'e mut dyn Backend,
    pub kernels: &'e LayerKernels<CompiledKernel>,
    pub host: &'e mut TimedHost,
    pub norm_eps: f32,
}

/// Forward through one layer for every sequence `b` of the batch: `acts[b].x`
/// in, `out[b]` (the next layer's input) out, the rest of `acts[b]` saved for
/// the backward.
pub fn layer_forward(
    ctx: &mut LayerContext,
    params: &LayerParams,
    acts: &mut [LayerActs],
    out: &mut [&mut Vec<f32>],
) -> Result<()> {
    let eps = ctx.norm_eps;
    for layer_acts in acts.iter_mut() {
        let LayerActs { x, xn, rrms1, .. } = layer_acts;
        ctx.host.rmsnorm_forward(xn, rrms1, x, params.rms_att, eps);
    }
    stages::attn_fwd(ctx.backend, ctx.kernels, params, acts)?;
    stages::wo_fwd(ctx.backend, ctx.kernels, params, acts)?;
    for layer_acts in acts.iter_mut() {
        let LayerActs {
            x, x2, x2n, rrms2, ..
        } = layer_acts;
        add_assign(x2, x); // x2 = x + Wo attn
        ctx.host
            .rmsnorm_forward(x2n, rrms2, x2, params.rms_ffn, eps);
    }
    stages::ffn_fwd(ctx.backend, ctx.kernels, params, acts, out)?;
    for (layer_acts, out) in acts.iter().zip(out) {
        add_assign(out, &layer_acts.x2); // x_out = x2 + W2 gate
    }
    Ok(())
}

/// Backward through one layer for every sequence of the batch: `dx` (in the
/// scheduler's arrays) comes in as the gradient of the layer's output and
/// leaves as the gradient of its input; the norm weights' gradients are
/// written here, the matrices' declared due.
pub fn layer_backward(
    ctx: &mut LayerContext,
    params: &LayerParams,
    acts: &[LayerActs],
    scratch: &mut BackwardScratch,
    dw: &mut DwPass,
) -> Result<()> {
    let (layer, kernels, backend) = (params.layer, ctx.kernels, &mut *ctx.backend);
    // x_out = x2 + W2 gate: the FFN's output gradient is dx; dx2 starts as dx.
    dw.run("ffn_bwd_w2", [], |dy, []| {
        stages::ffn_bwd_w2(backend, kernels, params, &dy.dx, &mut scratch.dgate)
    })?;
    dw.due(Param::W2(layer), Dy::Dx, |a| &a.gate);
    dw.run("ffn_bwd_w13", [Dy::Dh1, Dy::Dh3], |_, [dh1, dh3]| {
        let dgate = &scratch.dgate;
        stages::ffn_bwd_w13(
            backend,
            kernels,
            params,
            acts,
            dgate,
            &mut scratch.dx2n,
            dh1,
            dh3,
        )
    })?;
    dw.due(Param::W1(layer), Dy::Dh1, |a| &a.x2n);
    dw.due(Param::W3(layer), Dy::Dh3, |a| &a.x2n);
    // dx2 = dx + rmsnorm_backward(dx2n).
    let (rms_ffn, dx2n) = (params.rms_ffn, &scratch.dx2n);
    norm_backward(
        ctx.host,
        dw,
        Param::RmsFfn(layer),
        rms_ffn,
        dx2n,
        acts,
        |a| (&a.x2, &a.rrms2),
    );
    dw.run("wo_bwd", [], |dy, []| {
        stages::wo_bwd(backend, kernels, params, &dy.dx, &mut scratch.dattn)
    })?;
    dw.due(Param::Wo(layer), Dy::Dx, |a| &a.attn);
    dw.run("attn_bwd", [Dy::Dq, Dy::Dk, Dy::Dv], |_, [dq, dk, dv]| {
        stages::attn_bwd(backend, kernels, acts, &scratch.dattn, dq, dk, dv)
    })?;
    dw.due(Param::Wq(layer), Dy::Dq, |a| &a.xn);
    dw.due(Param::Wk(layer), Dy::Dk, |a| &a.xn);
    dw.due(Param::Wv(layer), Dy::Dv, |a| &a.xn);
    // dxn = Wq^T dq + (Wk^T dk + Wv^T dv).
    dw.run("q_bwd", [], |dy, []| {
        stages::q_bwd(backend, kernels, params, &dy.dq, &mut scratch.dxn)?;
        stages::kv_bwd(
            backend,
            kernels,
            params,
            &dy.dk,
            &dy.dv,
            &mut scratch.dxn_kv,
        )?;
        for (dxn, dxn_kv) in scratch.dxn.iter_mut().zip(&scratch.dxn_kv) {
            add_assign(dxn, dxn_kv);
        }
        Ok(())
    })?;
    // dx = dx2 + rmsnorm_backward(dxn).
    let (rms_att, dxn) = (params.rms_att, &scratch.dxn);
    norm_backward(
        ctx.host,
        dw,
        Param::RmsAtt(layer),
        rms_att,
        dxn,
        acts,
        |a| (&a.x, &a.rrms1),
    );
    Ok(())
}

/// `dx += rmsnorm_backward(dy)` per sequence, in place in the scheduler's
/// `dx`, with the norm weight `param`'s gradient; `saved` gives the norm's
/// input and reciprocal RMS.
fn norm_backward(
    host: &mut TimedHost,
    dw: &mut DwPass,
    param: Param,
    weight: &[f32],
    dy: &[Vec<f32>],
    acts: &[LayerActs],
    saved: fn(&LayerActs) -> (&Vec<f32>, &Vec<f32>),
) {
    let mut dx = dw.take(Dy::Dx);
    for ((dx, dy), layer_acts) in dx.iter_mut().zip(dy).zip(acts) {
        let (x, rrms) = saved(layer_acts);
        host.rmsnorm_backward(dx, dw.grads.get_mut(param), dy, x, weight, rrms);
    }
    dw.put(Dy::Dx, dx);
    dw.grads.finished(param);
}

/// `dst += src`, element by element.
fn add_assign(dst: &mut [f32], src: &[f32]) {
    for (dst, src) in dst.iter_mut().zip(src) {
        *dst += src;
    }
}
