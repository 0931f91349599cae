"""TopK SAE training throughput and converged FVU: lmscope vs SAELens vs sparsify on the same activations (JSON).

    .venv/bin/python benchmarks/train_throughput.py [--tokens 2000000] [--libs lmscope,sparsify,saelens]

Data: `blocks.6.resid_post` of SmolLM2-135M-Instruct over the stdlib corpus, harvested once by lmscope (fp32
storage, special tokens excluded, shuffled by `ActivationStore.batches`) and cached as
benchmarks/results/train_acts_<hook>_<tokens>.safetensors ("acts" [N, 576] float32), written row by row and
memory-mapped by every trainer (they share one copy in the page cache). Every library trains on the same rows in
the same order: rows [0, train) in batches of 4096, one epoch; the last `--eval-tokens` rows are held out for the
final FVU (sum |x - x_hat|^2 / sum |x - mean x|^2, raw activations, computed the same way for all) and the dead
fraction (latents that never fire on them).

Same width (d_sae 4608 = 8 x 576), k 32, batch 4096, Adam, LR 2e-4 / sqrt(d_sae / 2^14), the same warmup steps.
Each library keeps its own recipe otherwise (lmscope: mean-norm scaling, geometric-median b_dec, decay over the
last 20%; SAELens: mean-norm scaling, decay over the last 20%; sparsify: no scaling, linear decay to 0).

FVU is compared at equal samples after a run long enough to converge (default 2M rows), with a convergence check
per library: the relative fall of the per-step training FVU across the last 10% of steps (`convergence`,
converged when under 2%; see anchors/_common.py). A short run's FVU mostly reflects b_dec initialisation.

Each anchor runs at its fastest working configuration, recorded under `results.<lib>.config`: before the timed
run, every candidate configuration (SAELens: `use_sparse_activations` x `rescale_acts_by_decoder_norm`) is
probed for `--probe-steps` steps, one after another, and the fastest that works is used (`anchor_probes`).

lmscope runs in this process (the `Trainer` API); SAELens and sparsify run in benchmarks/.venv-anchors
(benchmarks/anchors_env.sh) through benchmarks/anchors/*_train_topk.py --serve. The three are interleaved step
by step: after each lmscope step (in its `on_step` callback) each anchor is asked to run one step and waited
for, so no two steps ever overlap and load on a shared machine hits all three alike (`--sequential` runs them
one after another instead). tokens/s counts training steps only (setup, data loading, norm estimation, b_dec
init and the first step's first-touch costs are excluded for all three): `tokens_per_s` = batch / median step
time over steps 2..N (`tokens_per_s_mean_step`: total over those steps).

Ceilings, measured in the same run before and after the trainers (best of all; see _ceilings.py): the encoder
matmul alone, `torch.addmm` on [4096, 576] x [576, 4608], and that addmm plus `topk(32)` on its output. That is
the only dense work of a TopK step with a sparse backward (lmscope's fused step executes 2 * d * m dense FLOPs
per token, the encoder forward; its backward and decoder are sparse), so `fraction_of_matmul_topk` = tokens/s
/ the addmm+topk tokens/s is at most 1 for any implementation. Target: lmscope >= sparsify.

Allocator: lmscope's trainer fixes glibc's mmap and trim thresholds (lmscope/core/allocator.py: step-sized tensors
stay in the heap instead of being faulted in again every step). `--anchor-malloc same` (the default) gives the
anchors' processes the same two thresholds through glibc's environment variables; `default` leaves theirs at glibc's
defaults. The choice is recorded in the JSON (`anchor_malloc`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import lmscope
from _ceilings import best_of, topk_ceilings
from _runinfo import run_info
from anchors._common import convergence, open_acts, write_acts
from anchors_setup import ensure_anchors
from lmscope import load_model
from lmscope.activations import HarvestConfig, harvest
from lmscope.activations.store import ActivationStore
from lmscope.core.allocator import MMAP_THRESHOLD, TRIM_THRESHOLD
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
    """`tokens` shuffled rows of `hook` (special tokens excluded) as one fp32 safetensors file, harvested once and
    written batch by batch (2M rows are 4.6 GB: never all in memory)."""
    path = RESULTS / f"train_acts_{hook}_{tokens}.safetensors"
    if path.is_file():
        return path
    RESULTS.mkdir(parents=True, exist_ok=True)
    model = load_model("smollm2-135m")
    cfg = HarvestConfig(hooks=[hook], tokens=math.ceil(tokens * 1.1), context=128, dtype="float32")
    harvest(model, "stdlib", store_dir, cfg)  # resumes / extends an earlier one
    del model
    store = ActivationStore.open(store_dir)
    rows = (b[hook] for b in store.batches(batch_size=4096, shuffle=True, seed=0, epochs=1))
    tmp = path.with_name(path.name + ".tmp")
    try:
        write_acts(tmp, rows, tokens, store.widths[hook])
    except ValueError as exc:
        raise SystemExit(f"the harvest gave too few usable rows: {exc}") from exc
    os.replace(tmp, path)
    return path


def train_lmscope(
    x: torch.Tensor, x_eval: torch.Tensor, args: argparse.Namespace, between: Callable[[], None] | None = None
) -> dict[str, Any]:
    """lmscope's Trainer on the rows of `x` in order. A step's time runs from the end of the previous step's
    `on_step` callback to the start of its own; `between` (the anchors' steps) runs in the callback, untimed."""
    d = x.shape[1]
    t_setup = time.perf_counter()
    dict_cfg = DictConfig("topk", d_in=d, d_sae=args.d_sae, k=args.k, hook="acts")
    cfg = TrainConfig(total_tokens=x.shape[0], warmup_steps=args.warmup_steps, log_every=10**9, seed=args.seed)
    trainer = Trainer([RunSpec(dict_cfg, name="topk", lr=args.lr)], cfg)
    source = TensorSource(x, batch_size=args.batch_size)
    seconds: list[float] = []
    step_fvu: list[float] = []
    fvu_sum = [0.0]
    setup_s = time.perf_counter() - t_setup
    resumed = [time.perf_counter()]

    def on_step(t: Trainer) -> None:
        seconds.append(time.perf_counter() - resumed[0])
        # The meter sums the per-step FVUs. With log_every 10**9 it is reset only by the log line after the last
        # step, which leaves the mean over all steps in the run's record.
        run = t.runs[0]
        total = run.meter.sums.get("fvu", 0.0) if run.meter.n else run.record.get("fvu", 0.0) * len(seconds)
        step_fvu.append(total - fvu_sum[0])
        fvu_sum[0] = total
        if between is not None:
            between()
        resumed[0] = time.perf_counter()

    dicts = trainer.fit(source, resume=False, on_step=on_step)
    sae = dicts["topk"]
    with torch.no_grad():
        recon, z = sae(x_eval)
        final = float((x_eval - recon).pow(2).sum() / (x_eval - x_eval.mean(0)).pow(2).sum())
        eval_dead = float((z > 0).any(0).logical_not().float().mean())
    run = trainer.runs[0]
    return {
        "library": "lmscope",
        "status": "ok",
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
        "eval_dead_frac": eval_dead,
        "last_batch_fvu": step_fvu[-1] if step_fvu else None,
        "step_fvu": step_fvu,
        "convergence": convergence(step_fvu),
        "dead_frac": run.dead.dead_fraction(),
        "normalisation": "mean norm sqrt(d_in), folded after training",
        "config": {
            "step": "FusedTopK (dense encoder forward; sparse backward and decoder)",
            "dtype": "float32",
            "optimizer": "torch.optim.Adam(fused=True)",
            "b_dec_init": cfg.b_dec_init,
        },
        "torch_threads": torch.get_num_threads(),
    }


def train_cli(args: argparse.Namespace, d: int) -> dict[str, Any]:
    """`lmscope train` on the harvest store itself (shuffled reads from its shards, as a user trains), timed from
    its own log: tokens/s over the whole run after the first log line (setup, norm estimation and b_dec init
    excluded; data loading included)."""
    import shutil
    import tempfile

    out = Path(tempfile.mkdtemp(prefix="lmscope_train_cli_"))
    cmd = [
        sys.executable, "-m", "lmscope.cli.app", "train", "--acts", str(args.store), "--arch", "topk", "--k",
        str(args.k), "--expansion", str(args.d_sae // d), "--tokens", str(args.cli_tokens), "--batch-size",
        str(args.batch_size), "--warmup-steps", str(args.warmup_steps), "--epochs", "8", "--no-progress", "--out",
        str(out),
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    try:
        if proc.returncode != 0:
            return {"status": "error", "command": " ".join(cmd[2:]), "stderr": proc.stderr[-2000:]}
        log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        first, last = log[0], log[-1]
        dt = last["tokens"] / last["tok_s"] - first["tokens"] / first["tok_s"]
        return {
            "status": "ok",
            "command": "lmscope " + " ".join(cmd[3:-1]) + " OUT",
            "tokens": last["tokens"],
            "tokens_per_s": round((last["tokens"] - first["tokens"]) / dt, 1) if dt > 0 else None,
            "tokens_per_s_whole_run": last["tok_s"],
            "wall_seconds": wall,
            "final_step_fvu": last.get("fvu"),
        }
    finally:
        shutil.rmtree(out, ignore_errors=True)


# The configurations each anchor can run in, fastest expected first; --probe-steps times each and keeps the
# fastest that works. The flags are those of benchmarks/anchors/<lib>_train_topk.py.
ANCHOR_CONFIGS: dict[str, dict[str, list[str]]] = {
    "saelens": {
        "use_sparse_activations=True, rescale_acts_by_decoder_norm=False": ["--sparse-activations", "--no-rescale"],
        "use_sparse_activations=True, rescale_acts_by_decoder_norm=True": ["--sparse-activations"],
        "use_sparse_activations=False, rescale_acts_by_decoder_norm=False": ["--no-rescale"],
        "defaults (use_sparse_activations=False, rescale_acts_by_decoder_norm=True)": [],
    },
    "sparsify": {"defaults (fused encoder, eager embedding_bag decoder: triton needs a GPU)": []},
}

# The dense matrix products each library executes per token in a training step (read from their code).
DENSE_WORK = {
    "lmscope": "encoder forward addmm, 2*d*m FLOPs; backward (value grads, encoder and decoder grads) and decoder "
    "sparse (FusedTopK)",
    "sparsify": "encoder forward F.linear, 2*d*m; backward sparse (FusedEncoder: embedding_bag, index_add); "
    "decoder embedding_bag",
    "saelens": "encoder forward matmul 2*d*m and its weight gradient 2*d*m (autograd); decoder: torch.sparse.mm "
    "with use_sparse_activations, else dense (2*d*m forward, 4*d*m backward)",
}


def anchor_cmd(lib: str, acts: Path, n_train: int, args: argparse.Namespace, flags: list[str]) -> list[str]:
    return [
        str(args.anchors_python), "-W", "ignore", str(ROOT / "anchors" / SCRIPTS[lib]), "--acts", str(acts),
        "--train-tokens", str(n_train), "--eval-tokens", str(args.eval_tokens), "--batch-size", str(args.batch_size),
        "--d-sae", str(args.d_sae), "--k", str(args.k), "--lr", repr(args.lr),
        "--warmup-steps", str(args.warmup_steps), "--seed", str(args.seed), *flags,
    ]  # fmt: skip


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TQDM_DISABLE": "1"}
# lmscope's trainer fixes glibc's mmap and trim thresholds (lmscope/core/allocator.py); with --anchor-malloc same the
# anchors' processes get the same two settings through glibc's own environment variables, so no library is timed
# with an allocator the others lack
SAME_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}


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


def train_anchor(
    lib: str, acts: Path, n_train: int, args: argparse.Namespace, log: Path, flags: list[str]
) -> dict[str, Any]:
    """One anchor run on its own (the --sequential mode, and the configuration probes)."""
    cmd = anchor_cmd(lib, acts, n_train, args, flags)
    with log.open("a") as err:
        err.write(f"\n$ {' '.join(cmd)}\n")
        err.flush()
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=ENV, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return {"library": lib, "status": f"timed out after {args.timeout} s"}
    objs = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not objs:
        lines = log.read_text().splitlines()
        errors = [ln for ln in lines if re.match(r"^\w*(Error|Exception)\b", ln)]  # the traceback's last line
        return {"library": lib, "status": f"failed (exit {proc.returncode}): {(errors or lines or [''])[-1][:500]}"}
    return {**json.loads(objs[-1]), "status": "ok"}


def median_rate(result: dict[str, Any], batch_size: int) -> float | None:
    """batch / median step time over steps 2..N, or None when the run has fewer than 2 steps."""
    secs = result.get("step_seconds") or []
    return batch_size / statistics.median(secs[1:]) if len(secs) >= 2 else None


def probe_configs(lib: str, acts: Path, args: argparse.Namespace, log: Path) -> tuple[str, list[str], list[Any]]:
    """(name, flags) of the fastest working configuration of `lib`, and what each probe gave: every candidate runs
    --probe-steps steps, --probe-rounds times (the order rotating), and keeps its best round. With one
    candidate, or --probe-steps 0, the first candidate is taken unprobed."""
    configs = ANCHOR_CONFIGS[lib]
    names = list(configs)
    if args.probe_steps <= 0 or len(names) == 1:
        return names[0], configs[names[0]], []
    probe_args = argparse.Namespace(**{**vars(args), "warmup_steps": 1})
    rates: dict[str, list[float]] = {name: [] for name in names}
    status: dict[str, str] = {}
    for r in range(max(1, args.probe_rounds)):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if status.get(name, "ok") != "ok":
                continue  # a configuration that failed once is not retried
            res = train_anchor(lib, acts, args.probe_steps * args.batch_size, probe_args, log, configs[name])
            tps = median_rate(res, args.batch_size) if res.get("status") == "ok" else None
            status[name] = "ok" if tps else str(res.get("status"))[:300]
            if tps:
                rates[name].append(tps)
    probes = [{"config": name, "tokens_per_s": round(max(rates[name]), 1) if rates[name] else None,
               "tokens_per_s_rounds": [round(t, 1) for t in rates[name]], "status": status.get(name, "not run")}
              for name in names]  # fmt: skip
    working = [p for p in probes if p["tokens_per_s"]]
    if not working:
        return names[0], configs[names[0]], probes
    best = max(working, key=lambda p: p["tokens_per_s"])
    return best["config"], configs[best["config"]], probes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2_000_000, help="rows of cached activations (train + eval)")
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
    ap.add_argument("--probe-steps", type=int, default=8, help="steps per anchor configuration probe; 0: no probe")
    ap.add_argument("--probe-rounds", type=int, default=2, help="probes per configuration (best kept)")
    ap.add_argument("--ceiling-repeats", type=int, default=10)
    ap.add_argument("--timeout", type=int, default=7200, help="seconds per sequential anchor run")
    ap.add_argument("--anchors-python", type=Path, default=ANCHORS_PY)
    ap.add_argument("--store", type=Path, default=RESULTS / "acts_smollm2_stdlib_l6", help="lmscope harvest dir")
    ap.add_argument(
        "--cli-tokens", type=int, default=None,
        help="also time `lmscope train --acts STORE` for this many tokens (default: the training rows of --tokens, so "
        "its shards' one-off checksums weigh as in a real run; 0: skip), the command a user runs",
    )  # fmt: skip
    ap.add_argument(
        "--anchor-malloc", choices=("same", "default"), default="same",
        help="same: the anchors run with the glibc thresholds lmscope's trainer sets; default: glibc's defaults",
    )  # fmt: skip
    ap.add_argument("--out", type=Path, default=RESULTS / "train_throughput.json")
    args = ap.parse_args()
    if args.anchor_malloc == "same":
        ENV.update(SAME_MALLOC)
    args.lr = args.lr if args.lr is not None else 2e-4 / math.sqrt(args.d_sae / 2**14)
    libs = [lib.strip() for lib in args.libs.split(",") if lib.strip()]
    bad = sorted(set(libs) - {"lmscope", *SCRIPTS})
    if bad:
        raise SystemExit(f"unknown --libs {bad}; choose from lmscope, saelens, sparsify")

    acts_path = cached_acts(args.tokens, args.hook, args.store)
    acts = open_acts(acts_path)
    n_train = (acts.shape[0] - args.eval_tokens) // args.batch_size * args.batch_size
    if n_train < 2 * args.batch_size:
        raise SystemExit(f"{args.tokens} tokens leave {n_train} training rows; use a larger --tokens")
    steps = n_train // args.batch_size
    if args.cli_tokens is None:
        args.cli_tokens = n_train
    if args.warmup_steps is None:
        args.warmup_steps = max(1, steps // 10)
    x, x_eval = acts[:n_train], acts[acts.shape[0] - args.eval_tokens :]
    float(acts.sum())  # read the whole file once, so the page cache holds it before anything is timed
    d = x.shape[1]
    log = RESULTS / "train_throughput.anchors.log"
    log.unlink(missing_ok=True)

    anchors = [lib for lib in libs if lib != "lmscope"]
    if anchors and (problem := ensure_anchors(args.anchors_python)) is not None:
        raise SystemExit(f"the anchors' environment could not be built ({problem}); run with --libs lmscope")
    chosen: dict[str, tuple[str, list[str]]] = {}
    probes: dict[str, list[Any]] = {}
    for lib in anchors:
        name, flags, probes[lib] = probe_configs(lib, acts_path, args, log)
        chosen[lib] = (name, flags)

    ceilings = [topk_ceilings(args.batch_size, d, args.d_sae, args.k, args.ceiling_repeats)]
    runs: dict[str, list[dict[str, Any]]] = {lib: [] for lib in libs}
    for r in range(args.repeats):
        if args.sequential or "lmscope" not in libs:
            order = libs[r % len(libs) :] + libs[: r % len(libs)]
            for lib in order:
                if lib == "lmscope":
                    runs[lib].append(train_lmscope(x, x_eval, args))
                else:
                    runs[lib].append(train_anchor(lib, acts_path, n_train, args, log, chosen[lib][1]))
            continue
        served = [ServedAnchor(lib, anchor_cmd(lib, acts_path, n_train, args, chosen[lib][1]), log) for lib in anchors]
        k = r % max(1, len(served))
        served = served[k:] + served[:k]

        def anchor_steps(served: list[ServedAnchor] = served) -> None:
            for a in served:
                a.step()

        runs["lmscope"].append(train_lmscope(x, x_eval, args, between=anchor_steps))
        for a in served:
            runs[a.lib].append(a.finish())
    cli = train_cli(args, d) if args.cli_tokens and "lmscope" in libs else None
    ceilings.append(topk_ceilings(args.batch_size, d, args.d_sae, args.k, args.ceiling_repeats))
    ceiling = best_of(ceilings)
    if cli and cli.get("tokens_per_s"):
        cli["fraction_of_matmul_topk"] = round(cli["tokens_per_s"] / ceiling["matmul_topk_tokens_per_s"], 4)

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
            "fraction_of_matmul": round(tps / ceiling["matmul_tokens_per_s"], 4),
            "fraction_of_matmul_topk": round(tps / ceiling["matmul_topk_tokens_per_s"], 4),
            "dense_work": DENSE_WORK[lib],
        }
        if lib in chosen:
            results[lib]["config_name"] = chosen[lib][0]
    rate = {lib: r.get("tokens_per_s") for lib, r in results.items() if r.get("tokens_per_s")}

    def ratio(a: str, b: str) -> float | None:
        return round(rate[a] / rate[b], 3) if a in rate and b in rate else None

    done = {lib: r for lib, r in results.items() if "convergence" in r}
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
        "anchor_malloc": {"setting": args.anchor_malloc, **(SAME_MALLOC if args.anchor_malloc == "same" else {})},
        "dense_flops_per_token_lmscope": 2 * d * args.d_sae,
        "ceilings": ceiling,
        "ceiling_runs": ceilings,
        "anchor_configs": {lib: name for lib, (name, _flags) in chosen.items()},
        "anchor_probes": probes,
        "probe_steps": args.probe_steps,
        "probe_rounds": args.probe_rounds,
        "results": results,
        "tokens_per_s": rate,
        "fraction_of_matmul_topk": {
            lib: r["fraction_of_matmul_topk"] for lib, r in results.items() if "fraction_of_matmul_topk" in r
        },
        "final_fvu": {lib: r["final_fvu"] for lib, r in done.items()},
        "eval_dead_frac": {lib: r.get("eval_dead_frac") for lib, r in done.items()},
        "converged": {lib: r["convergence"]["converged"] for lib, r in done.items()},
        "all_converged": bool(done) and all(r["convergence"]["converged"] for r in done.values()),
        "lmscope_train_cli": cli,
        "lmscope_over_sparsify": ratio("lmscope", "sparsify"),
        "lmscope_over_saelens": ratio("lmscope", "saelens"),
        "targets": {"lmscope_ge_sparsify": bool(ratio("lmscope", "sparsify") and rate["lmscope"] >= rate["sparsify"])},
        **run_info(),
    }
    write_json(args.out, out)
    brief = {**out, "results": {lib: {k: v for k, v in r.items() if k not in ("step_seconds", "step_fvu")}
                                for lib, r in results.items()}}  # fmt: skip
    print(json.dumps(brief, indent=2))


if __name__ == "__main__":
    main()
