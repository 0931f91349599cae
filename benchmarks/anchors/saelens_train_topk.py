"""SAELens TopK SAE training on cached activations. Runs INSIDE benchmarks/.venv-anchors.

    benchmarks/.venv-anchors/bin/python benchmarks/anchors/saelens_train_topk.py --acts acts.safetensors \
        --train-tokens 196608 [--d-sae 4608 --k 32 --batch-size 4096]

Uses SAELens' own `SAETrainer` + `TopKTrainingSAE` (fp32, no autocast) with a data provider that yields the
cached rows in order, batch by batch: Adam, gradient clipping at 1, activations scaled to mean norm sqrt(d_in)
("expected_average_only_in", estimated on the first batches), constant LR with linear warmup and a linear
decay over the last 20% of steps, AuxK with a 1/32 coefficient. Step times come from a wrapper around the
trainer's public `step` (norm estimation and setup excluded). SAELens' default b_dec init (zeros) is kept.
Prints one JSON object; with --serve, steps are paced by the caller (see _common.StepGate).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from importlib.metadata import version

import torch
from _common import StepGate, fvu, load_acts, rate, report, train_args
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer


def main() -> None:
    args = train_args(__doc__)
    t_setup = time.perf_counter()
    x, x_eval = load_acts(args)
    steps = x.shape[0] // args.batch_size
    torch.manual_seed(args.seed)
    sae = TopKTrainingSAE(
        TopKTrainingSAEConfig(
            d_in=x.shape[1], d_sae=args.d_sae, k=args.k, dtype="float32", device="cpu",
            normalize_activations="expected_average_only_in", aux_loss_coefficient=1 / 32,
        )
    )  # fmt: skip
    n_norm = min(steps, 8)

    def provider() -> Iterator[torch.Tensor]:
        yield from x[: n_norm * args.batch_size].split(args.batch_size)  # read by the norm estimate
        yield from x.split(args.batch_size)  # then training starts at row 0

    data = provider()
    trainer = SAETrainer(
        SAETrainerConfig(
            total_training_samples=x.shape[0], train_batch_size_samples=args.batch_size, lr=args.lr, lr_end=args.lr,
            lr_warm_up_steps=args.warmup_steps, lr_decay_steps=steps // 5, device="cpu", autocast=False,
            logger=LoggingConfig(log_to_wandb=False), n_batches_for_norm_estimate=n_norm,
        ),
        sae,
        data,
    )  # fmt: skip
    gate = StepGate(args.serve)
    fvus: list[float] = []
    step = trainer.step

    def timed_step(batch: torch.Tensor) -> object:
        gate.start()
        out = step(batch)
        gate.stop()
        fvus.append(fvu(out.sae_in.detach(), out.sae_out.detach()))  # the scaled batch: FVU is scale-free
        return out

    trainer.step = timed_step  # type: ignore[method-assign]
    setup_s = time.perf_counter() - t_setup
    gate.ready()
    t0 = time.perf_counter()
    trained = trainer.fit()  # folds the activation scaling into the weights at the end
    train_s = time.perf_counter() - t0

    with torch.no_grad():
        trained.eval()
        final = fvu(x_eval, trained(x_eval))
    report(
        {
            "library": "sae_lens",
            "version": version("sae-lens"),
            "arch": "topk",
            "d_in": x.shape[1],
            "d_sae": args.d_sae,
            "k": args.k,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "warmup_steps": args.warmup_steps,
            "steps": len(gate.seconds),
            "train_tokens": trainer.n_training_samples,
            "tokens_per_s": rate(gate.seconds, args.batch_size),
            "train_seconds": sum(gate.seconds),
            "wall_seconds": train_s,
            "step_seconds": gate.seconds,
            "setup_seconds": setup_s,
            "final_fvu": final,
            "eval_tokens": x_eval.shape[0],
            "last_batch_fvu": fvus[-1],
            "dead_frac": float(trainer.dead_neurons.float().mean()),
            "normalisation": "expected_average_only_in (mean norm sqrt(d_in), folded after training)",
        }
    )


if __name__ == "__main__":
    main()
