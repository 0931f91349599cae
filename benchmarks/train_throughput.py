"""TopK SAE training throughput and final FVU: lmscope vs SAELens vs sparsify on the same activations (JSON).

    .venv/bin/python benchmarks/train_throughput.py [--tokens 200000] [--libs lmscope,sparsify,saelens]

Data: `blocks.6.resid_post` of SmolLM2-135M-Instruct over the stdlib corpus, harvested once by lmscope (fp32
storage, special tokens excluded, shuffled by `ActivationStore.batches`) and cached as
benchmarks/results/train_acts_<tokens>.safetensors ("acts" [N, 576] float32). Every library trains on the same
rows in the same order: rows [0, train) in batches of 4096, one epoch; the last `--eval-tokens` rows are held out
for the final FVU (sum |x - x_hat|^2 / sum |x - mean x|^2, raw activations, computed the same way for all).

Same width (d_sae 4608 = 8 x 576), k 32, batch 4096, Adam, LR 2e-4 / sqrt(d_sae / 2^14), the same warmup steps.
Each library keeps its own recipe otherwise (lmscope: mean-norm scaling, geometric-median b_dec, decay over the
last 20%; SAELens: mean-norm scaling, decay over the last 20%; sparsify: no scaling, linear decay to 0).

lmscope runs in this process (the `Trainer` API); SAELens and sparsify run in benchmarks/.venv-anchors
(benchmarks/anchors_env.sh) through benchmarks/anchors/*_train_topk.py --serve. The three are interleaved step
by step: after each lmscope step (in its `on_step` callback) each anchor is asked to run one step and waited
for, so no two steps ever overlap and load on a shared machine hits all three alike (`--sequential` runs them
one after another instead). tokens/s counts training steps only: the sum of step times from step 2 on (setup,
data loading, norm estimation, b_dec init and the first step's first-touch costs are excluded for all three):
`tokens_per_s` = batch / median step time over steps 2..N (`tokens_per_s_mean_step`: total over those steps).

The fp32 matmul peak is measured in the same run (before and after the trainers; the best is used): the best
time of `torch.matmul` over several repeats for the dense GEMMs of a TopK step, [4096, 576] x [576, 4608] and
[576, 4096] x [4096, 4608]. Useful FLOPs are 4 * d * m per token (encoder forward + encoder weight gradient; the
sparse decoder's 6 * k * d is negligible), so `limit_tokens_per_s` = peak / (4 d m) and `peak_fraction` =
tokens/s * 4 d m / peak. Targets: lmscope >= sparsify and >= 65% of peak.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import lmscope
from anchors_setup import ensure_anchors
from lmscope import load_model
from lmscope.activations import HarvestConfig, harvest
from lmscope.activations.store import ActivationStore
from lmscope.dictionaries import DictConfig
from lmscope.training import RunSpec, TensorSource, TrainConfig, Trainer

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
ANCHORS_PY = ROOT / ".venv-anchors" / "bin" / "python"
SCRIPTS = {"saelens": "saelens_train_topk.py", "sparsify": "sparsify_train_topk.py"}


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def cached_acts(tokens: int, hook: str, store_dir: Path) -> Path:
    """`tokens` shuffled rows of `hook` (special tokens excluded) as one fp32 safetensors file, harvested once."""
    path = RESULTS / f"train_acts_{hook}_{tokens}.safetensors"
    if path.is_file():
        return path
    model = load_model("smollm2-135m")
    cfg = HarvestConfig(hooks=[hook], tokens=math.ceil(tokens * 1.1), context=128, dtype="float32")
    harvest(model, "stdlib", store_dir, cfg)  # resumes / extends an earlier one
    store = ActivationStore.open(store_dir)
    rows = [b[hook] for b in store.batches(batch_size=4096, shuffle=True, seed=0, epochs=1)]
    acts = torch.cat(rows)
    if acts.shape[0] < tokens:
        raise SystemExit(f"the harvest gave {acts.shape[0]} usable rows, fewer than the {tokens} asked")
    tmp = path.with_name(path.name + ".tmp")
    save_file({"acts": acts[:tokens].contiguous()}, str(tmp))
    os.replace(tmp, path)
    return path


def matmul_peak(repeats: int) -> dict[str, float]:
    """Best fp32 FLOP/s of the dense GEMMs a TopK step runs (d 576, m 4608, batch 4096)."""
    out = {}
    for name, (a, b) in {
        "4096x576 @ 576x4608": ((4096, 576), (576, 4608)),
        "576x4096 @ 4096x4608": ((576, 4096), (4096, 4608)),
    }.items():
        x, w = torch.randn(*a), torch.randn(*b)
        flops = 2 * a[0] * a[1] * b[1]
        torch.matmul(x, w)
        best = math.inf
        for _ in range(repeats):
            t = time.perf_counter()
            torch.matmul(x, w)
            best = min(best, time.perf_counter() - t)
        out[name] = flops / best
    return out


def train_lmscope(
    x: torch.Tensor, x_eval: torch.Tensor, args: argparse.Namespace, between: Callable[[], None] | None = None
) -> dict[str, Any]:
    """lmscope's Trainer on the rows of `x` in order. A step's time runs from the end of the previous step's
    `on_step` callback to the start of its own; `between` (the anchors' steps) runs in the callback, untimed."""
    d = x.shape[1]
    t_setup = time.perf_counter()
    dict_cfg = DictConfig("topk", d_in=d, d_sae=args.d_sae, k=args.k, hook="acts")
    cfg = TrainConfig(
        total_tokens=x.shape[0], warmup_steps=args.warmup_steps, log_every=10**9, seed=args.seed
    )
    trainer = Trainer([RunSpec(dict_cfg, name="topk", lr=args.lr)], cfg)
    source = TensorSource(x, batch_size=args.batch_size)
    seconds: list[float] = []
    setup_s = time.perf_counter() - t_setup
    resumed = [time.perf_counter()]

    def on_step(_t: Trainer) -> None:
        seconds.append(time.perf_counter() - resumed[0])
        if between is not None:
            between()
        resumed[0] = time.perf_counter()

    dicts = trainer.fit(source, resume=False, on_step=on_step)
    sae = dicts["topk"]
    with torch.no_grad():
        recon, _ = sae(x_eval)
        final = float((x_eval - recon).pow(2).sum() / (x_eval - x_eval.mean(0)).pow(2).sum())
    run = trainer.runs[0]
    return {
        "library": "lmscope",
        "version": lmscope.__version__,
        "arch": "topk",
        "d_in": d,
        "d_sae": args.d_sae,
        "k": args.k,
        "batch_size": args.batch_size,
        "lr": run.lr,
        "warmup_steps": args.warmup_steps,
        "steps": len(seconds),
        "train_tokens": trainer.tokens,
        "tokens_per_s": (len(seconds) - 1) * args.batch_size / sum(seconds[1:]) if len(seconds) > 1 else None,
        "train_seconds": sum(seconds),
        "step_seconds": seconds,
        "setup_seconds": setup_s,
        "final_fvu": final,
        "eval_tokens": x_eval.shape[0],
        "dead_frac": run.dead.dead_fraction(),
        "normalisation": "mean norm sqrt(d_in), folded after training",
        "torch_threads": torch.get_num_threads(),
    }


def anchor_cmd(lib: str, acts: Path, n_train: int, args: argparse.Namespace) -> list[str]:
    return [
        str(args.anchors_python), "-W", "ignore", str(ROOT / "anchors" / SCRIPTS[lib]), "--acts", str(acts),
        "--train-tokens", str(n_train), "--eval-tokens", str(args.eval_tokens), "--batch-size", str(args.batch_size),
        "--d-sae", str(args.d_sae), "--k", str(args.k), "--lr", repr(args.lr),
        "--warmup-steps", str(args.warmup_steps), "--seed", str(args.seed),
    ]  # fmt: skip


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TQDM_DISABLE": "1"}


class ServedAnchor:
    """An anchor trainer in --serve mode: it runs one training step each time `step()` asks, so its steps
    interleave with lmscope's and never overlap them."""

    def __init__(self, lib: str, cmd: list[str], log: Path) -> None:
        self.lib, self.log = lib, log
        self.error: str | None = None
        self.result: dict[str, Any] | None = None
        self._err = log.open("a")
        self.proc = subprocess.Popen(
            [*cmd, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True, env=ENV
        )
        self._expect("ready")

    def _read(self) -> dict[str, Any] | None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)  # type: ignore[no-any-return]
        return None

    def _expect(self, key: str) -> dict[str, Any] | None:
        msg = self._read()
        if msg is None or key not in msg:
            self._fail()
            return None
        return msg

    def _fail(self) -> None:
        self.proc.wait()
        self._err.flush()
        self.error = f"failed (exit {self.proc.returncode}): {self.log.read_text()[-1500:]}"

    def step(self) -> None:
        if self.error is not None or self.proc.stdin is None or self.proc.stdin.closed:
            return
        try:
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self._fail()
            return
        self._expect("step")

    def finish(self) -> dict[str, Any]:
        if self.error is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # EOF: any steps left run unpaced (none when step counts match)
            while (msg := self._read()) is not None and "library" not in msg:
                pass
            self.proc.wait()
            if msg is None:
                self._fail()
            else:
                self.result = {**msg, "status": "ok"}
        self._err.close()
        return self.result or {"library": self.lib, "status": self.error}


def train_anchor(lib: str, acts: Path, n_train: int, args: argparse.Namespace, log: Path) -> dict[str, Any]:
    """One anchor run on its own (the --sequential mode)."""
    cmd = anchor_cmd(lib, acts, n_train, args)
    with log.open("a") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=ENV, timeout=args.timeout)
    objs = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not objs:
        tail = log.read_text()[-1500:]
        return {"library": lib, "status": f"failed (exit {proc.returncode}): {tail}"}
    return {**json.loads(objs[-1]), "status": "ok"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=200_000, help="rows of cached activations (train + eval)")
    ap.add_argument("--eval-tokens", type=int, default=16_384)
    ap.add_argument("--hook", default="blocks.6.resid_post")
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=None, help="default 2e-4 / sqrt(d_sae / 2^14)")
    ap.add_argument("--warmup-steps", type=int, default=None, help="default: 10%% of the steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--libs", default="lmscope,sparsify,saelens")
    ap.add_argument("--repeats", type=int, default=1, help="run every library this often (order rotates)")
    ap.add_argument(
        "--sequential", action="store_true", help="run the libraries one after another instead of step-interleaved"
    )
    ap.add_argument("--peak-repeats", type=int, default=10)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per anchor run")
    ap.add_argument("--anchors-python", type=Path, default=ANCHORS_PY)
    ap.add_argument("--store", type=Path, default=RESULTS / "acts_smollm2_stdlib_l6", help="lmscope harvest dir")
    ap.add_argument("--out", type=Path, default=RESULTS / "train_throughput.json")
    args = ap.parse_args()
    args.lr = args.lr if args.lr is not None else 2e-4 / math.sqrt(args.d_sae / 2**14)
    libs = [lib.strip() for lib in args.libs.split(",") if lib.strip()]
    bad = sorted(set(libs) - {"lmscope", *SCRIPTS})
    if bad:
        raise SystemExit(f"unknown --libs {bad}; choose from lmscope, saelens, sparsify")

    acts_path = cached_acts(args.tokens, args.hook, args.store)
    acts = load_file(str(acts_path))["acts"]
    n_train = (acts.shape[0] - args.eval_tokens) // args.batch_size * args.batch_size
    if n_train < 2 * args.batch_size:
        raise SystemExit(f"{args.tokens} tokens leave {n_train} training rows; use a larger --tokens")
    steps = n_train // args.batch_size
    if args.warmup_steps is None:
        args.warmup_steps = max(1, steps // 10)
    x, x_eval = acts[:n_train].float(), acts[acts.shape[0] - args.eval_tokens :].float()
    d = x.shape[1]
    flops_per_token = 4 * d * args.d_sae
    log = RESULTS / "train_throughput.anchors.log"
    log.unlink(missing_ok=True)

    anchors = [lib for lib in libs if lib != "lmscope"]
    if anchors and (problem := ensure_anchors(args.anchors_python)) is not None:
        raise SystemExit(f"the anchors' environment could not be built ({problem}); run with --libs lmscope")
    peaks = [matmul_peak(args.peak_repeats)]
    runs: dict[str, list[dict[str, Any]]] = {lib: [] for lib in libs}
    for r in range(args.repeats):
        if args.sequential or "lmscope" not in libs:
            order = libs[r % len(libs) :] + libs[: r % len(libs)]
            for lib in order:
                if lib == "lmscope":
                    runs[lib].append(train_lmscope(x, x_eval, args))
                else:
                    runs[lib].append(train_anchor(lib, acts_path, n_train, args, log))
            continue
        served = [ServedAnchor(lib, anchor_cmd(lib, acts_path, n_train, args), log) for lib in anchors]
        k = r % max(1, len(served))
        served = served[k:] + served[:k]

        def anchor_steps(served: list[ServedAnchor] = served) -> None:
            for a in served:
                a.step()

        runs["lmscope"].append(train_lmscope(x, x_eval, args, between=anchor_steps))
        for a in served:
            runs[a.lib].append(a.finish())
    peaks.append(matmul_peak(args.peak_repeats))
    peak = max(v for p in peaks for v in p.values())

    results: dict[str, Any] = {}
    for lib, rs in runs.items():
        ok = [r for r in rs if len(r.get("step_seconds") or []) >= 2]
        if not ok:
            results[lib] = rs[-1]
            continue
        # per run: batch / median step time (steps 2..N; robust to bursts of load from other jobs)
        per_run = [args.batch_size / statistics.median(r["step_seconds"][1:]) for r in ok]
        tps = statistics.median(per_run)
        results[lib] = {
            **ok[-1],
            "tokens_per_s": round(tps, 1),
            "tokens_per_s_runs": [round(t, 1) for t in per_run],
            "tokens_per_s_mean_step": round(statistics.median(r["tokens_per_s"] for r in ok), 1),
            "useful_flops_per_s": tps * flops_per_token,
            "peak_fraction": round(tps * flops_per_token / peak, 4),
        }
    lm = results.get("lmscope", {}).get("tokens_per_s")
    sp = results.get("sparsify", {}).get("tokens_per_s")
    out: dict[str, Any] = {
        "benchmark": "train_throughput",
        "hook": args.hook,
        "acts_file": str(acts_path.relative_to(ROOT.parent) if acts_path.is_relative_to(ROOT.parent) else acts_path),
        "train_tokens": n_train,
        "eval_tokens": args.eval_tokens,
        "steps": steps,
        "d_in": d,
        "d_sae": args.d_sae,
        "k": args.k,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup_steps": args.warmup_steps,
        "repeats": args.repeats,
        "mode": "sequential" if args.sequential else "interleaved by step",
        "flops_per_token": flops_per_token,
        "matmul_peak_flops_per_s": peak,
        "matmul_peak_runs": peaks,
        "limit_tokens_per_s": round(peak / flops_per_token, 1),
        "results": results,
        "lmscope_over_sparsify": round(lm / sp, 3) if lm and sp else None,
        "targets": {
            "lmscope_ge_sparsify": bool(lm and sp and lm >= sp),
            "lmscope_ge_65pct_peak": bool(lm and lm * flops_per_token >= 0.65 * peak),
        },
        "reference_earlier_here": {"saelens": 3100, "sparsify": 9500, "limit": 16600},
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }
    write_json(args.out, out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
