#!/usr/bin/env python3
"""Tiny Hugging Face checkpoints and float64 PyTorch references for anemone's
Hugging Face tests (tests/it/hf_*.rs).

Writes into tests/fixtures/hf/:

  tokenizer/            a byte-level BPE `tokenizer.json` (trained here with the
                        `tokenizers` package on ../shared/data/tinyshakespeare.txt)
                        and `tokenizer_config.json`
  shakespeare-ids.json  that tokenizer's ids: every line of tinyshakespeare.txt
                        (full ids of the first lines, FNV-1a-64 digests of blocks
                        of lines and of the whole file)
  chat/                 two chat templates (ChatML; one with startswith, strip,
                        split, loop controls, namespace, raise_exception) and
                        the strings `apply_chat_template` renders for a set of
                        conversations (`cases.json`)
  <model>/              one directory per architecture, as `save_pretrained`
                        writes it (config.json, model.safetensors,
                        generation_config.json, tokenizer files), and
                        `reference.safetensors`: input_ids/targets (int32, B x T),
                        logits (f32, from float64), loss (f64), `grad.<name>` for
                        every parameter (f32, from float64), losses (f64, the loss
                        before each of 5 AdamW steps), greedy prompt and ids
                        (`transformers` generate(do_sample=False)) and eval
                        tokens with their mean loss per window.

Models (2 layers, hidden 32, vocabulary from the tokenizer):
  llama        LlamaForCausalLM, transformers 5.x config (rope_parameters,
               dtype), tied classifier, GQA 4/2
  llama-v4     LlamaForCausalLM with a 4.x-style config (rope_theta,
               rope_scaling linear x2, torch_dtype), untied classifier
  llama3-bf16  LlamaForCausalLM, llama3 RoPE scaling, weights in bf16, head_dim 16
  qwen2        Qwen2ForCausalLM (q/k/v biases), vocabulary padded past the tokenizer's
  qwen3        Qwen3ForCausalLM (QK-norm), head_dim 16 != hidden / heads
  mistral      MistralForCausalLM, no sliding window, chat template in chat_template.jinja
  llama-sharded  llama's weights in several shards with model.safetensors.index.json
                 (config, generation config and tokenizer.json, no references)

Every reference is computed in float64 from exactly the stored weights (bf16
weights are upcast). AdamW: lr 1e-3, betas (0.9, 0.95), eps 1e-8, weight decay
0.1 on parameters with two or more dimensions (none on norms and biases),
constant LR, no clipping, the same batch every step.

Run: /path/to/venv/bin/python scripts/gen_hf_fixtures.py
(needs torch, transformers, tokenizers, safetensors, numpy; not used by CI)
"""
import json
import math
import os
import shutil

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, GenerationConfig, LlamaConfig, MistralConfig,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen3Config)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(ROOT, "tests", "fixtures", "hf")
SHAKESPEARE = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")

B, T = 2, 16
LR, BETAS, ADAM_EPS, WD = 1e-3, (0.9, 0.95), 1e-8, 0.1
ADAM_STEPS = 5
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHATML = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Written for these tests: the Python-compatible string methods and loop
# controls that real templates (Qwen3's, Llama 3's) use.
REASONING = """{%- set ns = namespace(last_user=-1) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}
{%- endfor %}
{%- if messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content.strip() + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' %}
        {%- if not loop.first %}{{- raise_exception('system message must come first') }}{%- endif %}
        {%- continue %}
    {%- endif %}
    {%- if message.role not in ['user', 'assistant'] %}
        {{- raise_exception('unsupported role: ' + message.role) }}
    {%- endif %}
    {%- set content = message.content %}
    {%- if message.role == 'assistant' and '</think>' in content %}
        {%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}
        {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- if loop.index0 > ns.last_user %}
            {%- set content = '<think>\\n' + reasoning + '\\n</think>\\n\\n' + content %}
        {%- endif %}
    {%- endif %}
    {%- if message.role == 'user' and content.startswith('/quiet') %}
        {%- set content = content[6:].lstrip() %}
    {%- endif %}
    {{- '<|im_start|>' + message.role + '\\n' + content.rstrip() + '<|im_end|>\\n' }}
    {%- if message.role == 'user' and content.endswith('STOP') %}{%- break %}{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}"""

