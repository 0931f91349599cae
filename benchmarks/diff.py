"""Diff costs on SmolLM2 (JSON): crosscoder training against lmscope's own SAE trainer at the same width, and an
organism's fine-tune step against the bare forward + backward pass it cannot avoid.

    .venv/bin/python benchmarks/diff.py [--layer 15] [--expansion 8] [--tokens 65536] [--steps 8]

1. Crosscoder vs SAE: paired activations [a_base | a_other] (2 x 576 wide) against single activations (576 wide),
   each trained by the same Trainer for the same tokens, width 8 x 576 latents, k 32, batch 1024, from memory (the
   paired activations of SmolLM2 and a copy with small random weight noise: the cost does not depend on the pair).
   A crosscoder reads and writes twice the width, so about 2x an SAE is its floor.
2. Fine-tune: `organisms.finetune` steps (AdamW, batch 8, organism-length examples) against the bare
   forward + loss + backward + AdamW step of the same batches written out by hand with no lmscope code.

Writes benchmarks/results/diff.json.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import lmscope
from lmscope.core.atomic import atomic_write_json
from lmscope.dictionaries.base import DictConfig
from lmscope.diff.crosscoder import CrosscoderConfig, paired_activations, train_crosscoders
from lmscope.diff.pair import corpus_contexts
from lmscope.model.adapter import Model
from lmscope.model.loading import load_model
from lmscope.organisms.finetune import FinetuneConfig, _collate, finetune, tokenize
from lmscope.organisms.prompts import neutral_prompts
from lmscope.organisms.recipes import Example
from lmscope.training.trainer import RunSpec, TensorSource, TrainConfig, Trainer

ROOT = Path(__file__).resolve().parent


def crosscoder_vs_sae(base: Model, layer: int, expansion: int, tokens: int) -> dict[str, Any]:
    other = Model(copy.deepcopy(base.hf), base.tokenizer, spec="noisy-copy")
    with torch.no_grad():
        for p in other.hf.parameters():
            p.add_(torch.randn_like(p) * 1e-3 * p.std())
    ctx = corpus_contexts(base, "stdlib", tokens // 63 + 1, 64, mode="pack")
    hook = f"blocks.{layer}.resid_post"
    pairs, _ = paired_activations(base, other, hook, ctx)
    pairs = pairs[:tokens]
    d = base.d_model
    out: dict[str, Any] = {}
    cfg = CrosscoderConfig(layer=layer, expansion=expansion, k=32, epochs=2, batch_size=1024)
    t = time.perf_counter()
    train_crosscoders(pairs, cfg, hook, None)
    out["crosscoder_tok_s"] = 2 * len(pairs) / (time.perf_counter() - t)
    sae = RunSpec(DictConfig(arch="batchtopk", d_in=d, d_sae=expansion * d, k=32, hook=hook), name="sae")
    src = TensorSource(pairs[:, :d].contiguous(), batch_size=1024, epochs=2)
    t = time.perf_counter()
    Trainer([sae], TrainConfig(total_tokens=len(src) * 1024, warmup_steps=10, log_every=1000)).fit(src)
    out["sae_tok_s"] = 2 * len(pairs) / (time.perf_counter() - t)
    out["crosscoder_cost_vs_sae"] = out["sae_tok_s"] / out["crosscoder_tok_s"]
    out.update(pairs=len(pairs), width=expansion * d, hook=hook)
    return out


def finetune_vs_bare(base: Model, steps: int) -> dict[str, Any]:
    prompts, _ = neutral_prompts()
    examples = [Example(p, "A short answer of about twenty tokens, like the base model's own answers are.")
                for p in prompts]  # fmt: skip
    cfg = FinetuneConfig(steps=steps, batch_size=8, lr=1e-4, warmup_steps=1, checkpoints=0)
    m = Model(copy.deepcopy(base.hf), base.tokenizer, spec="ft")
    with tempfile.TemporaryDirectory() as tmp:
        run = finetune(m, examples, cfg, Path(tmp))
    rows = tokenize(base, examples, cfg.max_len)
    hf = copy.deepcopy(base.hf)
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.0)
    pad = base.tokenizer.pad_token_id
    n_tok = 0
    t = time.perf_counter()
    for s in range(steps):
        ids, mask, labels = _collate(rows[s * 8 : (s + 1) * 8], pad)
        logits = hf(input_ids=ids, attention_mask=mask).logits
        flat = logits[:, :-1].reshape(-1, logits.shape[-1])
        loss = torch.nn.functional.cross_entropy(flat, labels[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        n_tok += int(mask.sum())
    bare = n_tok / (time.perf_counter() - t)
    return {"finetune_tok_s": run["tokens_per_s"], "bare_tok_s": bare, "ratio": run["tokens_per_s"] / bare,
            "steps": steps}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=65_536)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "results" / "diff.json"))
    a = ap.parse_args()
    base = load_model("smollm2-135m", device="cpu", dtype="float32")
    result = {
        "command": " ".join([".venv/bin/python", "benchmarks/diff.py", *sys.argv[1:]]),
        "crosscoder": crosscoder_vs_sae(base, a.layer, a.expansion, a.tokens),
        "finetune": finetune_vs_bare(base, a.steps),
        "machine": platform.platform(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lmscope": lmscope.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(a.out), result)
    print(result)


if __name__ == "__main__":
    main()
