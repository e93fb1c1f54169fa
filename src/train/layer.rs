//! One transformer layer over the batch, as a forward/backward pair:
//! [`layer_forward`] and [`layer_backward`], with the layer's parameters
//! looked up in one place (`params::LayerParams`). Each stage runs every sequence
//! through one kernel ([`BatchKernels`]); RMSNorm and the residual adds run on the
//! host in fp32 between them.
//!
//! The backward says which weight gradient each stage makes computable
//! (`dw.due`; `dw.due_sum` for biases and QK-norm weights); when it runs is
//! the scheduler's decision (`schedule`), and the timing of the host math is
//! `profile`'s. A config's features (biases, QK-norm) live in the kernels and
//! their bindings; only QK-norm changes the order of the attention's backward.

use crate::Result;
use crate::backend::Backend;
use crate::model::Param;
use crate::model::kernels::LayerKernels;
use crate::model::lora::Target;
use crate::train::adapter_path::LoraLayer;
use crate::train::buffers::{BackwardScratch, Dy, Input, LayerActs};
use crate::train::kernel::CompiledKernel;
use crate::train::params::LayerParams;
use crate::train::profile::TimedHost;
use crate::train::schedule::DwPass;
use crate::train::stages::BatchKernels;

/// What the layer passes run on.
pub struct LayerContext<'e> {
    pub kernels: BatchKernels<'e>,
    pub host: &'e mut TimedHost,
    pub norm_eps: f32,
    /// An unmerged LoRA engine's adapter path (`train::adapter_path`): the
    /// kernels run the base, the host adds the adapters' part.
    pub lora: Option<LoraLayer<'e>>,
}

impl<'e> LayerContext<'e> {
    pub fn new(
        backend: &'e mut dyn Backend,
        kernels: &'e LayerKernels<CompiledKernel>,
        host: &'e mut TimedHost,
        norm_eps: f32,
    ) -> LayerContext<'e> {
        LayerContext {
            kernels: BatchKernels { backend, kernels },
            host,
            norm_eps,
            lora: None,
        }
    }
}

