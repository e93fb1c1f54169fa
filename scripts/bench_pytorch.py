#!/usr/bin/env python3
"""PyTorch baseline for `anemone bench train-step`: the same training-step
workloads (same shapes, optimizer and thread count), printing the same fields,
so the ratio can be measured in one session on one machine.

Model, llama2.c presets (tiny, stories*, layer768): llama2.c's Llama block
(RMSNorm eps 1e-5, RoPE on interleaved pairs with theta 1e4, causal attention,
SwiGLU FFN, tied classifier), written here. Hugging Face presets (smollm2-135m,
smollm2-360m, qwen2.5-0.5b, qwen3-0.6b, llama3.2-1b, tinyllama-1.1b): the
model class of `transformers` itself (LlamaForCausalLM, Qwen2ForCausalLM,
Qwen3ForCausalLM) built from a config with the preset's shape (as
src/model/config.rs: GQA, head_dim, tied or untied classifier, the vocabulary,
RoPE theta and scaling, RMSNorm eps, q/k/v biases for Qwen2, QK-norm for Qwen3)
and transformers' random init, fp32, its default attention (SDPA; `--attention
manual` picks its eager one). Both: cross-entropy over the full vocabulary;
AdamW lr 3e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on matrices and
the embedding (none on norm weights and biases), global-norm clip 1.0; fp32
throughout. Tokens are seeded random ids (the data does not change the cost).

LoRA (`--lora`, Hugging Face presets only): the same base model made a
`peft` model, `LoraConfig(r=R, lora_alpha=2R, lora_dropout=0, target_modules=
[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj])` (or
`--lora-targets`), the base frozen (peft's default), AdamW as above on the
adapters alone (all matrices: weight decay 0.1), clip 1.0 over them. The
step is what `anemone bench train-step --lora` times (anemone's B is random
where peft's starts at zero; that changes no cost).

FLOPs (the convention anemone uses, docs/performance.md):
  forward per sequence = 2*T*(sum over layers of the elements of wq, wk, wv, wo,
                         w1, w2, w3, plus the classifier V*D)
                       + per layer 4*T*T*(n_heads*head_dim)   (QK^T and AV, full square)
  training = 3 x forward, times the batch. Embedding gather, norms and
  elementwise work are not counted.
  LoRA = 2 x forward (forward and input gradients, no weight gradients) plus
  4*r*(in + out) per adapted projection and token (the adapters' gradient
  products), times the batch; not counted on either side: the adapters' own
  forward and input-gradient products (peft's B(Ax); anemone merges instead),
  anemone's merge and the optimizer.

Also measures the machine's fp32 GEMM peak in the same run (a square-ish matmul,
default 2048x768x512, median GFLOP/s with the same threads) and reports the
fraction of it the training step reaches, and the peak RSS of the process.

Examples (the three workloads of docs/performance.md):
  python3 scripts/bench_pytorch.py --config layer768                       # seq 512 batch 1
  python3 scripts/bench_pytorch.py --config stories15m --seq 256 --batch 8
  python3 scripts/bench_pytorch.py --config stories110m --seq 256 --batch 1
  python3 scripts/bench_pytorch.py --config smollm2-135m --seq 512 --batch 1   # needs transformers
  python3 scripts/bench_pytorch.py --config qwen2.5-0.5b --seq 512 --batch 1
  python3 scripts/bench_pytorch.py --config smollm2-135m --lora --lora-rank 16   # needs peft

Needs torch (CPU is enough); never run by CI.
"""
import argparse
import json
import math
import os
import platform
import resource
import statistics
import time

import torch
import torch.nn.functional as F

