#!/usr/bin/env python3
"""LoRA references for anemone's LoRA tests (tests/it/lora.rs), made with
PyTorch + `peft` on the tiny Hugging Face checkpoints of
scripts/gen_hf_fixtures.py (tests/fixtures/hf/<model>, read, never written).

Writes into tests/fixtures/lora/:

  chat.jsonl        three `{"messages": [...]}` rows: the chat batch
  mixed.jsonl       a `{"text"}` row and a `{"prompt", "completion"}` row
  <model>/          for llama, qwen2 and qwen3:
    adapter/        what `PeftModel.save_pretrained` writes for the adapters the
                    references start from (adapter_config.json,
                    adapter_model.safetensors): rank 4, alpha 8, dropout 0, all
                    seven targets (q,k,v,o,gate,up,down) of every layer; A and B
                    both random (B nonzero, so that A has a gradient);
                    the model card left out, base_model_name_or_path made
                    relative to the repository
    reference.safetensors
                    input_ids, targets (int32, B x T), loss_mask (f32, B x T:
                    1 where the target counts), loss (f64), grad.<PEFT tensor
                    name> for every lora_A/lora_B (f32, from float64), losses
                    (f64, the loss before each of 5 AdamW steps); for llama
                    also the ids and loss masks of mixed.jsonl's rows rendered
                    with the chat template (`mixed.<row>.ids`/`.mask`) and
                    without one (`plain.<row>.ids`/`.mask`)
  qwen2-partial/    adapters on q_proj and v_proj of layer 1 only (rank 2,
                    alpha 4, `layers_to_transform=[1]`) and the chat batch's
                    masked loss with them (`reference.safetensors`: loss)

The batch (anemone's `data::sft` rules, written again here independently):
  - a row's tokens: a conversation rendered with the model's chat template
    (`apply_chat_template(tokenize=False)`), tokenized without special tokens;
    a text row tokenized with them, EOS appended unless last; a prompt and
    completion as a user and an assistant message (with a template) or as
    their concatenated text, EOS appended (without one);
  - the loss mask (mask_prompt): only the tokens of assistant turns count.
    A turn spans from the tokens of the conversation before it rendered with
    the generation prompt to the tokens of the conversation up to and
    including it; both must be token prefixes of the whole conversation's
    tokens (else the turn is left out of the loss). Here by token prefixes;
    anemone finds the same spans by text prefixes and token offsets;
  - a row of L tokens is truncated to T + 1 (T = 60, within the fixtures' 64
    positions; ChatML's default system prompt makes two rows longer, Qwen3's
    template none); inputs ids[:-1], targets ids[1:],
    right-padded to T with <|endoftext|> (id 0), padded targets not counted;
  - the loss is the mean cross-entropy over the counted targets of the whole
    batch: sum(mask * ce) / sum(mask).

Every reference is float64 from exactly the stored weights (base and adapters
are float32 on disk). AdamW: lr 1e-3, betas (0.9, 0.95), eps 1e-8, weight
decay 0.1 on every adapter tensor (all are matrices), constant LR, no clipping,
the same batch every step, only lora_A/lora_B trained.

Run: /path/to/venv/bin/python scripts/gen_lora_fixtures.py
(needs torch, transformers, peft, tokenizers, safetensors, numpy; not used by CI)
"""
import json
import math
import os
import shutil

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.numpy import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HF = os.path.join(ROOT, "tests", "fixtures", "hf")
OUT = os.path.join(ROOT, "tests", "fixtures", "lora")

T = 60
PAD = 0
RANK, ALPHA = 4, 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR, BETAS, ADAM_EPS, WD = 1e-3, (0.9, 0.95), 1e-8, 0.1
ADAM_STEPS = 5
MODELS = ["llama", "qwen2", "qwen3"]

CHAT = [
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}],
    # Truncated at T + 1 tokens with ChatML's default system prompt.
    [{"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3+3?"},
     {"role": "assistant", "content": "It is 6."}],
    # With the reasoning template (qwen3) the first answer's thoughts are
    # dropped from the whole conversation but kept when it is rendered last:
    # that turn is no prefix, so it is left out of the loss there (the
    # last turn still counts).
    [{"role": "system", "content": "Think."},
     {"role": "user", "content": "1+1?"},
     {"role": "assistant", "content": "<think>\nadd\n</think>\n\n2"},
     {"role": "user", "content": "ok"},
     {"role": "assistant", "content": "yes"}],
]
MIXED = [
    {"text": "To be, or not to be"},
    {"prompt": "Who is there?", "completion": " Nay, answer me."},
]


