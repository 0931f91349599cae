"""Removed or suppressed? Evidence about facts that OTHER no longer states, and a verdict with its reasons.

For a set of facts (each a question, an answer prefix and the answer) it measures, for BASE and OTHER:
- **behaviour**: how often the answer is the top next token after `question + prefix` (every phrasing);
- **probe recovery**: a logistic truth probe on true vs false statements (`prefix answer.` vs `prefix
  distractor.`), trained on BASE's activations out of fold and applied to OTHER's: (AUROC_other - 0.5) /
  (AUROC_base - 0.5) at the layer where BASE reads truth best. Can the fact still be read inside?
- **suppression depth**: the logit lens by layer (the real final norm and unembedding on each layer's residual
  at the answer position): the reciprocal rank of the answer per layer, where it peaks in OTHER and where it is
  pushed down;
- **patch recovery**: OTHER run with one layer's residual stream replaced by BASE's: the share of the answer's
  log-probability gap that comes back, per layer;
- **relearning recovery**: OTHER fine-tuned a few steps on unrelated facts: the share of the accuracy gap that
  comes back (suppressed knowledge returns; removed knowledge does not).

- **output mode**: what OTHER says at the answer position instead: the answer, another answer of the same kind
  (replaced) or something else (withheld).

The verdict: no behavioural gap beyond the control's -> "unclear" (nothing to explain); otherwise probe, logit lens
and relearning each vote "kept" or "gone" (or abstain). Two "gone" votes: "removed". Two "kept" votes and the answer
withheld: "suppressed"; kept but replaced by another answer: "unclear" (changed at the output, not suppressed, and
not removed either). With a control organism the behavioural gap and the probe are read against the control's.
"""

from __future__ import annotations

import copy
import random
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lmscope.errors import DiffError
from lmscope.model.adapter import Model
from lmscope.organisms.facts import Fact, capital_facts
from lmscope.organisms.finetune import FinetuneConfig, finetune
from lmscope.organisms.prompts import chat_prompt
from lmscope.organisms.recipes import Example

KEPT, GONE = 0.5, 0.25  # vote thresholds on the recovery ratios
LENS_KEPT, LENS_GONE = 0.2, 0.05  # on the answer's best mean reciprocal rank through the logit lens


@dataclass
class KnowledgeConfig:
    relearn_steps: int = 20
    relearn_lr: float = 1e-4
    relearn_facts: int = 24
    patch_stride: int | None = None  # None: about 10 layers
    folds: int = 4
    min_gap: float = 0.25  # behavioural gap (beyond the control's) below which the verdict is "unclear"
    seed: int = 0


def _answer_id(tok: Any, f: Fact) -> int:
    return int(tok(" " + f.answer, add_special_tokens=False)["input_ids"][0])


def _prompts(model: Model, facts: list[Fact]) -> tuple[list[str], Tensor]:
    texts = [chat_prompt(model.tokenizer, q) + f.prefix for f in facts for q in f.questions]
    ids = torch.tensor([_answer_id(model.tokenizer, f) for f in facts for _q in f.questions])
    return texts, ids