/// Forward through one layer for every sequence `b` of the batch: `acts[b].x`
/// in, `out[b]` (the next layer's input) out, the rest of `acts[b]` saved for
/// the backward; `gate[b]`, the FFN's gate, is not saved (see `Input::Gate`).
pub fn layer_forward(
    ctx: &mut LayerContext,
    params: &LayerParams,
    acts: &mut [LayerActs],
    gate: &mut [Vec<f32>],
    out: &mut [&mut Vec<f32>],
) -> Result<()> {
    let (kernels, host, eps) = (&mut ctx.kernels, &mut *ctx.host, ctx.norm_eps);
    let (layer, lora) = (params.layer, &mut ctx.lora);
    for layer_acts in acts.iter_mut() {
        let LayerActs { x, xn, rrms1, .. } = layer_acts;
        host.rmsnorm_forward(xn, rrms1, x, params.rms_att, eps);
    }
    if let Some(lora) = lora {
        let xns: Vec<&[f32]> = acts.iter().map(|a| a.xn.as_slice()).collect();
        for target in [Target::Q, Target::K, Target::V] {
            lora.make_deltas(layer, target, &xns);
        }
    }
    let deltas = lora.as_ref().map(|lora| &*lora.deltas);
    kernels.attn_fwd(params, acts, deltas)?;
    kernels.wo_fwd(params, acts)?;
    if let Some(lora) = lora {
        for (sequence, layer_acts) in acts.iter_mut().enumerate() {
            let LayerActs { attn, x2, .. } = layer_acts;
            lora.add_forward(layer, Target::O, sequence, attn, x2);
        }
    }
    for layer_acts in acts.iter_mut() {
        let LayerActs {
            x, x2, x2n, rrms2, ..
        } = layer_acts;
        add_assign(x2, x); // x2 = x + Wo attn
        host.rmsnorm_forward(x2n, rrms2, x2, params.rms_ffn, eps);
    }
    if let Some(lora) = lora {
        let x2ns: Vec<&[f32]> = acts.iter().map(|a| a.x2n.as_slice()).collect();
        for target in [Target::Gate, Target::Up] {
            lora.make_deltas(layer, target, &x2ns);
        }
    }
    let deltas = lora.as_ref().map(|lora| &*lora.deltas);
    kernels.ffn_fwd(params, acts, deltas, gate, out)?;
    if let Some(lora) = lora {
        for (sequence, (gate, out)) in gate.iter().zip(out.iter_mut()).enumerate() {
            lora.add_forward(layer, Target::Down, sequence, gate, out);
        }
    }
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
    let (layer, kernels, host) = (params.layer, &mut ctx.kernels, &mut *ctx.host);
    let lora = &mut ctx.lora;
    // x_out = x2 + W2 gate: the FFN's output gradient is dx; dx2 starts as dx.
    dw.run("ffn_bwd_w2", |dy| {
        kernels.ffn_bwd_w2(params, &dy.dx, &mut scratch.dgate)?;
        if let Some(lora) = lora {
            lora.add_dx(layer, Target::Down, &dy.dx, &mut scratch.dgate);
        }
        Ok(())
    })?;
    dw.due(Param::W2(layer), Dy::Dx, Input::Gate);
    dw.run_writing("ffn_bwd_w13", [Dy::Dh1, Dy::Dh3], |_, [dh1, dh3]| {
        kernels.ffn_bwd_w13(params, acts, &scratch.dgate, &mut scratch.dx2n, dh1, dh3)?;
        if let Some(lora) = lora {
            lora.add_dx(layer, Target::Gate, dh1, &mut scratch.dx2n);
            lora.add_dx(layer, Target::Up, dh3, &mut scratch.dx2n);
        }
        Ok(())
    })?;
    dw.due(Param::W1(layer), Dy::Dh1, Input::Saved(|saved| &saved.x2n));
    dw.due(Param::W3(layer), Dy::Dh3, Input::Saved(|saved| &saved.x2n));
    // dx2 = dx + rmsnorm_backward(dx2n).
    norm_backward(host, dw, params, Norm::Ffn, &scratch.dx2n, acts);
    dw.run("wo_bwd", |dy| {
        kernels.wo_bwd(params, &dy.dx, &mut scratch.dattn)?;
        if let Some(lora) = lora {
            lora.add_dx(layer, Target::O, &dy.dx, &mut scratch.dattn);
        }
        Ok(())
    })?;
    dw.due(Param::Wo(layer), Dy::Dx, Input::Saved(|saved| &saved.attn));
    if params.q_norm.is_some() {
        attention_backward_normed(kernels, lora, params, acts, scratch, dw)?;
    } else {
        dw.run_writing("attn_bwd", [Dy::Dq, Dy::Dk, Dy::Dv], |_, [dq, dk, dv]| {
            kernels.attn_bwd(acts, &scratch.dattn, dq, dk, dv)
        })?;
        dw.due(Param::Wq(layer), Dy::Dq, Input::Saved(|saved| &saved.xn));
        dw.due(Param::Wk(layer), Dy::Dk, Input::Saved(|saved| &saved.xn));
        dw.due(Param::Wv(layer), Dy::Dv, Input::Saved(|saved| &saved.xn));
        if params.bq.is_some() {
            dw.due_sum(Param::Bq(layer), Dy::Dq);
            dw.due_sum(Param::Bk(layer), Dy::Dk);
            dw.due_sum(Param::Bv(layer), Dy::Dv);
        }
        // dxn = Wq^T dq + (Wk^T dk + Wv^T dv).
        dw.run("q_bwd", |dy| {
            kernels.q_bwd(params, &dy.dq, &mut scratch.dxn)?;
            kernels.kv_bwd(params, &dy.dk, &dy.dv, &mut scratch.dxn_kv)?;
            add_each(&mut scratch.dxn, &scratch.dxn_kv);
            if let Some(lora) = lora {
                let dxn = &mut scratch.dxn;
                lora.add_dx(layer, Target::Q, &dy.dq, dxn);
                lora.add_dx(layer, Target::K, &dy.dk, dxn);
                lora.add_dx(layer, Target::V, &dy.dv, dxn);
            }
            Ok(())
        })?;
    }
    // dx = dx2 + rmsnorm_backward(dxn).
    norm_backward(host, dw, params, Norm::Attention, &scratch.dxn, acts);
    Ok(())
}