CONVERSATIONS = [
    ("one user turn", [{"role": "user", "content": "Hello there"}]),
    ("system and multi-turn", [
        {"role": "system", "content": "  You speak like a sailor.\n"},
        {"role": "user", "content": "Where is the ship?"},
        {"role": "assistant", "content": "In the harbour, matey."},
        {"role": "user", "content": "/quiet   And the crew?  "},
    ]),
    ("reasoning kept for the last turn only", [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "<think>\nagain\n</think>\n\n6"},
    ]),
    ("break after STOP", [
        {"role": "user", "content": "Please STOP"},
        {"role": "assistant", "content": "never shown"},
    ]),
    ("unicode", [{"role": "user", "content": "naïve café — ☕ 日本"}]),
]
ERROR_CONVERSATIONS = [
    ("tool role", [{"role": "user", "content": "hi"}, {"role": "tool", "content": "{}"}]),
    ("late system", [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}]),
]


def fnv1a64(ints):
    h = 0xcbf29ce484222325
    for v in ints:
        for byte in int(v).to_bytes(4, "little"):
            h ^= byte
            h = (h * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h


def make_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320 + len(SPECIALS), special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train([SHAKESPEARE], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", bos_token=None)
    fast.chat_template = CHATML
    return fast


def shakespeare_ids(tok):
    with open(SHAKESPEARE, encoding="utf-8") as f:
        lines = f.read().split("\n")
    all_ids = [tok.encode(line, add_special_tokens=False) for line in lines]
    block = 1000
    stream = lambda ids_list: [x for ids in ids_list for x in [len(ids)] + ids]
    return dict(
        script="scripts/gen_hf_fixtures.py",
        lines=len(lines),
        tokens=sum(len(i) for i in all_ids),
        first_lines=all_ids[:200],
        block_lines=block,
        block_digests=[format(fnv1a64(stream(all_ids[i:i + block])), "016x")
                       for i in range(0, len(lines), block)],
        digest=format(fnv1a64(stream(all_ids)), "016x"),
        digest_rule="FNV-1a 64 over u32 little-endian words: per line its token count, then its ids",
    )


def chat_cases(tok):
    cases = []
    for template_name, template in (("chatml", CHATML), ("reasoning", REASONING)):
        for name, conv in CONVERSATIONS:
            for gen in (False, True):
                extra = {}
                for thinking in ([None, False] if template_name == "reasoning" and gen else [None]):
                    extra = {} if thinking is None else {"enable_thinking": thinking}
                    text = tok.apply_chat_template(conv, chat_template=template, tokenize=False,
                                                   add_generation_prompt=gen, **extra)
                    cases.append(dict(template=template_name, name=name, messages=conv,
                                      add_generation_prompt=gen, extra=extra, expected=text))
        for name, conv in ERROR_CONVERSATIONS:
            case = dict(template=template_name, name=name, messages=conv, add_generation_prompt=False,
                        extra={})
            try:
                case["expected"] = tok.apply_chat_template(conv, chat_template=template, tokenize=False)
            except Exception as e:  # transformers raises TemplateError
                case["error"] = str(e)
            cases.append(case)
    return cases


def init_weights(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(0.25 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.9 / math.sqrt(p.shape[1])))


def configs(vocab):
    common = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64, max_position_embeddings=64,
                  rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None)
    return {
        "llama": LlamaConfig(**common, vocab_size=vocab, num_attention_heads=4, num_key_value_heads=2,
                             tie_word_embeddings=True),
        "llama-v4": LlamaConfig(**common, vocab_size=vocab, num_attention_heads=4, num_key_value_heads=4,
                                tie_word_embeddings=False,
                                rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}),
        "llama3-bf16": LlamaConfig(**common, vocab_size=vocab, num_attention_heads=2, num_key_value_heads=1,
                                   head_dim=16, tie_word_embeddings=True,
                                   rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 32,
                                                    "rope_theta": 10000.0}),
        "qwen2": Qwen2Config(**common, vocab_size=vocab + 13, num_attention_heads=4, num_key_value_heads=2,
                             tie_word_embeddings=True, use_sliding_window=False,
                             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        "qwen3": Qwen3Config(**common, vocab_size=vocab, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=16, tie_word_embeddings=True, use_sliding_window=False,
                             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        "mistral": MistralConfig(**common, vocab_size=vocab, num_attention_heads=4, num_key_value_heads=1,
                                 tie_word_embeddings=False, sliding_window=None,
                                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    }


def to_v4_config(path):
    """Rewrite config.json the way transformers 4.x wrote it."""
    with open(path) as f:
        cfg = json.load(f)
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type")
    cfg["rope_scaling"] = None if rope_type == "default" else dict(type=rope_type, **rope)
    cfg["torch_dtype"] = cfg.pop("dtype")
    cfg["transformers_version"] = "4.46.3"
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def loss_of(model, inputs, targets):
    logits = model(input_ids=inputs).logits
    return logits, F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def greedy(model, prompt, steps):
    """Greedy ids and the smallest top-1/top-2 logit margin along the way."""
    ids = prompt.clone()
    margin = float("inf")
    for _ in range(steps):
        logits = model(input_ids=ids).logits[0, -1]
        top = torch.topk(logits, 2).values
        margin = min(margin, (top[0] - top[1]).item())
        ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    return ids[0, prompt.shape[1]:].tolist(), margin


def build_model(name, cfg, tok, seed):
    d = os.path.join(OUT, name)
    shutil.rmtree(d, ignore_errors=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    init_weights(model, seed)
    if name == "llama3-bf16":
        model = model.to(torch.bfloat16)
    vocab = cfg.vocab_size
    g = torch.Generator().manual_seed(seed + 1)
    n_text = len(tok) - len(SPECIALS)  # ordinary tokens only in the batches
    tokens = torch.randint(0, n_text, (B, T + 1), generator=g)
    prompts = [torch.randint(0, n_text, (1, 5), generator=g) for _ in range(12)]
    eval_tokens = torch.randint(0, n_text, (3 * T + 1,), generator=g)

    ref = model.to(torch.float64)
    ref.eval()
    # Greedy reference; then pick a token that first appears at step 9 as an
    # extra EOS id, so that stopping is exercised.
    # The prompt whose greedy run has the widest top-1/top-2 margins, so that
    # float32 and float64 agree on every argmax.
    gen_steps = 20
    prompt, ids, margin = max(((p,) + greedy(ref, p, gen_steps) for p in prompts), key=lambda r: r[2])
    assert margin > 0.02, f"{name}: greedy margin {margin} too small"
    eos_extra = next((t for i, t in enumerate(ids) if i >= 6 and t not in ids[:i]), None)
    eos_ids = [tok.convert_tokens_to_ids("<|im_end|>")] + ([eos_extra] if eos_extra is not None else [])
    gen_cfg = GenerationConfig(eos_token_id=eos_ids, do_sample=False, pad_token_id=eos_ids[0])
    out = ref.generate(prompt, generation_config=gen_cfg, max_new_tokens=gen_steps)
    hf_ids = out[0, prompt.shape[1]:].tolist()
    assert hf_ids == ids[:len(hf_ids)], (hf_ids, ids)

    # Save as the source dtype, with the generation config and the tokenizer.
    model = ref.to(torch.bfloat16 if name == "llama3-bf16" else torch.float32)
    model.generation_config = gen_cfg
    model.save_pretrained(d)
    tok_copy = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="<|im_end|>",
                                       pad_token="<|endoftext|>")
    tok_copy.chat_template = REASONING if name == "qwen3" else CHATML
    tok_copy.save_pretrained(d)
    tcfg_path = os.path.join(d, "tokenizer_config.json")
    jinja_path = os.path.join(d, "chat_template.jinja")
    with open(tcfg_path) as f:
        tcfg = json.load(f)
    if name == "mistral":
        # The 5.x layout: the template in chat_template.jinja.
        with open(jinja_path, "w") as f:
            f.write(tok_copy.chat_template)
        tcfg.pop("chat_template", None)
    else:
        # The 4.x layout: the template inside tokenizer_config.json.
        tcfg["chat_template"] = tok_copy.chat_template
        if os.path.exists(jinja_path):
            os.remove(jinja_path)
    with open(tcfg_path, "w") as f:
        json.dump(tcfg, f, indent=2)
    if name == "llama-v4":
        to_v4_config(os.path.join(d, "config.json"))
    if name == "llama":
        # The same weights in shards with a model.safetensors.index.json.
        sharded = os.path.join(OUT, "llama-sharded")
        shutil.rmtree(sharded, ignore_errors=True)
        model.save_pretrained(sharded, max_shard_size="40KB")
        shutil.copy(os.path.join(d, "tokenizer.json"), sharded)

    # float64 references from exactly the stored weights.
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64)
    ref.eval()
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits, loss = loss_of(ref, inputs, targets)
    loss.backward()
    tensors = {
        "input_ids": inputs.numpy().astype(np.int32),
        "targets": targets.numpy().astype(np.int32),
        "logits": logits.detach().numpy().astype(np.float32),
        "loss": np.array([loss.item()], dtype=np.float64),
        "prompt": prompt[0].numpy().astype(np.int32),
        "greedy": np.array(hf_ids, dtype=np.int32),
    }
    for pname, p in ref.named_parameters():
        tensors["grad." + pname] = p.grad.numpy().astype(np.float32)
    # The eval windows: consecutive windows of T from the start.
    with torch.no_grad():
        window_losses = []
        for w in range(3):
            x = eval_tokens[w * T: w * T + T + 1]
            _, l = loss_of(ref, x[None, :-1], x[None, 1:])
            window_losses.append(l.item())
    tensors["eval_tokens"] = eval_tokens.numpy().astype(np.int32)
    tensors["eval_window_losses"] = np.array(window_losses, dtype=np.float64)
    # AdamW steps on the same batch.
    ref.zero_grad()
    params = [p for p in ref.parameters()]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=BETAS, eps=ADAM_EPS)
    losses = []
    for _ in range(ADAM_STEPS):
        opt.zero_grad()
        _, l = loss_of(ref, inputs, targets)
        losses.append(l.item())
        l.backward()
        opt.step()
    tensors["losses"] = np.array(losses, dtype=np.float64)
    save_file(tensors, os.path.join(d, "reference.safetensors"),
              metadata={"script": "scripts/gen_hf_fixtures.py", "lr": str(LR), "beta1": str(BETAS[0]),
                        "beta2": str(BETAS[1]), "eps": str(ADAM_EPS), "weight_decay": str(WD),
                        "greedy_min_margin": f"{margin:.6f}", "eval_seq": str(T)})
    print(f"{name}: vocab {vocab} loss {loss.item():.6f} losses {[round(x, 5) for x in losses]} "
          f"greedy {len(hf_ids)} ids (margin {margin:.4f}, eos {eos_ids})")


def main():
    torch.manual_seed(0)
    os.makedirs(OUT, exist_ok=True)
    tok = make_tokenizer()
    tdir = os.path.join(OUT, "tokenizer")
    shutil.rmtree(tdir, ignore_errors=True)
    tok.save_pretrained(tdir)
    with open(os.path.join(OUT, "shakespeare-ids.json"), "w") as f:
        json.dump(shakespeare_ids(tok), f)
    cdir = os.path.join(OUT, "chat")
    os.makedirs(cdir, exist_ok=True)
    with open(os.path.join(cdir, "chatml.jinja"), "w") as f:
        f.write(CHATML)
    with open(os.path.join(cdir, "reasoning.jinja"), "w") as f:
        f.write(REASONING)
    with open(os.path.join(cdir, "cases.json"), "w") as f:
        json.dump(dict(script="scripts/gen_hf_fixtures.py", cases=chat_cases(tok)), f, indent=1,
                  ensure_ascii=False)
    for i, (name, cfg) in enumerate(configs(len(tok)).items()):
        build_model(name, cfg, tok, seed=100 + i)
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(OUT) for f in fs)
    print(f"tests/fixtures/hf: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
