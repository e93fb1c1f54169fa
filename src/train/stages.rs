//! Each layer kernel run over the batch: every sequence through one kernel in
//! one [`run_many`], its slots bound by name to the layer's parameters and
//! the sequence's arrays (shapes in `buffers`; slot names in
//! `model::kernels`). One method of [`BatchKernels`] per kernel, named after it.
//!
//! This module binds and runs; the order of the stages and the host math
//! between them are `layer`'s, the weight gradients `schedule`'s.

use crate::backend::Backend;
use crate::model::kernels::LayerKernels;
use crate::train::buffers::{DeltaArrays, LayerActs};
use crate::train::kernel::{CompiledKernel, run_many};
use crate::train::params::LayerParams;
use crate::{Error, Result};

/// A layer's compiled kernels on their backend, each run over the batch.
pub struct BatchKernels<'e> {
    pub backend: &'e mut dyn Backend,
    pub kernels: &'e LayerKernels<CompiledKernel>,
}

impl BatchKernels<'_> {
    /// `attn`, `q_rope`, `k_rope`, `v` from `xn`: QKV projections (with their
    /// biases), QK-norm (saving `q_lin`, `k_lin`), RoPE, causal attention.
    /// With `deltas` (an unmerged LoRA engine's), the adapters' part of the
    /// projections is added in the kernel.
    pub fn attn_fwd(
        &mut self,
        params: &LayerParams,
        acts: &mut [LayerActs],
        deltas: Option<&DeltaArrays>,
    ) -> Result<()> {
        let qk_norm = params.q_norm.is_some();
        let delta = |name: &str, sequence: usize| deltas.and_then(|d| d.input(name, sequence));
        run_many(
            self.backend,
            acts.iter_mut().enumerate().map(|(sequence, layer_acts)| {
                let call = self
                    .kernels
                    .attn_fwd
                    .call()
                    .weight("wq", params.wq)
                    .weight("wk", params.wk)
                    .weight("wv", params.wv)
                    .weight_if("bq", params.bq)
                    .weight_if("bk", params.bk)
                    .weight_if("bv", params.bv)
                    .weight_if("q_norm", params.q_norm)
                    .weight_if("k_norm", params.k_norm)
                    .input("xn", &layer_acts.xn)
                    .input_if("q_delta", delta("q_delta", sequence))
                    .input_if("k_delta", delta("k_delta", sequence))
                    .input_if("v_delta", delta("v_delta", sequence))
                    .output("attn", &mut layer_acts.attn)
                    .output("q_rope", &mut layer_acts.q_rope)
                    .output("k_rope", &mut layer_acts.k_rope)
                    .output("v", &mut layer_acts.v);
                if qk_norm {
                    call.output("q_lin", &mut layer_acts.q_lin)
                        .output("k_lin", &mut layer_acts.k_lin)
                } else {
                    call
                }
            }),
        )
    }

    /// `x2 = Wo attn` (the residual is added on the host).
    pub fn wo_fwd(&mut self, params: &LayerParams, acts: &mut [LayerActs]) -> Result<()> {
        run_many(
            self.backend,
            acts.iter_mut().map(|layer_acts| {
                self.kernels
                    .wo_fwd
                    .call()
                    .weight("wo", params.wo)
                    .input("attn", &layer_acts.attn)
                    .output("o", &mut layer_acts.x2)
            }),
        )
    }

    /// `h1`, `h3`, `gate` and `out = W2 gate` from `x2n` (SwiGLU); `gate`
    /// into one array per sequence that every layer reuses (the backward
    /// makes it again: `buffers::Input::Gate`). With `deltas`, the
    /// adapters' part of `h1` and `h3` is added in the kernel.
    pub fn ffn_fwd(
        &mut self,
        params: &LayerParams,
        acts: &mut [LayerActs],
        deltas: Option<&DeltaArrays>,
        gate: &mut [Vec<f32>],
        out: &mut [&mut Vec<f32>],
    ) -> Result<()> {
        let outputs = gate.iter_mut().zip(out.iter_mut());
        let delta = |name: &str, sequence: usize| deltas.and_then(|d| d.input(name, sequence));
        run_many(
            self.backend,
            acts.iter_mut().zip(outputs).enumerate().map(
                |(sequence, (layer_acts, (gate, out)))| {
                    self.kernels
                        .ffn_fwd
                        .call()
                        .weight("w1", params.w1)
                        .weight("w3", params.w3)
                        .weight("w2", params.w2)
                        .input("x2n", &layer_acts.x2n)
                        .input_if("gate_delta", delta("gate_delta", sequence))
                        .input_if("up_delta", delta("up_delta", sequence))
                        .output("h1", &mut layer_acts.h1)
                        .output("h3", &mut layer_acts.h3)
                        .output("gate", gate)
                        .output("ffn", out)
                },
            ),
        )
    }

    /// `dgate = W2^T dffn`.
    pub fn ffn_bwd_w2(
        &mut self,
        params: &LayerParams,
        dffn: &[Vec<f32>],
        dgate: &mut [Vec<f32>],
    ) -> Result<()> {
        run_many(
            self.backend,
            dffn.iter().zip(dgate.iter_mut()).map(|(dffn, dgate)| {
                self.kernels
                    .ffn_bwd_w2
                    .call()
                    .weight("w2", params.w2)
                    .input("dffn", dffn)
                    .output("dgate", dgate)
            }),
        )
    }

    /// `dh1`, `dh3` and `dx2n = W1^T dh1 + W3^T dh3` from `dgate`, `h1`, `h3`.
    pub fn ffn_bwd_w13(
        &mut self,
        params: &LayerParams,
        acts: &[LayerActs],
        dgate: &[Vec<f32>],
        dx2n: &mut [Vec<f32>],
        dh1: &mut [Vec<f32>],
        dh3: &mut [Vec<f32>],
    ) -> Result<()> {
        let outputs = dx2n.iter_mut().zip(dh1.iter_mut().zip(dh3.iter_mut()));
        run_many(
            self.backend,
            acts.iter()
                .zip(dgate)
                .zip(outputs)
                .map(|((layer_acts, dgate), (dx2n, (dh1, dh3)))| {
                    self.kernels
                        .ffn_bwd_w13
                        .call()
                        .weight("w1", params.w1)
                        .weight("w3", params.w3)
                        .input("dgate", dgate)
                        .input("h1", &layer_acts.h1)
                        .input("h3", &layer_acts.h3)
                        .output("dx2n", dx2n)
                        .output("dh1", dh1)
                        .output("dh3", dh3)
                }),
        )
    }

    /// `dattn = Wo^T dx2`.
    pub fn wo_bwd(
        &mut self,
        params: &LayerParams,
        dx2: &[Vec<f32>],
        dattn: &mut [Vec<f32>],
    ) -> Result<()> {
        run_many(
            self.backend,
            dx2.iter().zip(dattn.iter_mut()).map(|(dx2, dattn)| {
                self.kernels
                    .wo_bwd
                    .call()
                    .weight("wo", params.wo)
                    .input("dx2", dx2)
                    .output("dattn", dattn)
            }),
        )
    }

    /// `dq`, `dk`, `dv` (before RoPE) from `dattn` and the saved `q_rope`,
    /// `k_rope`, `v`; through the split pair where the device refused the
    /// fused kernel ([`BatchKernels::attn_bwd_split`]).
    pub fn attn_bwd(
        &mut self,
        acts: &[LayerActs],
        dattn: &[Vec<f32>],
        dq: &mut [Vec<f32>],
        dk: &mut [Vec<f32>],
        dv: &mut [Vec<f32>],
    ) -> Result<()> {
        let kernels = self.kernels;
        if let Some(parts) = kernels.attn_bwd.parts() {
            return self.attn_bwd_split(parts, acts, dattn, dq, dk, dv);
        }
        let outputs = dq.iter_mut().zip(dk.iter_mut().zip(dv.iter_mut()));
        run_many(
            self.backend,
            acts.iter()
                .zip(dattn)
                .zip(outputs)
                .map(|((layer_acts, dattn), (dq, (dk, dv)))| {
                    self.kernels
                        .attn_bwd
                        .call()
                        .input("q_rope", &layer_acts.q_rope)
                        .input("k_rope", &layer_acts.k_rope)
                        .input("v", &layer_acts.v)
                        .input("dattn", dattn)
                        .output("dq", dq)
                        .output("dk", dk)
                        .output("dv", dv)
                }),
        )
    }

    /// [`BatchKernels::attn_bwd`] as the split pair, one sequence at a time:
    /// `attn_bwd_dv` writes `dv` and the probabilities and their gradient
    /// (`H*T x T` each, in two host arrays reused for every sequence), which
    /// `attn_bwd_dqk` reads with `q_rope`, `k_rope` to write `dq`, `dk`.
    fn attn_bwd_split(
        &mut self,
        parts: &[CompiledKernel],
        acts: &[LayerActs],
        dattn: &[Vec<f32>],
        dq: &mut [Vec<f32>],
        dk: &mut [Vec<f32>],
        dv: &mut [Vec<f32>],
    ) -> Result<()> {
        let [first, second] = parts else {
            return Err(Error::Invalid(format!(
                "attn_bwd's split has 2 kernels, got {}",
                parts.len()
            )));
        };
        let len = |name: &str| {
            let slot = first.spec.output(name);
            slot.rows * slot.cols
        };
        let (mut probs, mut dp) = (vec![0.0; len("probs")], vec![0.0; len("dp")]);
        let outputs = dq.iter_mut().zip(dk.iter_mut().zip(dv.iter_mut()));
        for ((layer_acts, dattn), (dq, (dk, dv))) in acts.iter().zip(dattn).zip(outputs) {
            first
                .call()
                .input("q_rope", &layer_acts.q_rope)
                .input("k_rope", &layer_acts.k_rope)
                .input("v", &layer_acts.v)
                .input("dattn", dattn)
                .output("dv", dv)
                .output("probs", &mut probs)
                .output("dp", &mut dp)
                .run(self.backend)?;
            second
                .call()
                .input("probs", &probs)
                .input("dp", &dp)
                .input("q_rope", &layer_acts.q_rope)
                .input("k_rope", &layer_acts.k_rope)
                .output("dq", dq)
                .output("dk", dk)
                .run(self.backend)?;
        }
        Ok(())
    }

    /// `dxn = Wq^T dq`.
    pub fn q_bwd(
        &mut self,
        params: &LayerParams,
        dq: &[Vec<f32>],
        dxn: &mut [Vec<f32>],
    ) -> Result<()> {
        run_many(
            self.backend,
            dq.iter().zip(dxn.iter_mut()).map(|(dq, dxn)| {
                self.kernels
                    .q_bwd
                    .call()
                    .weight("wq", params.wq)
                    .input("dq", dq)
                    .output("dxn", dxn)
            }),
        )
    }

    /// With QK-norm: from the gradient of the normed queries `dq` and the
    /// saved `q_lin`, `dq_lin` (of `Wq xn + bq`), `dq_norm` (the norm
    /// weight's, per position) and `dxn = Wq^T dq_lin`.
    pub fn q_bwd_normed(
        &mut self,
        params: &LayerParams,
        acts: &[LayerActs],
        dq: &[Vec<f32>],
        dq_lin: &mut [Vec<f32>],
        dq_norm: &mut [Vec<f32>],
        dxn: &mut [Vec<f32>],
    ) -> Result<()> {
        let outputs = dq_lin
            .iter_mut()
            .zip(dq_norm.iter_mut().zip(dxn.iter_mut()));
        run_many(
            self.backend,
            acts.iter()
                .zip(dq)
                .zip(outputs)
                .map(|((layer_acts, dq), (dq_lin, (dq_norm, dxn)))| {
                    self.kernels
                        .q_bwd
                        .call()
                        .weight("wq", params.wq)
                        .weight_if("q_norm", params.q_norm)
                        .input("dq", dq)
                        .input("q_lin", &layer_acts.q_lin)
                        .output("dxn", dxn)
                        .output("dq_lin", dq_lin)
                        .output("dq_norm", dq_norm)
                }),
        )
    }

    /// With QK-norm: [`BatchKernels::q_bwd_normed`] for the keys, and the
    /// values' share: `dk_lin`, `dk_norm` and `dxn = Wk^T dk_lin + Wv^T dv`.
    #[allow(clippy::too_many_arguments)]
    pub fn kv_bwd_normed(
        &mut self,
        params: &LayerParams,
        acts: &[LayerActs],
        dk: &[Vec<f32>],
        dv: &[Vec<f32>],
        dk_lin: &mut [Vec<f32>],
        dk_norm: &mut [Vec<f32>],
        dxn: &mut [Vec<f32>],
    ) -> Result<()> {
        let inputs = acts.iter().zip(dk.iter().zip(dv));
        let outputs = dk_lin
            .iter_mut()
            .zip(dk_norm.iter_mut().zip(dxn.iter_mut()));
        run_many(
            self.backend,
            inputs
                .zip(outputs)
                .map(|((layer_acts, (dk, dv)), (dk_lin, (dk_norm, dxn)))| {
                    self.kernels
                        .kv_bwd
                        .call()
                        .weight("wk", params.wk)
                        .weight("wv", params.wv)
                        .weight_if("k_norm", params.k_norm)
                        .input("dk", dk)
                        .input("dv", dv)
                        .input("k_lin", &layer_acts.k_lin)
                        .output("dxn", dxn)
                        .output("dk_lin", dk_lin)
                        .output("dk_norm", dk_norm)
                }),
        )
    }

    /// `dxn = Wk^T dk + Wv^T dv`.
    pub fn kv_bwd(
        &mut self,
        params: &LayerParams,
        dk: &[Vec<f32>],
        dv: &[Vec<f32>],
        dxn: &mut [Vec<f32>],
    ) -> Result<()> {
        run_many(
            self.backend,
            dk.iter()
                .zip(dv)
                .zip(dxn.iter_mut())
                .map(|((dk, dv), dxn)| {
                    self.kernels
                        .kv_bwd
                        .call()
                        .weight("wk", params.wk)
                        .weight("wv", params.wv)
                        .input("dk", dk)
                        .input("dv", dv)
                        .output("dxn", dxn)
                }),
        )
    }
}
