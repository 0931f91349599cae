"""Harvest throughput: lmscope `harvest` vs the bare forward pass vs TransformerLens `run_with_cache` (JSON).

    .venv/bin/python benchmarks/harvest.py [--tokens 16384] [--rounds 5] [--no-anchor]

All three process the same packed stdlib contexts of SmolLM2-135M-Instruct (fp32) and stop after the hooked
layer (blocks.6.resid_post = TL's blocks.6.hook_resid_post):

- "bare": `model.capture([hook])` + forward (early stop) + the fp16 copy to the CPU any consumer needs, over
  pre-tokenised batches. The floor: nothing a harvest can skip.
- "harvest": the full `lmscope.activations.harvest.harvest` call into a fresh directory (tokenisation, capture, fp16
  copy, safetensors serialisation, sha256, atomic writes in the writer thread). It does strictly more work
  than "bare", so harvest/bare tokens/s above ~1.05 means the measurement is disturbed, and
  `measurement_ok` is false.
- "transformer_lens": `HookedTransformer.run_with_cache(batch, names_filter=[hook], stop_at_layer=7)` + fp16
  copy, over the same token batches, in benchmarks/.venv-anchors (built by benchmarks/anchors_env.sh) via
  benchmarks/anchors/tl_run_with_cache.py --serve. This is the call SAELens' ActivationsStore makes to
  cache activations. It writes nothing to disk, so it is compared with both "bare" and "harvest".

The three are interleaved round by round (the order rotates every round) so that load on a shared machine hits
them alike. Such load only ever adds time, so the primary figures are each side's best round; medians and the
median of per-round paired ratios are reported too. The anchor runs in its own process but only while the
others wait, so the processes never compete for the cores.

Both compute the same activations: `tl_match` compares TL's fp32 `blocks.L.hook_resid_post` with lmscope's fp32
`blocks.L.resid_post` on the first batch (max absolute difference, that over the largest magnitude, and the
relative L2 error, over all positions and without position 0, whose norm is an outlier).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import lmscope
from anchors_setup import ensure_anchors
from lmscope import load_model
from lmscope.activations import HarvestConfig, harvest
from lmscope.corpora import ContextPacker, PackingConfig, StdlibCorpus

ROOT = Path(__file__).resolve().parent
ANCHORS_PY = ROOT / ".venv-anchors" / "bin" / "python"


def hf_model_dir(spec: str) -> Path | None:
    """The local HF directory lmscope loads `spec` from (for the anchors), or None."""
    from lmscope.model import loading

    kind, where = loading.resolve_spec(spec)
    if kind == "dir":
        return Path(where)
    if kind == "gguf":
        return loading._gguf_cache(Path(where), loading.file_sha256(Path(where)))
    return None


def compare(ours: torch.Tensor, theirs: torch.Tensor) -> dict[str, Any]:
    """How far two fp32 activations [batch, context, d] differ: over all positions and without position 0."""
    out: dict[str, Any] = {"shape": list(ours.shape)}
    for name, a, b in (("all_positions", ours, theirs), ("without_position_0", ours[:, 1:], theirs[:, 1:])):
        diff = (a - b).abs()
        out[name] = {
            "max_abs_diff": float(diff.max()),
            "max_abs_value": float(b.abs().max()),
            "max_abs_diff_over_max_abs": float(diff.max() / b.abs().max()),
            "rel_l2": float((a - b).norm() / b.norm()),
        }
    return out


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


class Anchor:
    """benchmarks/anchors/tl_run_with_cache.py --serve in the anchors venv: one timed pass per request."""

    def __init__(
        self, python: Path, model_dir: Path, tokens: Path, layer: int, batch_size: int, log: Path, dump: Path
    ) -> None:
        cmd = [
            str(python), "-W", "ignore::DeprecationWarning", str(ROOT / "anchors" / "tl_run_with_cache.py"),
            "--model-dir", str(model_dir), "--tokens", str(tokens), "--layer", str(layer),
            "--batch-size", str(batch_size), "--serve", "--dump", str(dump),
        ]  # fmt: skip
        self.log = log
        self._err: IO[str] = log.open("w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True)
        self.info = self._read()  # waits for the model load and the anchor's own warm-up pass
        if not self.info.get("ready"):
            raise RuntimeError(f"anchor did not start: {self.info}")

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self._err.flush()
            tail = self.log.read_text()[-800:]
            raise RuntimeError(f"anchor exited with status {self.proc.returncode}: {tail}")
        return json.loads(line)  # type: ignore[no-any-return]

    def timed_pass(self) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return float(self._read()["seconds"])

    def close(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        summary = self._read()
        self.proc.wait(timeout=60)
        self._err.close()
        return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, default=6, help="hook blocks.LAYER.resid_post")
    ap.add_argument("--tokens", type=int, default=16_384)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dtype", default="float16", help="storage dtype")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-anchor", action="store_true", help="skip TransformerLens")
    ap.add_argument("--anchors-python", type=Path, default=ANCHORS_PY)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "harvest.json")
    args = ap.parse_args()

    hook = f"blocks.{args.layer}.resid_post"
    model = load_model(args.model, device=args.device)
    n_ctx = args.tokens // args.context
    n = n_ctx * args.context
    packer = ContextPacker(model.tokenizer, PackingConfig(context=args.context))
    rows = packer.rows(StdlibCorpus().documents())
    tokens = torch.from_numpy(packer.stack([next(rows) for _ in range(n_ctx)]).tokens)
    batches = list(tokens.split(args.batch_size))
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    work = Path(tempfile.mkdtemp(prefix="lmscope-bench-harvest-"))
    cfg = HarvestConfig(
        hooks=[hook], tokens=n, context=args.context, dtype=args.dtype,
        batch_size=args.batch_size, shard_tokens=args.batch_size * args.context * 4,
    )  # fmt: skip

    def bare() -> float:
        t = time.perf_counter()
        with torch.inference_mode(), model.capture([hook]) as acts:
            for b in batches:
                model(b)
                acts[hook].to("cpu", torch.float16)  # the copy any consumer needs
        sync()
        return time.perf_counter() - t

    def run_harvest() -> float:
        out = work / "store"
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        harvest(model, "stdlib", out, cfg, progress=False)
        sync()
        return time.perf_counter() - t

    # Warm-ups. The first harvest also hashes the model (cached per model object) and checks that the
    # harvest saw exactly the tokens the other two are given.
    run_harvest()
    store = work / "store"
    stored = torch.cat([load_file(str(p))["tokens"] for p in sorted(store.glob("shard_*.safetensors"))])
    same_tokens = bool(torch.equal(stored.long(), tokens.reshape(-1)))
    bare()

    anchor: Anchor | None = None
    anchor_status = "skipped (--no-anchor)"
    tl_match: dict[str, Any] | None = None
    model_dir = hf_model_dir(args.model)
    if not args.no_anchor:
        if (problem := ensure_anchors(args.anchors_python)) is not None:
            anchor_status = f"not run: the anchors' environment could not be built: {problem}"
        elif model_dir is None:
            anchor_status = f"not run: no local HF directory for {args.model} (hub models are not reachable here)"
        else:
            tok_file = work / "tokens.safetensors"
            save_file({"tokens": tokens.contiguous()}, str(tok_file))
            dump = work / "tl_first_batch.safetensors"
            try:
                anchor = Anchor(
                    args.anchors_python, model_dir, tok_file, args.layer, args.batch_size, work / "anchor.log", dump
                )
                anchor_status = "ok"
                with torch.inference_mode(), model.capture([hook]) as acts:
                    model(batches[0])
                    ours = acts[hook].to("cpu", torch.float32)
                tl_match = compare(ours, load_file(str(dump))["acts"])
            except (RuntimeError, OSError, json.JSONDecodeError) as exc:
                anchor_status = f"failed: {exc}"[:1500]

    runners: list[tuple[str, Callable[[], float]]] = [("bare", bare), ("harvest", run_harvest)]
    if anchor is not None:
        runners.append(("transformer_lens", anchor.timed_pass))
    times: dict[str, list[float]] = {name: [] for name, _ in runners}
    for r in range(args.rounds):
        k = r % len(runners)
        for name, fn in runners[k:] + runners[:k]:  # rotate the order so drift cancels out
            times[name].append(fn())
    anchor_info: dict[str, Any] = {}
    if anchor is not None:
        anchor_info = anchor.close()
        anchor_info = {k: v for k, v in anchor_info.items() if k not in ("seconds", "median_seconds", "tokens_per_s")}
    shutil.rmtree(work, ignore_errors=True)

    # Load from other jobs only ever adds time, and on a shared machine it drifts within a round, so the
    # primary figures are each side's best round; medians and per-round paired ratios are reported too.
    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    tps = {k: round(n / v, 1) for k, v in best.items()}

    def paired(a: str, b: str) -> float | None:
        """Median over rounds of tokens/s(b) / tokens/s(a), i.e. seconds(a) / seconds(b), round by round."""
        if a not in times or b not in times:
            return None
        return round(statistics.median(x / y for x, y in zip(times[a], times[b], strict=True)), 3)

    ratio = best["bare"] / best["harvest"]
    result: dict[str, Any] = {
        "benchmark": "harvest",
        "model": args.model,
        "hook": hook,
        "device": str(model.device),
        "compute_dtype": str(model.dtype),
        "storage_dtype": args.dtype,
        "tokens": n,
        "context": args.context,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "same_tokens": same_tokens,
        "tokens_per_s": tps,
        "tokens_per_s_median": {k: round(n / v, 1) for k, v in med.items()},
        "best_seconds": best,
        "median_seconds": med,
        "seconds": times,
        "ratio_harvest_over_bare": round(ratio, 3),
        "ratio_harvest_over_bare_paired_median": paired("bare", "harvest"),
        "measurement_ok": ratio <= 1.05,
        "target_ratio": 0.9,
        "anchor_status": anchor_status,
        "ratio_harvest_over_transformer_lens": (
            round(best["transformer_lens"] / best["harvest"], 3) if "transformer_lens" in best else None
        ),
        "ratio_harvest_over_transformer_lens_paired_median": paired("transformer_lens", "harvest"),
        "ratio_bare_over_transformer_lens": (
            round(best["transformer_lens"] / best["bare"], 3) if "transformer_lens" in best else None
        ),
        "anchor": anchor_info,
        "tl_match": tl_match,
        "lmscope_version": lmscope.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }
    write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