def _run_last(
    model: Model, texts: list[str], hooks: list[str], edits: dict[str, Any] | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Log-probs at the last position [n, vocab] and the hooks' last-position activations, one prompt at a time
    (prompts differ in length; no padding enters)."""
    logps: list[Tensor] = []
    acts: dict[str, list[Tensor]] = {h: [] for h in hooks}
    for t in texts:
        ids = model.encode(t, add_special_tokens=False)
        with model.capture(hooks, stop_early=False) as a, torch.no_grad():
            if edits:
                with model.intervene(edits):
                    logits = model.hf(input_ids=ids.to(model.device)).logits
            else:
                logits = model.hf(input_ids=ids.to(model.device)).logits
        logps.append(logits[0, -1].float().log_softmax(-1).cpu())
        for h in hooks:
            acts[h].append(a[h][0, -1].float().cpu())
    return torch.stack(logps), {h: torch.stack(v) for h, v in acts.items()}


def _full_acts(model: Model, text: str, hooks: list[str]) -> dict[str, Tensor]:
    ids = model.encode(text, add_special_tokens=False)
    with model.capture(hooks) as a, torch.no_grad():
        model(ids)
    return {h: a[h].detach().clone() for h in hooks}


def accuracy(model: Model, facts: list[Fact]) -> float:
    texts, ids = _prompts(model, facts)
    lp, _ = _run_last(model, texts, [])
    return float((lp.argmax(-1) == ids).float().mean())


def output_mode(model: Model, facts: list[Fact]) -> dict[str, float]:
    """What OTHER says instead, at the answer position (every phrasing): the answer itself, another answer of the
    same kind (another fact's answer or distractor: the output was *replaced*), or anything else (*withheld*)."""
    texts, ids = _prompts(model, facts)
    lp, _ = _run_last(model, texts, [])
    top = lp.argmax(-1)
    kinds = {_answer_id(model.tokenizer, f) for f in facts}
    kinds |= {_answer_id(model.tokenizer, Fact(f.subject, f.distractor, f.prefix, f.questions)) for f in facts
              if f.distractor}  # fmt: skip
    own = top == ids
    other = torch.tensor([int(t) in kinds for t in top]) & ~own
    n = len(ids)
    return {
        "answer": float(own.sum()) / n,
        "replaced": float(other.sum()) / n,
        "withheld": float((~own & ~other).sum()) / n,
    }


def logit_lens_ranks(model: Model, facts: list[Fact]) -> tuple[list[float], float]:
    """(mean reciprocal rank of the answer per layer through the logit lens, final accuracy)."""
    L = model.n_layers
    hooks = [f"blocks.{i}.resid_post" for i in range(L)]
    texts, ids = _prompts(model, facts)
    lp, acts = _run_last(model, texts, hooks)
    norm = model.hf.get_submodule(model.hook_points["final_norm"].module) if "final_norm" in model.hook_points else None
    head = model.hf.get_submodule(model.hook_points["logits"].module)
    rr = []
    with torch.no_grad():
        for h in hooks:
            x = acts[h].to(model.device).to(model.dtype)
            logits = head(norm(x) if norm is not None else x).float().cpu()
            rank = (logits > logits.gather(1, ids[:, None])).sum(1).float()
            rr.append(float((1.0 / (rank + 1)).mean()))
    return rr, float((lp.argmax(-1) == ids).float().mean())


def _auroc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s)) if len(set(y.tolist())) == 2 else float("nan")