/// The attention's backward with QK-norm: `attn_bwd` gives the gradients of
/// the normed queries and keys, `q_bwd` and `kv_bwd` take them through the
/// norm (writing `dq`, `dk` of the projections and the norm weights'
/// gradients per position) and the projections into `dxn`.
fn attention_backward_normed(
    kernels: &mut BatchKernels,
    lora: &mut Option<LoraLayer>,
    params: &LayerParams,
    acts: &[LayerActs],
    scratch: &mut BackwardScratch,
    dw: &mut DwPass,
) -> Result<()> {
    let layer = params.layer;
    dw.run_writing("attn_bwd", [Dy::Dv], |_, [dv]| {
        let (dq, dk) = (&mut scratch.dq_normed, &mut scratch.dk_normed);
        kernels.attn_bwd(acts, &scratch.dattn, dq, dk, dv)
    })?;
    dw.due(Param::Wv(layer), Dy::Dv, Input::Saved(|saved| &saved.xn));
    let writes = [Dy::Dq, Dy::Dk, Dy::DqNorm, Dy::DkNorm];
    dw.run_writing("q_bwd", writes, |dy, [dq, dk, dq_norm, dk_norm]| {
        let (dq_normed, dk_normed) = (&scratch.dq_normed, &scratch.dk_normed);
        kernels.q_bwd_normed(params, acts, dq_normed, dq, dq_norm, &mut scratch.dxn)?;
        let dxn_kv = &mut scratch.dxn_kv;
        kernels.kv_bwd_normed(params, acts, dk_normed, &dy.dv, dk, dk_norm, dxn_kv)?;
        add_each(&mut scratch.dxn, &scratch.dxn_kv);
        if let Some(lora) = lora {
            let dxn = &mut scratch.dxn;
            lora.add_dx(layer, Target::Q, dq, dxn);
            lora.add_dx(layer, Target::K, dk, dxn);
            lora.add_dx(layer, Target::V, &dy.dv, dxn);
        }
        Ok(())
    })?;
    dw.due(Param::Wq(layer), Dy::Dq, Input::Saved(|saved| &saved.xn));
    dw.due(Param::Wk(layer), Dy::Dk, Input::Saved(|saved| &saved.xn));
    if params.bq.is_some() {
        dw.due_sum(Param::Bq(layer), Dy::Dq);
        dw.due_sum(Param::Bk(layer), Dy::Dk);
        dw.due_sum(Param::Bv(layer), Dy::Dv);
    }
    dw.due_sum(Param::QNorm(layer), Dy::DqNorm);
    dw.due_sum(Param::KNorm(layer), Dy::DkNorm);
    Ok(())
}

/// `dst[b] += src[b]` for every sequence `b`.
fn add_each(dst: &mut [Vec<f32>], src: &[Vec<f32>]) {
    for (dst, src) in dst.iter_mut().zip(src) {
        add_assign(dst, src);
    }
}

/// The layer's two RMSNorms.
#[derive(Clone, Copy)]
enum Norm {
    Attention,
    Ffn,
}

/// `dx += rmsnorm_backward(dy)` per sequence, in place in the scheduler's
/// `dx`, and the gradient of the norm's weight (unless the base is frozen).
fn norm_backward(
    host: &mut TimedHost,
    dw: &mut DwPass,
    params: &LayerParams,
    norm: Norm,
    dy: &[Vec<f32>],
    acts: &[LayerActs],
) {
    let (param, weight) = match norm {
        Norm::Attention => (Param::RmsAtt(params.layer), params.rms_att),
        Norm::Ffn => (Param::RmsFfn(params.layer), params.rms_ffn),
    };
    let mut dx = dw.take(Dy::Dx);
    for ((dx, dy), layer_acts) in dx.iter_mut().zip(dy).zip(acts) {
        // The norm's input and reciprocal RMS, as the forward saved them.
        let (x, rrms) = match norm {
            Norm::Attention => (&layer_acts.x, &layer_acts.rrms1),
            Norm::Ffn => (&layer_acts.x2, &layer_acts.rrms2),
        };
        host.rmsnorm_backward(dx, dw.grads.base_mut(param), dy, x, weight, rrms);
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
