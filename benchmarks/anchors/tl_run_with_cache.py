"""TransformerLens `run_with_cache` throughput on given token batches. Runs INSIDE benchmarks/.venv-anchors.

    benchmarks/.venv-anchors/bin/python benchmarks/anchors/tl_run_with_cache.py \
        --model-dir ~/.cache/lmscope/gguf/<sha> --tokens tokens.safetensors --layer 6 [--batch-size 32] [--rounds 3]

Loads the HF model directory offline into a `HookedTransformer`, then times one pass over every batch of
`tokens` (a safetensors file with an integer tensor "tokens" [n_ctx, context]):
`run_with_cache(batch, names_filter=[blocks.L.hook_resid_post], stop_at_layer=L+1)` and a copy of the cached
activation to fp16 on the CPU (the same work SAELens' ActivationsStore.get_activations does, minus autocast).

Standalone it runs `--rounds` timed passes after a warm-up and prints one JSON object. With `--serve` it
prints one JSON line after loading ({"ready": ...}), then runs one timed pass per line read on stdin and
answers {"seconds": ...}; at EOF it prints the summary object. The caller can so interleave its own
measurements with these, round by round.

`--dump FILE` also writes TL's activation for the first batch, in fp32 (safetensors "acts" [batch, context, d]),
so the caller can compare it with its own (benchmarks/harvest.py reports the difference).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from safetensors.torch import load_file


def with_architectures(model_dir: str) -> tuple[str, str | None]:
    """TL reads `architectures[0]` from config.json; lmscope's GGUF cache writes `"architectures": null`.
    If so, mirror the directory (symlinks) with that one field filled in from the model type."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    if cfg.get("architectures"):
        return model_dir, None
    arch = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "qwen2": "Qwen2ForCausalLM"}[cfg["model_type"]]
    mirror = Path(tempfile.mkdtemp(prefix="tl-model-"))
    atexit.register(shutil.rmtree, mirror, True)
    for f in Path(model_dir).iterdir():
        if f.name != "config.json":
            (mirror / f.name).symlink_to(f.resolve())
    (mirror / "config.json").write_text(json.dumps({**cfg, "architectures": [arch]}))
    return str(mirror), f"config.json has no architectures; set to [{arch}] in a symlinked mirror"


def load_tl(model_dir: str) -> tuple[Any, str]:
    """A HookedTransformer for a local HF model dir. Returns (model, how it was loaded)."""
    from importlib.metadata import version

    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    try:
        model = HookedTransformer.from_pretrained(model_dir, hf_model=hf, tokenizer=tok, device="cpu")
        return model, f"HookedTransformer.from_pretrained(local dir) [transformer_lens {version('transformer-lens')}]"
    except ValueError as exc:  # "<dir> not found. Valid official model names ...": the name check refuses paths
        reason = str(exc).split(". Valid")[0][:200]
    # The same steps from_pretrained takes after its name check, through TL's public loaders, which accept a
    # local directory: config from config.json, weights converted from the HF model, LN folded as usual.
    cfg = loading.get_pretrained_model_config(model_dir, fold_ln=True, device="cpu", dtype=torch.float32)
    state = loading.get_pretrained_state_dict(model_dir, cfg, hf, dtype=torch.float32)
    model = HookedTransformer(cfg, tok, move_to_device=True)
    model.load_and_process_state_dict(state, fold_ln=True, center_writing_weights=True, center_unembed=True)
    model.eval()
    how = (
        f"get_pretrained_model_config + HookedTransformer(cfg) + load_and_process_state_dict "
        f"[transformer_lens {version('transformer-lens')}]; from_pretrained refused the local dir: {reason}"
    )
    return model, how


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--tokens", required=True, help="safetensors file with 'tokens' [n_ctx, context]")
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--serve", action="store_true")
    ap.add_argument("--dump", default=None, help="write the first batch's fp32 activation here (safetensors)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    model_dir, patched = with_architectures(args.model_dir)
    model, how = load_tl(model_dir)
    load_s = time.perf_counter() - t0
    hook = f"blocks.{args.layer}.hook_resid_post"
    tokens = load_file(args.tokens)["tokens"].long()
    batches = list(tokens.split(args.batch_size))
    n = tokens.numel()

    def one_pass() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                _, cache = model.run_with_cache(b, names_filter=[hook], stop_at_layer=args.layer + 1)
                cache[hook].to("cpu", torch.float16)
        return time.perf_counter() - t

    one_pass()  # warm-up
    if args.dump:
        from safetensors.torch import save_file

        with torch.inference_mode():
            _, cache = model.run_with_cache(batches[0], names_filter=[hook], stop_at_layer=args.layer + 1)
            save_file({"acts": cache[hook].float().contiguous()}, args.dump)
    info: dict[str, Any] = {
        "anchor": "transformer_lens.run_with_cache",
        "loaded_via": how,
        "config_patch": patched,
        "hook": hook,
        "stop_at_layer": args.layer + 1,
        "tokens": n,
        "batch_size": args.batch_size,
        "load_seconds": round(load_s, 2),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    times: list[float] = []
    if args.serve:
        print(json.dumps({"ready": True, **info}), flush=True)
        for _line in sys.stdin:
            times.append(one_pass())
            print(json.dumps({"seconds": times[-1]}), flush=True)
    else:
        times = [one_pass() for _ in range(args.rounds)]
    med = statistics.median(times) if times else float("nan")
    print(json.dumps({**info, "seconds": times, "median_seconds": med, "tokens_per_s": n / med}), flush=True)


if __name__ == "__main__":
    main()