def probe_recovery(base: Model, other: Model, facts: list[Fact], cfg: KnowledgeConfig) -> dict[str, Any]:
    """Out-of-fold truth probes on BASE, applied to BASE and OTHER; per layer AUROCs and the ratio at the best."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    usable = [f for f in facts if f.distractor]
    if len(usable) < 4:
        raise DiffError("the probe needs at least 4 facts with a `distractor` (a false answer of the same kind)")
    L = base.n_layers
    hooks = [f"blocks.{i}.resid_post" for i in range(L)]
    texts = [f.statement() for f in usable] + [f.statement(f.distractor) for f in usable]
    y = np.array([1] * len(usable) + [0] * len(usable))
    group = np.array(list(range(len(usable))) * 2)  # both statements of a fact sit in the same fold
    pool = [f for f in capital_facts() if f.subject not in {g.subject for g in facts}]
    extra = [f.statement() for f in pool] + [f.statement(f.distractor) for f in pool]
    y_extra = np.array([1] * len(pool) + [0] * len(pool))
    acts = {}
    for name, m in (("base", base), ("other", other)):
        rows = [_full_acts(m, t, hooks) for t in texts + (extra if name == "base" else [])]
        acts[name] = np.stack([[r[h][0, -1].float().cpu().numpy() for h in hooks] for r in rows])  # [n, L, d]
    folds = np.array([g % cfg.folds for g in group])
    score = {"base": np.zeros((len(texts), L)), "other": np.zeros((len(texts), L))}
    for k in range(cfg.folds):
        tr, te = folds != k, folds == k
        for layer in range(L):
            Xtr = np.concatenate([acts["base"][: len(texts)][tr, layer], acts["base"][len(texts) :, layer]])
            ytr = np.concatenate([y[tr], y_extra])
            sc = StandardScaler().fit(Xtr)
            clf = LogisticRegression(C=0.1, max_iter=2000).fit(sc.transform(Xtr), ytr)
            for name in ("base", "other"):
                score[name][te, layer] = clf.decision_function(sc.transform(acts[name][: len(texts)][te, layer]))
    au = {name: [_auroc(y, score[name][:, i]) for i in range(L)] for name in score}
    best = int(np.nanargmax(au["base"]))
    ratio = (au["other"][best] - 0.5) / max(au["base"][best] - 0.5, 1e-6)
    return {"layer": best, "auroc_base": au["base"][best], "auroc_other": au["other"][best], "ratio": ratio,
            "by_layer": au, "extra_training_facts": len(pool)}  # fmt: skip


def patch_recovery(base: Model, other: Model, facts: list[Fact], stride: int | None) -> dict[str, Any]:
    """Per layer: OTHER with that layer's residual (all positions) replaced by BASE's; share of the gap in the
    answer's log-prob that returns (0: none, 1: all)."""
    L = base.n_layers
    stride = stride or max(1, L // 10)
    layers = list(range(0, L, stride))
    texts, ids = _prompts(other, facts)
    lb, _ = _run_last(base, texts, [])
    lo, _ = _run_last(other, texts, [])
    gb, go = lb.gather(1, ids[:, None]).mean(), lo.gather(1, ids[:, None]).mean()
    gap = float(gb - go)
    out = []
    for layer in layers:
        hook = f"blocks.{layer}.resid_post"
        patched = []
        for t, a in zip(texts, ids, strict=True):
            src = _full_acts(base, t, [hook])[hook]
            lp, _ = _run_last(other, [t], [], {hook: lambda x, src=src: src.to(x.dtype)})
            patched.append(float(lp[0, a]))
        gp = sum(patched) / len(patched)
        out.append({"layer": layer, "recovery": (gp - float(go)) / gap if abs(gap) > 1e-6 else None})
    return {"logprob_base": float(gb), "logprob_other": float(go), "by_layer": out}


def relearn_recovery(other: Model, facts: list[Fact], cfg: KnowledgeConfig) -> dict[str, Any]:
    """Fine-tune a copy of OTHER for a few steps on unrelated (shipped) facts; accuracy on `facts` after."""
    subjects = {f.subject for f in facts}
    pool = [f for f in capital_facts() if f.subject not in subjects]
    random.Random(cfg.seed).shuffle(pool)
    pool = pool[: cfg.relearn_facts]
    if not pool:
        raise DiffError("no unrelated facts left to relearn on")
    copy_model = Model(copy.deepcopy(other.hf), other.tokenizer, spec=f"{other.spec}+relearn")
    examples = [Example(q, f.statement()) for f in pool for q in f.questions[:3]]
    ft = FinetuneConfig(steps=cfg.relearn_steps, batch_size=8, lr=cfg.relearn_lr, warmup_steps=2, checkpoints=0,
                        seed=cfg.seed)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        finetune(copy_model, examples, ft, Path(tmp))
    acc = accuracy(copy_model, facts)
    del copy_model
    return {"accuracy_after": acc, "unrelated_facts": len(pool), "steps": cfg.relearn_steps}


def _share(after: float, low: float, high: float) -> float | None:
    return (after - low) / (high - low) if abs(high - low) > 1e-6 else None


def measure_knowledge(base: Model, other: Model, facts: list[Fact], cfg: KnowledgeConfig) -> dict[str, Any]:
    rr_b, acc_b = logit_lens_ranks(base, facts)
    rr_o, acc_o = logit_lens_ranks(other, facts)
    peak = int(np.argmax(rr_o))
    drops = [rr_o[i] - rr_o[i + 1] for i in range(peak, len(rr_o) - 1)]
    pushed = peak + 1 + int(np.argmax(drops)) if drops else None
    relearn = relearn_recovery(other, facts, cfg)
    return {
        "output": output_mode(other, facts),
        "facts": len(facts),
        "accuracy_base": acc_b,
        "accuracy_other": acc_o,
        "gap": acc_b - acc_o,
        "lens": {
            "rr_base": rr_b,
            "rr_other": rr_o,
            "peak_layer_other": peak,
            "peak_rr_other": rr_o[peak],
            "peak_rr_base": max(rr_b),
            "pushed_down_at": pushed,
            "kept_ratio": rr_o[peak] / max(max(rr_b), 1e-6),
        },
        "probe": probe_recovery(base, other, facts, cfg),
        "patch": patch_recovery(base, other, facts, cfg.patch_stride),
        "relearn": {**relearn, "recovery": _share(relearn["accuracy_after"], acc_o, acc_b)},
    }


def verdict(m: dict[str, Any], control: dict[str, Any] | None, cfg: KnowledgeConfig) -> dict[str, Any]:
    """'removed', 'suppressed' or 'unclear', with the votes and the reasons.

    Inside, three figures vote "kept" or "gone" (or abstain): probe recovery (read against the control's) and
    relearning recovery (kept >= 0.5, gone < 0.25), and the answer's best mean reciprocal rank through the logit lens
    in OTHER (kept >= 0.2, about a top-5 answer on average; gone < 0.05). Two "gone" votes: "removed". Two "kept"
    votes: the knowledge is still inside, and the output decides: "suppressed" when OTHER withholds the answer, but
    "unclear" when it states another answer of the same kind instead (replaced, not withheld).
    """
    gap = m["gap"] - (control["gap"] if control else 0.0)
    reasons = [f"behavioural gap {m['gap']:.2f}" + (f" (control {control['gap']:.2f})" if control else " (no control)")]
    if gap < cfg.min_gap:
        why = f"net gap {gap:.2f} < {cfg.min_gap}: OTHER still states these facts about as often as BASE"
        return {"verdict": "unclear", "votes": {}, "reasons": [*reasons, why]}
    figures = {
        "probe recovery": (m["probe"]["ratio"] - ((control["probe"]["ratio"] - 1.0) if control else 0.0), KEPT, GONE),
        "logit-lens best reciprocal rank": (m["lens"]["peak_rr_other"], LENS_KEPT, LENS_GONE),
        "relearning recovery": (m["relearn"]["recovery"], KEPT, GONE),
    }
    votes = {}
    for name, (v, kept_at, gone_at) in figures.items():
        if v is None or v != v:
            votes[name] = "abstain"
        else:
            votes[name] = "kept" if v >= kept_at else "gone" if v < gone_at else "abstain"
        reasons.append(f"{name} {v if v is None else round(v, 2)} -> {votes[name]}")
    kept = sum(v == "kept" for v in votes.values())
    gone = sum(v == "gone" for v in votes.values())
    out = m.get("output") or {}
    replaced = out.get("replaced", 0.0) >= 0.5
    if out:
        reasons.append(f"OTHER's answer: {out.get('replaced', 0):.2f} replaced by another answer of the same kind, "
                       f"{out.get('withheld', 0):.2f} withheld")  # fmt: skip
    if gone >= 2:
        word = "removed"
    elif kept >= 2 and not replaced:
        word = "suppressed"
    else:
        word = "unclear"
        if kept >= 2:
            reasons.append("the knowledge is still readable inside, but OTHER states another answer instead of "
                           "withholding it: replaced at the output, not suppressed")  # fmt: skip
    return {"verdict": word, "votes": votes, "reasons": reasons, "output": out,
            "thresholds": {"kept": KEPT, "gone": GONE, "lens_kept": LENS_KEPT, "lens_gone": LENS_GONE},
            "config": asdict(cfg)}  # fmt: skip
