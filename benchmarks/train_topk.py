"""TopK training throughput on CPU (d=576, m=4608, k=32, batch 4096, Adam), against the fp32 matmul peak.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/train_topk.py [--threads 2] [--steps 10]

The FLOP floor of a TopK step with a sparse decoder is 4*d*m per token: the encoder matmul forward
(2*d*m) and its weight gradient (2*d*m). Peak is measured here with the same matmul shape.
"""

from __future__ import annotations

import argparse
import time

import torch

from lmscope.dictionaries import DictConfig, build
from lmscope.training import RunSpec, TensorSource, TrainConfig, Trainer


def matmul_peak(batch: int, d: int, m: int, reps: int = 5) -> float:
    a, b = torch.randn(batch, d), torch.randn(d, m)
    a @ b
    best = float("inf")
    for _ in range(reps):  # best of reps: the machine's peak, not its noise
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * batch * d * m / best


def dense_reference_step_time(cfg: DictConfig, x: torch.Tensor, steps: int) -> float:
    """Median step time of plain autograd on dense latents (what SAELens-style code does), for comparison."""
    d = build(cfg, seed=0)
    opt = torch.optim.Adam(d.parameters(), lr=1e-4)
    batch = x.shape[0] // (steps + 2)
    times = []
    for i in range(steps + 2):
        xb = x[i * batch : (i + 1) * batch]
        t = time.perf_counter()
        pre = (xb - d.b_dec) @ d.W_enc + d.b_enc
        vals, idx = pre.topk(cfg.k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
        loss = (z @ d.W_dec + d.b_dec - xb).pow(2).sum(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        d.post_step()
        times.append(time.perf_counter() - t)
    return sorted(times[2:])[len(times[2:]) // 2]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--m", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--dense", action="store_true", help="also time the dense-autograd reference")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    d, m, k, batch = args.d, args.m, args.k, args.batch
    x = torch.randn((args.steps + 2) * batch, d)
    cfg = DictConfig(arch="topk", d_in=d, d_sae=m, k=k)
    tc = TrainConfig(total_tokens=(args.steps + 2) * batch, warmup_steps=1, b_dec_init="mean")
    trainer = Trainer([RunSpec(cfg)], tc)
    times: list[float] = []
    last = [time.perf_counter()]

    def tick(_: Trainer) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    trainer.fit(TensorSource(x, batch_size=batch), on_step=tick)
    step = sorted(times[2:])[len(times[2:]) // 2]  # median step, after two warm-up steps
    tok_s = batch / step
    peak = matmul_peak(batch, d, m)
    floor = peak / (4 * d * m)
    print(f"threads {args.threads}  d {d}  m {m}  k {k}  batch {batch}")
    print(f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s -> 4dm limit {floor:,.0f} tok/s")
    print(f"TopK training {tok_s:,.0f} tok/s ({step * 1e3:.0f} ms/step) = {tok_s / floor:.0%} of the 4dm limit")
    if args.dense:
        ref = batch / dense_reference_step_time(cfg, x, args.steps)
        print(f"dense autograd reference {ref:,.0f} tok/s = {ref / floor:.0%} of the 4dm limit")


if __name__ == "__main__":
    main()
