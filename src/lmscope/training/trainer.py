"""The training loop: several dictionaries from one stream of activation batches.

The loop consumes any `BatchSource`: an iterable of batches plus the mean L2 norm of the activations. A batch
is a tensor [tokens, d_in] (autoencoders), a pair (x [tokens, d_in], y [tokens, d_out]) (transcoders), or a
mapping hook -> tensor (several hooks at once; each run picks its `hook` / `hook_out`). Inputs are scaled so
that their mean norm is sqrt(width); the saved dictionaries have that scale folded in and take raw activations.

Recipe: Adam, linear LR warmup and decay, b_dec from the geometric median (or mean) of the first batch, the
decoder initialised as the encoder's transpose with unit-norm rows (constrained after each step for TopK,
BatchTopK and JumpReLU; free for ReLU, whose L1 is weighted by decoder norm), gradient clipping, dead latents
tracked over a window of tokens.

Progress goes to a callback (`fit(..., progress=...)`, see lmscope.core.progress): one task per run, counted
in steps, with the run's latest figures; the library draws nothing itself.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from lmscope.core.allocator import keep_freed_blocks
from lmscope.core.progress import ProgressCallback, ProgressEvent, emit, resolve
from lmscope.dictionaries.base import DictConfig, Dictionary, DictionaryError, LossState, architecture, build
from lmscope.dictionaries.formats import save_dictionary
from lmscope.dictionaries.metrics import fvu, fvu_from_sse
from lmscope.training import distributed as ddp
from lmscope.training.checkpoint import (
    CHECKPOINT,
    load_checkpoint,
    load_optimizer_state,
    optimizer_state,
    save_checkpoint,
)
from lmscope.training.clipping import clipped_step
from lmscope.training.dead import DeadTracker
from lmscope.training.health import HealthMonitor
from lmscope.training.init import init_b_dec, norm_scale
from lmscope.training.metrics import Meter, MetricsLog, read_log
from lmscope.training.schedule import Schedule
from lmscope.training.sparsity_control import SparsityController, controller_for

Batch = Tensor | tuple[Tensor, Tensor] | Mapping[str, Tensor]


@runtime_checkable
class BatchSource(Protocol):
    """What the trainer consumes. `mean_norm` is a float, or a mapping hook -> float for mapping batches.

    Transcoder sources may also have `mean_norm_out` (the target's mean norm). A source may define
    `iter_from(step)` to resume at batch `step` cheaply; otherwise the trainer skips batches on resume.
    """

    @property
    def mean_norm(self) -> float | Mapping[str, float]: ...

    def __iter__(self) -> Iterator[Batch]: ...


class TensorSource:
    """An in-memory BatchSource: consecutive slices of a tensor (or of an (x, y) pair), in order."""

    def __init__(self, x: Tensor, y: Tensor | None = None, batch_size: int = 4096, epochs: int = 1) -> None:
        self.x, self.y, self.batch_size, self.epochs = x, y, batch_size, epochs
        self.mean_norm = float(x.float().norm(dim=-1).mean())
        self.mean_norm_out = float(y.float().norm(dim=-1).mean()) if y is not None else None

    def __len__(self) -> int:
        return self.epochs * (self.x.shape[0] // self.batch_size)

    def iter_from(self, step: int) -> Iterator[Batch]:
        per_epoch = self.x.shape[0] // self.batch_size
        for i in range(step, len(self)):
            s = (i % per_epoch) * self.batch_size
            xb = self.x[s : s + self.batch_size]
            yield xb if self.y is None else (xb, self.y[s : s + self.batch_size])

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)


@dataclass
class RunSpec:
    """One dictionary to train from the shared stream."""

    dict_cfg: DictConfig
    name: str | None = None
    lr: float | None = None  # None: default_lr(dict_cfg)
    # the seed of the initial weights; None: the trainer's seed + the run's position, so runs side by side differ.
    # Comparisons set one seed for all, so every run starts from the same draws whatever trains beside it.
    init_seed: int | None = None

    def resolved_name(self) -> str:
        if self.name:
            return self.name
        c = self.dict_cfg
        parts = [c.hook or "", c.arch, f"m{c.d_sae}", architecture(c.arch).run_name_tag(c)]
        return "-".join(p for p in parts if p)


@dataclass
class TrainConfig:
    total_tokens: int
    warmup_steps: int = 1000
    decay_frac: float = 0.2
    min_lr_frac: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0
    b_dec_init: str = "geometric_median"  # or "mean", "zeros"
    normalize: bool = True  # scale inputs to mean norm sqrt(width) using the source's mean_norm
    dead_window_tokens: int = 10_000_000
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 0  # steps between checkpoints; 0: only at the end
    progress_bar: bool | None = None  # deprecated and ignored (saved configs still load): pass fit(progress=...)
    wandb_project: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.progress_bar:
            warnings.warn(
                "TrainConfig.progress_bar is deprecated and ignored: the trainer no longer draws a bar; pass a "
                "callback to Trainer.fit(progress=...), e.g. lmscope.cli.progress.RichProgress()",
                DeprecationWarning,
                stacklevel=3,
            )


def default_lr(cfg: DictConfig) -> float:
    """The architecture's published default (`Dictionary.default_lr`): e.g. TopK 2e-4 / sqrt(d_sae / 2^14)."""
    return architecture(cfg.arch).default_lr(cfg)


class _LossModule(nn.Module):
    """What DDP wraps: the dictionary's training loss as a forward pass."""

    def __init__(self, dictionary: Dictionary) -> None:
        super().__init__()
        self.dictionary = dictionary

    def forward(
        self, x: Tensor, y: Tensor, step: int, total: int, dead: Tensor, coeff: float | None
    ) -> tuple[Any, ...]:
        state = LossState(progress=step / total, step=step, total_steps=total, dead_mask=dead, sparsity_coeff=coeff)
        out = self.dictionary.training_loss(x, y, state)
        return out.loss, out.recon, out.fired, out.l0, out.terms


@dataclass
class _Run:
    name: str
    spec: RunSpec
    lr: float
    dictionary: Dictionary
    dead: DeadTracker
    scale_in: float = 1.0
    scale_out: float = 1.0
    module: nn.Module | None = None
    opt: torch.optim.Optimizer | None = None
    meter: Meter = field(default_factory=Meter)
    stats: str = ""  # the latest log line's figures, for progress events
    record: dict[str, Any] = field(default_factory=dict)  # the latest metrics record
    control: SparsityController | None = None  # cfg.target_l0 set: chooses the sparsity coefficient of each step
    health: HealthMonitor | None = None
    notes: list[str] = field(default_factory=list)  # new health warnings, for the next progress event


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


class Trainer:
    def __init__(
        self,
        runs: Sequence[RunSpec | DictConfig],
        cfg: TrainConfig,
        out_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if not runs:
            raise DictionaryError("nothing to train: pass at least one dictionary config")
        if cfg.total_tokens < 1:
            raise DictionaryError(f"total_tokens must be positive, got {cfg.total_tokens}")
        specs = [r if isinstance(r, RunSpec) else RunSpec(r) for r in runs]
        names = [s.resolved_name() for s in specs]
        if len(set(names)) != len(names):
            raise DictionaryError(f"two runs share a name ({names}); give each RunSpec a distinct name")
        self.cfg = cfg
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.device = torch.device(device)
        self.runs = [
            _Run(
                name=n,
                spec=s,
                lr=s.lr if s.lr is not None else default_lr(s.dict_cfg),
                dictionary=build(s.dict_cfg, seed=cfg.seed + i if s.init_seed is None else s.init_seed).to(self.device),
                dead=DeadTracker(s.dict_cfg.d_sae, cfg.dead_window_tokens),
                health=HealthMonitor(s.dict_cfg),
            )
            for i, (s, n) in enumerate(zip(specs, names, strict=True))
        ]
        self.step = 0
        self.tokens = 0
        self.total_steps = 0
        self.batch_tokens = 0  # tokens per (global) batch, recorded in checkpoints: a resume must keep it
        self.log: MetricsLog | None = None

    # ------------------------------------------------------------------ data
    def _pick(self, batch: Batch, run: _Run) -> tuple[Tensor, Tensor]:
        c = run.spec.dict_cfg
        if isinstance(batch, Mapping):
            for key in (c.hook, c.hook_out if c.is_transcoder else c.hook):
                if key not in batch:
                    raise DictionaryError(f"run {run.name} reads hook {key!r} but the batch has {sorted(batch)}")
            x = batch[c.hook]  # type: ignore[index]
            y = batch[c.hook_out] if c.is_transcoder else x  # type: ignore[index]
        elif isinstance(batch, tuple | list):
            x, y = batch
        else:
            if c.is_transcoder:
                raise DictionaryError(f"run {run.name} is a transcoder but the source yields single tensors")
            x = y = batch
        same = y is x
        x = _flat(x)
        y = x if same else _flat(y)
        if x.shape[-1] != c.d_in or y.shape[-1] != c.d_out:
            raise DictionaryError(
                f"run {run.name} expects widths {c.d_in} -> {c.d_out}, the source gives {x.shape[-1]} -> {y.shape[-1]}"
            )
        return x, y

    def _scales(self, source: BatchSource, run: _Run) -> tuple[float, float]:
        if not self.cfg.normalize:
            return 1.0, 1.0
        c = run.spec.dict_cfg
        mn = source.mean_norm
        mean_in = mn[c.hook] if isinstance(mn, Mapping) else mn  # type: ignore[index]
        if not c.is_transcoder:
            s = norm_scale(float(mean_in), c.d_in)
            return s, s
        mean_out: float | None
        if isinstance(mn, Mapping):
            mean_out = mn[c.hook_out]  # type: ignore[index]
        else:
            mean_out = getattr(source, "mean_norm_out", None)
            if mean_out is None:
                raise DictionaryError("a transcoder source must report mean_norm_out (the target's mean norm)")
        return norm_scale(float(mean_in), c.d_in), norm_scale(float(mean_out), int(c.d_out or c.d_in))

    @staticmethod
    def _iterate(source: BatchSource, start: int) -> Iterator[Batch]:
        if start and hasattr(source, "iter_from"):
            yield from source.iter_from(start)
            return
        for i, batch in enumerate(source):
            if i >= start:
                yield batch

    # ------------------------------------------------------------------ setup
    def _setup(self, run: _Run, first: Batch | None) -> None:
        d = run.dictionary
        if first is not None:
            _x, y = self._pick(first, run)
            init_b_dec(d, y.to(self.device).float() * run.scale_out, self.cfg.b_dec_init)
        run.module = ddp.wrap(_LossModule(d), self.device)
        # the fused (single-kernel) Adam: on CPU it is several times faster than the per-op one
        fused = self.device.type in ("cpu", "cuda")
        run.opt = torch.optim.Adam(d.parameters(), lr=run.lr, betas=self.cfg.betas, fused=fused)

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path | None:
        return self.out_dir / CHECKPOINT if self.out_dir is not None else None

    def save_checkpoint(self) -> None:
        path = self.checkpoint_path
        if path is None or not ddp.is_main():
            ddp.barrier()
            return
        tensors: dict[str, Tensor] = {}
        runs_meta = {}
        for run in self.runs:
            assert run.opt is not None
            for k, v in run.dictionary.state_dict().items():
                tensors[f"{run.name}/model/{k}"] = v
            opt_t, groups = optimizer_state(run.opt, f"{run.name}/optim")
            tensors.update(opt_t)
            for k, v in run.dead.state().items():
                tensors[f"{run.name}/dead/{k}"] = v
            runs_meta[run.name] = {
                "dict_cfg": run.spec.dict_cfg.to_dict(),
                "lr": run.lr,
                "scale_in": run.scale_in,
                "scale_out": run.scale_out,
                "param_groups": groups,
                "control": run.control.state() if run.control is not None else None,
            }
        meta = {
            "step": self.step,
            "tokens": self.tokens,
            "total_steps": self.total_steps,
            "batch_tokens": self.batch_tokens,
            "train_cfg": asdict(self.cfg),
            "runs": runs_meta,
        }
        save_checkpoint(path, tensors, meta)
        ddp.barrier()

    def _resume(self, source: BatchSource) -> bool:
        path = self.checkpoint_path
        if path is None or not path.is_file():
            return False
        tensors, meta = load_checkpoint(path)
        if set(meta["runs"]) != {r.name for r in self.runs}:
            raise DictionaryError(
                f"the checkpoint in {self.out_dir} trains {sorted(meta['runs'])}, not {[r.name for r in self.runs]}; "
                "use another --out directory or the same runs"
            )
        for run in self.runs:
            rm = meta["runs"][run.name]
            if DictConfig.from_dict(rm["dict_cfg"]).to_dict() != run.spec.dict_cfg.to_dict():  # defaults filled in
                raise DictionaryError(f"run {run.name}: its config differs from the checkpoint's; use another --out")
            run.scale_in, run.scale_out = rm["scale_in"], rm["scale_out"]
            prefix = f"{run.name}/model/"
            state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            run.dictionary.load_state_dict(state)
            self._setup(run, None)
            assert run.opt is not None
            load_optimizer_state(run.opt, tensors, f"{run.name}/optim", rm["param_groups"])
            dprefix = f"{run.name}/dead/"
            run.dead.load({k[len(dprefix) :]: v for k, v in tensors.items() if k.startswith(dprefix)})
            run.control = controller_for(run.spec.dict_cfg, meta["total_steps"])
            if run.control is not None:
                run.control.load(rm.get("control") or {})
        self.step, self.tokens, self.total_steps = meta["step"], meta["tokens"], meta["total_steps"]
        self.batch_tokens = int(meta.get("batch_tokens", 0))  # 0: a checkpoint from before it was recorded
        return True

    # ------------------------------------------------------------------ the loop
    def _train_step(self, run: _Run, x: Tensor, y: Tensor, global_tokens: int, schedule: Schedule) -> dict[str, float]:
        assert run.module is not None and run.opt is not None
        d = run.dictionary
        lr = run.lr * schedule.factor(self.step)
        for group in run.opt.param_groups:
            group["lr"] = lr
        xs = ddp.shard(x).to(self.device, torch.float32) * run.scale_in
        ys = xs if y is x else ddp.shard(y).to(self.device, torch.float32) * run.scale_out
        dead = run.dead.dead_mask().to(self.device)
        coeff = run.control.coeff if run.control is not None else None
        loss, recon, fired, l0, terms = run.module(xs, ys, self.step, max(1, self.total_steps), dead, coeff)
        loss.backward()
        dec_sq = d.remove_parallel_grad()  # the projected gradient's squared norm, where it came in that pass
        known = {id(d.W_dec): dec_sq} if dec_sq is not None else None
        clipped_step(run.opt, list(d.parameters()), self.cfg.grad_clip, known)
        run.opt.zero_grad(set_to_none=True)
        d.post_step()
        run.dead.update(ddp.all_reduce_sum(fired.detach().clone()), global_tokens)
        if run.control is not None:  # every rank steers by the global L0, so all keep one coefficient
            run.control.update(float(ddp.all_reduce_sum(l0.detach().clone())) / ddp.world_size())
        if "mse" in terms:  # the loss's squared error, summed over the width and averaged over tokens: reused
            step_fvu = float(fvu_from_sse(float(terms["mse"]) * _flat(ys).shape[0], ys))
        else:
            step_fvu = float(fvu(ys, recon.detach()))
        return {
            "loss": float(loss.detach()),
            "fvu": step_fvu,
            "l0": float(l0),
            "lr": lr,
            **{k: float(v) for k, v in terms.items()},
            **({"coeff": coeff} if coeff is not None else {}),
        }

    def fit(
        self,
        source: BatchSource,
        resume: bool = True,
        on_step: Callable[[Trainer], None] | None = None,
        progress: ProgressCallback | bool | None = None,
    ) -> dict[str, Dictionary]:
        """Train every run on `source` until `total_tokens`; returns the dictionaries (normalisation folded).

        `progress` receives one task per run (its name; unit "steps", total the step count), on the main rank.
        """
        report = resolve(progress) if ddp.is_main() else None
        if self.device.type == "cpu":  # step-sized gradients and temporaries stay in the heap (core/allocator.py)
            keep_freed_blocks()
        resumed = resume and self._resume(source)
        if self.out_dir is not None and ddp.is_main():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.log = MetricsLog(self.out_dir / "metrics.jsonl", self.cfg.wandb_project, asdict(self.cfg))
            self.log.truncate_after(self.step)  # a resumed run logs the steps after its checkpoint again
            if resumed and self.log.path is not None and self.log.path.exists():  # its health history too
                logged = read_log(self.log.path)
                for run in self.runs:
                    if run.health is not None:
                        run.health.restore([r for r in logged if r.get("run") == run.name], self.total_steps)
        if not resumed:
            for run in self.runs:
                run.scale_in, run.scale_out = self._scales(source, run)
        schedule: Schedule | None = None
        t0, tok0 = time.perf_counter(), self.tokens
        self._report(report)
        for batch in self._iterate(source, self.step):
            if self.tokens >= self.cfg.total_tokens:
                break
            picked = [self._pick(batch, run) for run in self.runs]
            n_tok = picked[0][0].shape[0]
            if schedule is None:
                # The step counter indexes batches: resumed with another batch size, the run would skip the wrong
                # number of rows and follow a schedule made for other steps, silently.
                if resumed and self.batch_tokens and n_tok != self.batch_tokens:
                    raise DictionaryError(
                        f"the checkpoint in {self.out_dir} was trained on batches of {self.batch_tokens:,} tokens but "
                        f"this run's are {n_tok:,}: resume with the same --batch-size, or pass --no-resume (or "
                        "another --out) to start afresh"
                    )
                self.batch_tokens = n_tok
                if not self.total_steps:
                    self.total_steps = math.ceil(self.cfg.total_tokens / n_tok)
                schedule = Schedule(self.total_steps, self.cfg.warmup_steps, self.cfg.decay_frac, self.cfg.min_lr_frac)
                for run in self.runs:
                    if run.module is None:
                        torch.manual_seed(self.cfg.seed)
                        self._setup(run, batch)
                        run.control = controller_for(run.spec.dict_cfg, self.total_steps)
            for run, (x, y) in zip(self.runs, picked, strict=True):
                run.meter.add(self._train_step(run, x, y, n_tok, schedule))
            self.step += 1
            self.tokens += n_tok
            if self.step % self.cfg.log_every == 0 or self.tokens >= self.cfg.total_tokens:
                self._log((self.tokens - tok0) / max(1e-9, time.perf_counter() - t0))
            self._report(report)
            if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                self.save_checkpoint()
            if on_step is not None:
                on_step(self)
        if self.step == 0:
            raise DictionaryError("the activation source yielded no batches; check the --acts directory")
        if any(run.meter.n for run in self.runs):  # the source ran out between two log lines
            self._log((self.tokens - tok0) / max(1e-9, time.perf_counter() - t0))
        self._report(report, finished=True)
        if self.tokens < self.cfg.total_tokens and ddp.is_main():
            warnings.warn(
                f"the activation source ran out after {self.tokens:,} of {self.cfg.total_tokens:,} tokens, so the LR "
                "never finished its decay; harvest more tokens or pass more epochs (--epochs)",
                stacklevel=2,
            )
        self.save_checkpoint()
        if self.log is not None:
            self.log.close()
        return self.finish()

    def _report(self, progress: ProgressCallback | None, finished: bool = False) -> None:
        """One progress event per run: where it stands in steps, with its latest figures and new health warnings."""
        if progress is None:
            for run in self.runs:
                run.notes.clear()
            return
        for run in self.runs:
            event = ProgressEvent(
                task=run.name, done=self.step, total=self.total_steps or None, unit="steps", stats=run.stats,
                finished=finished, info=dict(run.record), notes=tuple(f"{run.name}: {n}" for n in run.notes),
            )  # fmt: skip
            run.notes.clear()
            emit(progress, event)

    def _log(self, rate: float) -> None:
        for run in self.runs:
            m = run.meter.mean()
            run.meter.reset()
            dead = run.dead.dead_fraction()
            record = {"step": self.step, "tokens": self.tokens, "run": run.name, **m, "dead_frac": dead, "tok_s": rate}
            if run.health is not None:  # the health line, and the warnings that are new for the progress callback
                run.notes += [f"warning: {w}" for w in run.health.log(record, self.step / max(1, self.total_steps))]
            if self.log is not None:
                self.log.log(record)
            run.record = record
            run.stats = f"L0 {m.get('l0', 0):.1f}  FVU {m.get('fvu', 0):.3f}  dead {dead:.1%}  {rate:,.0f} tok/s"

    def finish(self) -> dict[str, Dictionary]:
        """Fold each run's normalisation into a copy of its weights, save it under out_dir/<run>, return them."""
        out: dict[str, Dictionary] = {}
        for run in self.runs:
            d = copy.deepcopy(run.dictionary).cpu().eval()
            d.fold_scale(run.scale_in, run.scale_out)
            normalization = {
                "kind": "mean_norm" if self.cfg.normalize else "none",
                "scale_in": run.scale_in,
                "scale_out": run.scale_out,
                "folded": True,
            }
            training = {
                "steps": self.step,
                "tokens": self.tokens,
                "lr": run.lr,
                "world_size": ddp.world_size(),
                "train_cfg": asdict(self.cfg),
                "dead_frac": run.dead.dead_fraction(),
                "health": run.health.summary() if run.health is not None else {},
            }
            if run.control is not None:  # the saved config holds the coefficient the controller ended with
                setattr(d.cfg, str(d.controlled_coeff), run.control.coeff)
                training["sparsity_control"] = run.control.state()
            d.metadata = {"normalization": normalization, "training": training}  # type: ignore[assignment]
            if self.out_dir is not None and ddp.is_main():
                save_dictionary(d, self.out_dir / run.name, normalization, training)
            out[run.name] = d
        ddp.barrier()
        return out