# name: (dim, n_layers, n_heads, n_kv_heads, hidden_dim, vocab_size, default seq, default batch)
# Shapes as in src/model/config.rs; default seq/batch are the documented workloads.
PRESETS = {
    "tiny": (192, 4, 6, 6, 512, 1024, 128, 1),
    "stories260k": (64, 5, 8, 4, 172, 512, 256, 1),
    "stories15m": (288, 6, 6, 6, 768, 32000, 256, 8),
    "stories42m": (512, 8, 8, 8, 1376, 32000, 256, 1),
    "stories110m": (768, 12, 12, 12, 2048, 32000, 256, 1),
    "layer768": (768, 1, 12, 12, 2048, 256, 512, 1),
}
# Hugging Face shapes, as src/model/config.rs's presets (the checkpoints' config.json):
# name: (class, dim, n_layers, n_heads, n_kv_heads, head_dim, hidden_dim, vocab_size,
#        rope_theta, rms_norm_eps, tied, rope_scaling or None)
HF_PRESETS = {
    "smollm2-135m": ("llama", 576, 30, 9, 3, 64, 1536, 49152, 1e5, 1e-5, True, None),
    "smollm2-360m": ("llama", 960, 32, 15, 5, 64, 2560, 49152, 1e5, 1e-5, True, None),
    "qwen2.5-0.5b": ("qwen2", 896, 24, 14, 2, 64, 4864, 151936, 1e6, 1e-6, True, None),
    "qwen3-0.6b": ("qwen3", 1024, 28, 16, 8, 128, 3072, 151936, 1e6, 1e-6, True, None),
    "llama3.2-1b": ("llama", 2048, 16, 32, 8, 64, 8192, 128256, 5e5, 1e-5, True,
                    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "tinyllama-1.1b": ("llama", 2048, 22, 32, 4, 64, 5632, 32000, 1e4, 1e-5, False, None),
}
# Default seq and batch of the HF presets (the documented workloads).
HF_DEFAULT_SEQ, HF_DEFAULT_BATCH = 512, 1
EPS, THETA = 1e-5, 10000.0
LR, BETAS, ADAM_EPS, WD, CLIP = 3e-4, (0.9, 0.95), 1e-8, 0.1, 1.0


class Llama(torch.nn.Module):
    def __init__(self, dim, n_layers, n_heads, n_kv_heads, hidden, vocab, seq):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        hd, kvd = self.head_dim, n_kv_heads * (dim // n_heads)

        def mat(rows, cols):
            return torch.nn.Parameter(torch.randn(rows, cols) * 0.02)

        self.embedding = mat(vocab, dim)  # (V, D), also the classifier
        self.layers = torch.nn.ModuleList()
        for _ in range(n_layers):
            layer = torch.nn.Module()
            layer.rms_att = torch.nn.Parameter(torch.ones(dim))
            layer.wq, layer.wk, layer.wv = mat(n_heads * hd, dim), mat(kvd, dim), mat(kvd, dim)
            layer.wo = mat(dim, n_heads * hd)
            layer.rms_ffn = torch.nn.Parameter(torch.ones(dim))
            layer.w1, layer.w2, layer.w3 = mat(hidden, dim), mat(dim, hidden), mat(hidden, dim)
            self.layers.append(layer)
        self.rms_final = torch.nn.Parameter(torch.ones(dim))
        i = torch.arange(hd // 2, dtype=torch.float64)
        angle = torch.arange(seq, dtype=torch.float64)[:, None] * THETA ** (-2.0 * i / hd)
        self.register_buffer("cos", torch.cos(angle).float()[None, None])  # (1, 1, T, hd/2)
        self.register_buffer("sin", torch.sin(angle).float()[None, None])

    def rope(self, x):  # x (B, heads, T, hd), pairs (2i, 2i+1) rotated by theta_i * t
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack((a * self.cos - b * self.sin, a * self.sin + b * self.cos), -1).flatten(-2)

    @staticmethod
    def rmsnorm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w

    def forward(self, tokens, attention):
        bsz, seq = tokens.shape
        x = self.embedding[tokens]  # (B, T, D)
        rep = self.n_heads // self.n_kv_heads
        for l in self.layers:
            xn = self.rmsnorm(x, l.rms_att)
            q = (xn @ l.wq.T).view(bsz, seq, self.n_heads, self.head_dim).transpose(1, 2)
            k = (xn @ l.wk.T).view(bsz, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
            v = (xn @ l.wv.T).view(bsz, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
            q, k = self.rope(q), self.rope(k)
            if rep > 1:
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            if attention == "sdpa":
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                s = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
                s = s.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
                a = torch.softmax(s, dim=-1) @ v
            x = x + a.transpose(1, 2).reshape(bsz, seq, -1) @ l.wo.T
            x2n = self.rmsnorm(x, l.rms_ffn)
            x = x + (F.silu(x2n @ l.w1.T) * (x2n @ l.w3.T)) @ l.w2.T
        return self.rmsnorm(x, self.rms_final) @ self.embedding.T  # (B, T, V)


def hf_model(name, seq, attention):
    """transformers' own model class for the HF preset `name`, random init, fp32."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    kind, dim, n_layers, n_heads, n_kv, head_dim, hidden, vocab, theta, eps, tied, scaling = \
        HF_PRESETS[name]
    rope = {"rope_type": "default", "rope_theta": theta}
    if scaling:
        rope = dict(scaling, rope_theta=theta)
    common = dict(vocab_size=vocab, hidden_size=dim, intermediate_size=hidden,
                  num_hidden_layers=n_layers, num_attention_heads=n_heads,
                  num_key_value_heads=n_kv, head_dim=head_dim,
                  max_position_embeddings=max(seq, 2048), rms_norm_eps=eps,
                  rope_parameters=rope, tie_word_embeddings=tied, hidden_act="silu")
    if kind == "llama":
        config = LlamaConfig(attention_bias=False, mlp_bias=False, **common)
    elif kind == "qwen2":  # q/k/v biases are built in
        config = Qwen2Config(use_sliding_window=False, **common)
    else:  # qwen3: RMSNorm of q and k per head
        config = Qwen3Config(attention_bias=False, use_sliding_window=False, **common)
    impl = "sdpa" if attention == "sdpa" else "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=impl)
    shape = (dim, n_layers, n_heads, n_kv, hidden, vocab, head_dim)
    return model, shape


def check_hf_shape(model, name):
    """The parameter count of the built model against the preset's own count
    (src/model/config.rs's formula), so a config key the class ignores shows."""
    kind, dim, n_layers, n_heads, n_kv, head_dim, hidden, vocab, *_, tied, _ = HF_PRESETS[name]
    q, kv = n_heads * head_dim, n_kv * head_dim
    layer = 2 * dim + q * dim + 2 * kv * dim + dim * q + 3 * hidden * dim
    layer += (q + 2 * kv) if kind == "qwen2" else 0
    layer += 2 * head_dim if kind == "qwen3" else 0
    expected = n_layers * layer + vocab * dim * (1 if tied else 2) + dim
    got = sum(p.numel() for p in model.parameters())
    if got != expected:
        raise SystemExit(f"{name}: transformers built {got} parameters, the preset has {expected}")
    return got


def train_flops(dim, n_layers, n_heads, n_kv_heads, hidden, vocab, seq, batch, head_dim=None):
    hd = head_dim or dim // n_heads
    q_dim, kv_dim = n_heads * hd, n_kv_heads * hd
    per_layer = q_dim * dim + 2 * kv_dim * dim + dim * q_dim + 3 * hidden * dim
    forward = 2 * seq * (n_layers * per_layer + vocab * dim) + n_layers * 4 * seq * seq * q_dim
    return 3 * forward * batch


# --lora-targets names (anemone's) -> Hugging Face module names.
LORA_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def lora_flops(shape, seq, batch, rank, targets):
    """The LoRA step's FLOPs: 2 x forward plus 4 r (in + out) per adapted
    projection and token (anemone's `bench::train_step::lora_train_flops`)."""
    dim, n_layers, n_heads, n_kv_heads, hidden, vocab, head_dim = shape
    q, kv = n_heads * head_dim, n_kv_heads * head_dim
    widths = {"q": dim + q, "k": dim + kv, "v": dim + kv, "o": q + dim,
              "gate": dim + hidden, "up": dim + hidden, "down": hidden + dim}
    full = train_flops(dim, n_layers, n_heads, n_kv_heads, hidden, vocab, seq, batch, head_dim)
    adapters = n_layers * sum(widths[t] for t in targets)
    return 2 * full // 3 + 4 * rank * adapters * seq * batch


def make_lora(model, rank, alpha, targets):
    """`model` as a peft LoRA model: the base frozen, adapters on `targets`."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                        target_modules=[LORA_MODULES[t] for t in targets])
    return get_peft_model(model, config)


def cpu_model():
    """The first `model name` of /proc/cpuinfo (as anemone reports it), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return None


def gemm_peak(m, k, n, reps=30, warmup=5):
    a, b = torch.randn(m, k), torch.randn(k, n)
    out = torch.empty(m, n)
    for _ in range(warmup):
        torch.matmul(a, b, out=out)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        times.append(time.perf_counter() - t0)
    return 2.0 * m * k * n / statistics.median(times) / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="layer768", choices=sorted(PRESETS) + sorted(HF_PRESETS))
    ap.add_argument("--seq", type=int, help="sequence length T (default: per config)")
    ap.add_argument("--batch", type=int, help="sequences per step B (default: per config)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attention", choices=("sdpa", "manual"), default="sdpa",
                    help="F.scaled_dot_product_attention (causal kernel) or matmul/mask/softmax/matmul")
    ap.add_argument("--gemm", default="2048,768,512", help="M,K,N of the peak GEMM")
    ap.add_argument("--json", help="write the results to this file")
    ap.add_argument("--lora", action="store_true",
                    help="LoRA steps with peft (base frozen, AdamW on the adapters); HF presets only")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, help="default: 2 x the rank")
    ap.add_argument("--lora-targets", default=",".join(LORA_MODULES),
                    help="comma-separated, of " + ",".join(LORA_MODULES))
    args = ap.parse_args()
    targets = args.lora_targets.split(",")
    if args.lora and args.config not in HF_PRESETS:
        ap.error(f"--lora needs a Hugging Face preset ({', '.join(sorted(HF_PRESETS))})")
    if any(t not in LORA_MODULES for t in targets):
        ap.error(f"--lora-targets: {args.lora_targets} (names: {','.join(LORA_MODULES)})")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.config in HF_PRESETS:
        seq, batch = args.seq or HF_DEFAULT_SEQ, args.batch or HF_DEFAULT_BATCH
        model, shape = hf_model(args.config, seq, args.attention)
        n_params = check_hf_shape(model, args.config)
        dim, n_layers, n_heads, n_kv_heads, hidden, vocab, head_dim = shape
        implementation = "transformers"
        if args.lora:
            alpha = args.lora_alpha or 2.0 * args.lora_rank
            model = make_lora(model, args.lora_rank, alpha, targets)
            implementation = (f"transformers + peft, LoRA r={args.lora_rank} alpha={alpha:g} "
                              f"on {','.join(targets)}")

        def forward(tokens):
            return model(input_ids=tokens, use_cache=False).logits
    else:
        dim, n_layers, n_heads, n_kv_heads, hidden, vocab, seq0, batch0 = PRESETS[args.config]
        head_dim = dim // n_heads
        seq, batch = args.seq or seq0, args.batch or batch0
        model = Llama(dim, n_layers, n_heads, n_kv_heads, hidden, vocab, seq)
        n_params = sum(p.numel() for p in model.parameters())
        implementation = "llama2.c block (this script)"

        def forward(tokens):
            return model(tokens, args.attention)

    model.train()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trained if p.dim() == 2]
    no_decay = [p for n, p in trained if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=BETAS, eps=ADAM_EPS)
    gen = torch.Generator().manual_seed(1)
    data = torch.randint(0, vocab, (args.warmup + args.steps, batch, seq + 1), generator=gen)

    def step(i):
        opt.zero_grad(set_to_none=True)
        logits = forward(data[i, :, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab), data[i, :, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in trained], CLIP)
        opt.step()
        return loss.item()

    for i in range(args.warmup):
        step(i)
    times, losses = [], []
    for i in range(args.warmup, args.warmup + args.steps):
        t0 = time.perf_counter()
        losses.append(step(i))
        times.append((time.perf_counter() - t0) * 1e3)

    m, k, n = (int(v) for v in args.gemm.split(","))
    peak = gemm_peak(m, k, n)
    if args.lora:
        shape = (dim, n_layers, n_heads, n_kv_heads, hidden, vocab, head_dim)
        flops = lora_flops(shape, seq, batch, args.lora_rank, targets)
        convention = "LoRA = 2 x forward + the adapters' gradient products"
    else:
        flops = train_flops(dim, n_layers, n_heads, n_kv_heads, hidden, vocab, seq, batch, head_dim)
        convention = "training = 3 x forward"
    median = statistics.median(times)
    achieved = flops / (median * 1e6)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    result = {
        "framework": f"pytorch {torch.__version__}",
        "config": args.config, "implementation": implementation, "parameters": n_params,
        "lora": {"rank": args.lora_rank, "targets": targets} if args.lora else None,
        "seq": seq, "batch": batch, "threads": args.threads,
        "attention": args.attention, "steps": args.steps, "warmup": args.warmup,
        "median_ms": median, "min_ms": min(times), "max_ms": max(times),
        "step_ms": times,
        "tokens_per_s": batch * seq / (median / 1e3),
        "train_flops_per_step": flops, "gflops": achieved,
        "gemm_shape": [m, k, n], "gemm_peak_gflops": peak, "fraction_of_gemm_peak": achieved / peak,
        "peak_rss_mb": rss_mb, "final_loss": losses[-1],
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "cpu": cpu_model(),
    }
    print(f"pytorch {torch.__version__} train-step {args.config}{' (lora)' if args.lora else ''}: "
          f"seq {seq} batch {batch}, "
          f"{args.threads} threads, {args.steps} steps after {args.warmup} warmup ({args.attention} attention)")
    print(f"  model        {implementation}, {n_params / 1e6:.1f} M parameters")
    print(f"  machine      {result['cpu'] or result['machine']}")
    print(f"  ms/step      {median:.1f} median (min {min(times):.1f}, max {max(times):.1f})")
    print(f"  tokens/s     {result['tokens_per_s']:.0f}")
    print(f"  GFLOP/s      {achieved:.1f} ({flops / 1e9:.2f} GFLOP per step, {convention})")
    print(f"  GEMM peak    {peak:.1f} GFLOP/s ({m}x{k}x{n} fp32) -> {100 * achieved / peak:.1f} % of peak")
    print(f"  peak RSS     {rss_mb:.0f} MB")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