def encode(tok, text, special):
    return tok(text, add_special_tokens=special)["input_ids"]


def render(tok, messages, gen=False):
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def chat_example(tok, messages, mask_prompt=True):
    """Token ids and a 0/1 loss flag per token (flag 0 of token 0 never used)."""
    ids = encode(tok, render(tok, messages), False)
    if not mask_prompt:
        return ids, [0] + [1] * (len(ids) - 1)
    mask = [0] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i == 0:
            continue
        start = encode(tok, render(tok, messages[:i], gen=True), False)
        end = encode(tok, render(tok, messages[:i + 1]), False)
        if ids[:len(end)] != end or end[:len(start)] != start:
            print(f"  turn {i} is not a prefix of the conversation: left out of the loss")
            continue
        for k in range(len(start), len(end)):
            mask[k] = 1
    return ids, mask


def with_eos(tok, ids, mask):
    if tok.eos_token_id is not None and (not ids or ids[-1] != tok.eos_token_id):
        return ids + [tok.eos_token_id], mask + [1]
    return ids, mask


def mixed_example(tok, row, template):
    if "text" in row:
        ids = encode(tok, row["text"], True)
        return with_eos(tok, ids, [0] + [1] * (len(ids) - 1))
    if template:
        return chat_example(tok, [{"role": "user", "content": row["prompt"]},
                                  {"role": "assistant", "content": row["completion"]}])
    ids = encode(tok, row["prompt"] + row["completion"], True)
    start = len(encode(tok, row["prompt"], True))
    assert ids[:start] == encode(tok, row["prompt"], True)
    return with_eos(tok, ids, [0] * start + [1] * (len(ids) - start))


def batch(examples):
    inputs = np.full((len(examples), T), PAD, dtype=np.int64)
    targets = np.full((len(examples), T), PAD, dtype=np.int64)
    weights = np.zeros((len(examples), T), dtype=np.float64)
    truncated = 0
    for b, (ids, mask) in enumerate(examples):
        if len(ids) > T + 1:
            truncated += 1
        ids, mask = ids[:T + 1], mask[:T + 1]
        n = len(ids) - 1
        inputs[b, :n] = ids[:-1]
        targets[b, :n] = ids[1:]
        weights[b, :n] = mask[1:]
    return torch.tensor(inputs), torch.tensor(targets), torch.tensor(weights), truncated


def masked_loss(model, inputs, targets, weights):
    logits = model(input_ids=inputs).logits
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (ce * weights.reshape(-1)).sum() / weights.sum()


