"""Harvest throughput vs the bare forward pass through the same layers on the same batches (JSON on stdout).

    .venv/bin/python benchmarks/harvest.py --tokens 32768

Both sides run the embedded SmolLM2-135M-Instruct on the same packed stdlib contexts, stopping after the
hooked layer. "harvest" is the full `lmscope.harvest.harvest` call (tokenisation, capture, copy to the
storage dtype, safetensors serialisation, sha256 and atomic writes in the writer thread); "bare" is only
`model.capture(...)` + forward. A ratio near 1 means disk writes overlap compute.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from lmscope import load_model
from lmscope.corpora import ContextPacker, PackingConfig, StdlibCorpus
from lmscope.harvest import HarvestConfig, harvest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--hook", default="blocks.6.resid_post")
    ap.add_argument("--tokens", type=int, default=32_768)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dtype", default="float16", help="storage dtype")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    model = load_model(args.model, device=args.device)
    n_ctx = args.tokens // args.context
    packer = ContextPacker(model.tokenizer, PackingConfig(context=args.context))
    batches = []
    rows = packer.rows(StdlibCorpus().documents())
    tokens = packer.stack([next(rows) for _ in range(n_ctx)]).tokens
    for a in range(0, n_ctx, args.batch_size):
        batches.append(torch.from_numpy(tokens[a : a + args.batch_size]))
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)

    def bare() -> float:
        t = time.perf_counter()
        with torch.inference_mode(), model.capture([args.hook]) as acts:
            for b in batches:
                model(b)
                acts[args.hook].to("cpu", torch.float16)  # the copy any consumer needs
        sync()
        return time.perf_counter() - t

    def run_harvest() -> float:
        out = Path(tempfile.mkdtemp(prefix="lmscope-bench-"))
        try:
            cfg = HarvestConfig(
                hooks=[args.hook], tokens=n_ctx * args.context, context=args.context, dtype=args.dtype,
                batch_size=args.batch_size, shard_tokens=args.batch_size * args.context * 4,
            )  # fmt: skip
            harvest(model, "stdlib", out, cfg, progress=False)  # first call hashes the model: not timed
            shutil.rmtree(out)
            t = time.perf_counter()
            harvest(model, "stdlib", out, cfg, progress=False)
            sync()
            return time.perf_counter() - t
        finally:
            shutil.rmtree(out, ignore_errors=True)

    bare()  # warm-up
    n = n_ctx * args.context
    bare_s = min(bare() for _ in range(args.repeats))
    harvest_s = min(run_harvest() for _ in range(args.repeats))
    result = {
        "model": args.model,
        "hook": args.hook,
        "device": str(model.device),
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "tokens": n,
        "context": args.context,
        "batch_size": args.batch_size,
        "storage_dtype": args.dtype,
        "bare_forward_tokens_per_s": round(n / bare_s, 1),
        "harvest_tokens_per_s": round(n / harvest_s, 1),
        "ratio_harvest_over_bare": round(bare_s / harvest_s, 3),
        "target_ratio": 0.9,
        "transformer_lens": "not measured: see docs/harvest.md",
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