def randomize_adapters(model, seed):
    """A ~ N(0, 1/in), B ~ N(0, 0.2^2/r): both nonzero, so both have gradients."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 / math.sqrt(p.shape[1]))


def saved_name(param_name):
    """`...q_proj.lora_A.default.weight` -> `...q_proj.lora_A.weight`, as save_pretrained names it."""
    return param_name.replace(".default.", ".")


def make_adapters(name, out_dir, lora_config, seed):
    base = AutoModelForCausalLM.from_pretrained(os.path.join(HF, name), dtype=torch.float32)
    model = get_peft_model(base, lora_config)
    randomize_adapters(model, seed)
    shutil.rmtree(out_dir, ignore_errors=True)
    model.save_pretrained(out_dir)
    # Kept out of the fixture: the model card, and this checkout's absolute path.
    os.remove(os.path.join(out_dir, "README.md"))
    config_path = os.path.join(out_dir, "adapter_config.json")
    with open(config_path) as f:
        saved = json.load(f)
    saved["base_model_name_or_path"] = f"tests/fixtures/hf/{name}"
    saved["target_modules"] = sorted(saved["target_modules"])  # a set: any order
    with open(config_path, "w") as f:
        json.dump(saved, f, indent=2, sort_keys=True)


def load_float64(name, adapter_dir):
    base = AutoModelForCausalLM.from_pretrained(os.path.join(HF, name), dtype=torch.float64)
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True).to(torch.float64)
    model.train()  # dropout is 0: train and eval agree
    lora = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n and p.dtype == torch.float64 for n, p in lora), lora
    return model, lora


def build(name, seed):
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(os.path.join(HF, name))
    adapter_dir = os.path.join(d, "adapter")
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS,
                        bias="none", task_type="CAUSAL_LM")
    make_adapters(name, adapter_dir, config, seed)

    examples = [chat_example(tok, m) for m in CHAT]
    inputs, targets, weights, truncated = batch(examples)
    # The ChatML fixtures' default system prompt makes rows 2 and 3 longer than a window.
    assert truncated >= 1 or name == "qwen3", f"{name}: no row is truncated; lengths {[len(e[0]) for e in examples]}"
    model, lora = load_float64(name, adapter_dir)
    loss = masked_loss(model, inputs, targets, weights)
    loss.backward()
    tensors = {
        "input_ids": inputs.numpy().astype(np.int32),
        "targets": targets.numpy().astype(np.int32),
        "loss_mask": weights.numpy().astype(np.float32),
        "loss": np.array([loss.item()], dtype=np.float64),
    }
    for pname, p in lora:
        tensors["grad." + saved_name(pname)] = p.grad.numpy().astype(np.float32)
    opt = torch.optim.AdamW([p for _, p in lora], lr=LR, betas=BETAS, eps=ADAM_EPS, weight_decay=WD)
    losses = []
    for _ in range(ADAM_STEPS):
        opt.zero_grad()
        step_loss = masked_loss(model, inputs, targets, weights)
        losses.append(step_loss.item())
        step_loss.backward()
        opt.step()
    tensors["losses"] = np.array(losses, dtype=np.float64)
    if name == "llama":
        for i, row in enumerate(MIXED):
            for prefix, template in (("mixed", True), ("plain", False)):
                ids, mask = mixed_example(tok, row, template)
                tensors[f"{prefix}.{i}.ids"] = np.array(ids, dtype=np.int32)
                tensors[f"{prefix}.{i}.mask"] = np.array(mask, dtype=np.float32)
    save_file(tensors, os.path.join(d, "reference.safetensors"),
              metadata={"script": "scripts/gen_lora_fixtures.py", "lr": str(LR), "beta1": str(BETAS[0]),
                        "beta2": str(BETAS[1]), "eps": str(ADAM_EPS), "weight_decay": str(WD),
                        "seq": str(T), "truncated": str(truncated)})
    print(f"{name}: lengths {[len(e[0]) for e in examples]} counted {int(weights.sum())} "
          f"loss {loss.item():.6f} losses {[round(x, 5) for x in losses]}")


def build_partial(seed):
    name = "qwen2"
    d = os.path.join(OUT, "qwen2-partial")
    os.makedirs(d, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(os.path.join(HF, name))
    adapter_dir = os.path.join(d, "adapter")
    config = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                        layers_to_transform=[1], bias="none", task_type="CAUSAL_LM")
    make_adapters(name, adapter_dir, config, seed)
    inputs, targets, weights, _ = batch([chat_example(tok, m) for m in CHAT])
    model, lora = load_float64(name, adapter_dir)
    assert len(lora) == 4, [n for n, _ in lora]
    with torch.no_grad():
        loss = masked_loss(model, inputs, targets, weights)
    save_file({"loss": np.array([loss.item()], dtype=np.float64)}, os.path.join(d, "reference.safetensors"),
              metadata={"script": "scripts/gen_lora_fixtures.py", "seq": str(T)})
    print(f"qwen2-partial: loss {loss.item():.6f}")


def main():
    torch.manual_seed(0)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "chat.jsonl"), "w") as f:
        for messages in CHAT:
            f.write(json.dumps({"messages": messages}) + "\n")
    with open(os.path.join(OUT, "mixed.jsonl"), "w") as f:
        for row in MIXED:
            f.write(json.dumps(row) + "\n")
    for i, name in enumerate(MODELS):
        build(name, seed=300 + i)
    build_partial(seed=400)
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(OUT) for f in fs)
    print(f"tests/fixtures/lora: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
