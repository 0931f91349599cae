"""How true are the labels? Detection and fuzzing scores of each explainer on random live features of an atlas,
against a shuffled-label control (each feature scored with another sampled feature's label).

The stats labels are read by two offline readers, side by side:

- "rule" (`lmscope.explain.scorers.rule_score`): parses the label back into a rule with `lmscope.explain.rules`,
  which knows the stats explainer's own sentence templates ("the tokens ... after ...", "mostly ... in code").
  It is NOT independent of the explainer: a stats label is scored by running the very rule it was written from.
- "quoted_tokens" (defined here): reads only the literal strings quoted in the label ('x' or "x"), normalised
  (whitespace stripped, case folded), and ignores every other word: no templates, classes, contexts or
  qualifiers. Detection predicts "activates" when a window holds a token equal to one of them; fuzzing calls a
  marking right when at least half the marked tokens are. A label that quotes nothing is left unscored
  (`coverage` says how many could be scored). It reads a label from any explainer that names tokens the same
  way, so it is a check independent of the stats explainer's phrasing. It is cruder than the rule: it drops
  qualifiers, and reads the tokens of an "after ..." clause as firing tokens too.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/explain_eval.py --atlas atlas.db            # stats only
    .venv/bin/python benchmarks/explain_eval.py --local --local-features 10                   # + SmolLM2

Without --atlas (or if the file is missing) it builds a small demo atlas first, under --build-dir: SmolLM2-135M
activations at blocks.6.resid_post over --tokens tokens of the built-in stdlib corpus, a TopK dictionary
trained on them for a few epochs, and `build_atlas` over the same tokens. Nothing is written into the atlas
(labels are computed in memory). Results: JSON on stdout and in --out. See docs/explain.md.
"""

from __future__ import annotations

import argparse
import ast
import json
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmscope.atlas import open_atlas
from lmscope.explain.backends import Caller, LocalBackend
from lmscope.explain.evidence import AtlasEvidence, FeatureEvidence
from lmscope.explain.ops import BackendError, JsonCache, OpsConfig, Usage
from lmscope.explain.prompts import explain_messages, parse_label, with_prefill
from lmscope.explain.scorers import (
    ScoreConfig,
    balanced_accuracy,
    detection_items,
    fuzz_items,
    lm_score,
    rule_score,
)
from lmscope.explain.stats_explainer import explain_stats, text_frequencies

HOOK = "blocks.6.resid_post"
RULE_READER = ("offline rule reader (lmscope.explain.rules.parse): parses the label with the stats explainer's own "
               "sentence templates and runs it as a rule, so it reads the stats explainer's own wording; not an "
               "independent judge of stats labels")  # fmt: skip
QUOTED_READER = ("offline quoted-token reader (benchmarks/explain_eval.py): only the literal strings quoted in the "
                 "label, stripped and case-folded; a window activates if one of its tokens equals one of them; no "
                 "templates, classes, contexts or qualifiers")  # fmt: skip
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'" + r'|"(?:[^"\\]|\\.)*"')  # a '...' or "..." literal


def _norm(t: str) -> str:
    return t.strip().casefold() or t  # whitespace-only tokens ("\n", " ") compare as they are


def quoted_strings(label: str) -> set[str]:
    """The normalised string literals quoted in a label (Python-style escapes undone)."""
    out = set()
    for m in _QUOTED.finditer(label):
        try:
            text = ast.literal_eval(m.group(0))
        except (ValueError, SyntaxError):
            text = m.group(0)[1:-1]
        if isinstance(text, str) and text:
            out.add(_norm(text))
    return out


def quoted_token_score(scorer: str, label: str, ev: FeatureEvidence) -> float | None:
    """Detection / fuzzing balanced accuracy of the quoted-token reader; None when the label quotes nothing."""
    names = quoted_strings(label)
    if not names:
        return None
    cfg = ScoreConfig()

    def hits(w: Any) -> np.ndarray:
        return np.array([_norm(t) in names for t in w.tokens], dtype=bool)

    if scorer == "detection":
        items = detection_items(ev, cfg)
        if not items:
            return None
        return balanced_accuracy([y for _, y in items], [int(hits(w).any()) for w, _ in items])
    fz = fuzz_items(ev, cfg)
    if not fz:
        return None
    return balanced_accuracy([y for *_, y in fz], [int(hits(w)[marked].mean() >= 0.5) for w, marked, _ in fz])


def build_demo_atlas(build_dir: Path, tokens: int, d_sae: int, k: int, epochs: int, context: int) -> dict[str, Any]:
    """Harvest, train and build a small atlas on SmolLM2 (CPU-friendly sizes); returns what was done."""
    from lmscope.atlas import AtlasConfig, build_atlas
    from lmscope.corpora import ContextPacker, PackingConfig, open_corpus
    from lmscope.dictionaries import DictConfig
    from lmscope.model.loading import load_model
    from lmscope.training import RunSpec, TensorSource, TrainConfig, Trainer

    t0 = time.time()
    model = load_model("smollm2-135m", device="auto", dtype="float32")
    packer = ContextPacker(model.tokenizer, PackingConfig(context=context))
    xs: list[torch.Tensor] = []
    n = 0
    with model.capture([HOOK], stop_early=True) as acts, torch.inference_mode():
        for batch in packer.contexts(open_corpus("stdlib").documents(), batch_size=8):
            model(torch.from_numpy(batch.tokens))
            x = acts[HOOK].float()[~torch.from_numpy(batch.special).to(acts[HOOK].device)]
            xs.append(x.cpu())
            n += batch.tokens.size
            if n >= tokens:
                break
    x = torch.cat(xs)
    harvest_s = time.time() - t0
    cfg = DictConfig(arch="topk", d_in=model.d_model, d_sae=d_sae, k=k, hook=HOOK, model="smollm2-135m")
    batch = 1024
    tc = TrainConfig(total_tokens=epochs * (x.shape[0] // batch) * batch, warmup_steps=20,
                     b_dec_init="mean", dead_window_tokens=x.shape[0])  # fmt: skip
    trainer = Trainer([RunSpec(cfg, name="sae")], tc, out_dir=build_dir / "dict")
    trainer.fit(TensorSource(x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))],
                             batch_size=batch, epochs=epochs))  # fmt: skip
    trainer.finish()
    train_s = time.time() - t0 - harvest_s
    out = build_atlas(
        model, build_dir / "dict" / "sae", "stdlib", tokens=tokens, out=build_dir / "atlas.db", overwrite=True,
        config=AtlasConfig(tokens=tokens, context=context, top_k=16, samples_per_bin=4), progress=False,
    )  # fmt: skip
    return {"atlas": str(out), "model": "smollm2-135m", "hook": HOOK, "corpus": "stdlib", "tokens": tokens,
            "context": context, "dictionary": {"arch": "topk", "d_sae": d_sae, "k": k, "epochs": epochs,
                                               "train_tokens": int(x.shape[0])},
            "harvest_s": round(harvest_s, 1), "train_s": round(train_s, 1),
            "atlas_s": round(time.time() - t0 - harvest_s - train_s, 1)}  # fmt: skip


def distribution(xs: list[float | None]) -> dict[str, Any]:
    v = np.array([x for x in xs if x is not None], dtype=np.float64)
    if not len(v):
        return {"n": 0}
    q = np.quantile(v, [0.1, 0.25, 0.5, 0.75, 0.9])
    counts, edges = np.histogram(v, bins=np.linspace(0, 1, 11))
    return {
        "n": len(v), "unscored": int(len(xs) - len(v)), "mean": round(float(v.mean()), 4),
        "std": round(float(v.std()), 4), "p10": round(float(q[0]), 4), "p25": round(float(q[1]), 4),
        "median": round(float(q[2]), 4), "p75": round(float(q[3]), 4), "p90": round(float(q[4]), 4),
        "frac_ge_0.8": round(float((v >= 0.8).mean()), 4),
        "histogram": {"edges": [round(float(e), 2) for e in edges], "counts": counts.tolist()},
    }  # fmt: skip


def beats(own: list[float | None], control: list[float | None]) -> dict[str, Any]:
    pairs = [(a, b) for a, b in zip(own, control, strict=True) if a is not None and b is not None]
    if not pairs:
        return {"n": 0}
    a, b = np.array(pairs).T
    return {"n": len(pairs), "beats": round(float((a > b).mean()), 4), "ties": round(float((a == b).mean()), 4),
            "mean_margin": round(float((a - b).mean()), 4)}  # fmt: skip


def evaluate(labels: dict[int, str], evs: dict[int, FeatureEvidence], score: Any) -> dict[str, Any]:
    """Scores of each feature's own label and of a shuffled one (the next sampled feature's label)."""
    feats = list(labels)
    shuffled = {f: labels[feats[(i + 1) % len(feats)]] for i, f in enumerate(feats)}
    out: dict[str, Any] = {"features": len(feats)}
    per: dict[int, dict[str, Any]] = {f: {"label": labels[f]} for f in feats}
    for scorer in ("detection", "fuzzing"):
        own = [score(scorer, labels[f], evs[f]) for f in feats]
        ctl = [score(scorer, shuffled[f], evs[f]) for f in feats]
        for f, a, b in zip(feats, own, ctl, strict=True):
            per[f][scorer], per[f][f"{scorer}_shuffled"] = a, b
        out[scorer] = distribution(own)
        out[f"{scorer}_shuffled"] = distribution(ctl)
        out[f"{scorer}_beats_shuffled"] = beats(own, ctl)
    out["per_feature"] = per
    return out


def _diff(a: list[float | None], b: list[float | None]) -> dict[str, Any]:
    """Paired change b - a (features scored by both)."""
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    if not pairs:
        return {"n": 0}
    d = np.array([y - x for x, y in pairs])
    return {"n": len(d), "mean": round(float(d.mean()), 4), "raised": int((d > 0).sum()),
            "lowered": int((d < 0).sum()), "same": int((d == 0).sum())}  # fmt: skip


def context_comparison(feats: list[int], evs: dict[int, FeatureEvidence], src: AtlasEvidence, stats: dict[int, Any],
                       freq: dict[str, float], seed: int) -> dict[str, Any]:  # fmt: skip
    """Context labels against the token-list labels of the same features, on the same held-out examples (rule
    reader), with the shuffled-label control, and each context part switched off in turn (ablation)."""
    from lmscope.explain.stats_explainer import PARTS, StatsConfig

    def score(scorer: str, rule: Any, f: int) -> float | None:
        return rule_score(scorer, rule, evs[f], kinds=src.kinds).score

    out: dict[str, Any] = {}
    ctx = [f for f in feats if stats[f].rule.extras() > 0]
    out["more_than_token_list"] = {"features": len(ctx), "share": round(len(ctx) / max(1, len(feats)), 4)}
    uses: dict[str, int] = {}
    for f in ctx:
        for c, _v in stats[f].rule.conditions():
            if c not in ("tokens", "class"):
                uses[c] = uses.get(c, 0) + 1
    out["parts_used"] = uses
    for scorer in ("detection", "fuzzing"):
        tok = [score(scorer, stats[f].token_rule, f) for f in feats]
        own = [score(scorer, stats[f].rule, f) for f in feats]
        kept_tok = [t for t, f in zip(tok, feats, strict=True) if f in ctx]
        kept_own = [o for o, f in zip(own, feats, strict=True) if f in ctx]
        out[scorer] = {"token_list": distribution(tok), "chosen": distribution(own), "change_all": _diff(tok, own),
                       "change_where_context_kept": _diff(kept_tok, kept_own)}  # fmt: skip
    # without the cross-validation gate: the context label whenever it fits the explain half better
    loose = StatsConfig(min_gain=-1.0)
    ungated = {f: explain_stats(evs[f], freq, src.vocab, kinds=src.kinds, cfg=loose, promoted=src.promoted(f))
               for f in feats}  # fmt: skip
    moved = [f for f in feats if ungated[f].rule.extras() > 0]
    out["ungated"] = {"more_than_token_list": len(moved)}
    for scorer in ("detection", "fuzzing"):
        out["ungated"][scorer] = _diff([score(scorer, stats[f].token_rule, f) for f in moved],
                                       [score(scorer, ungated[f].rule, f) for f in moved])  # fmt: skip
        out["ungated"][scorer]["token_list_mean"] = distribution([score(scorer, stats[f].token_rule, f)
                                                                  for f in moved]).get("mean")  # fmt: skip
    # each part off in turn: the held-out change of the labels it would have changed
    ablation: dict[str, Any] = {}
    for part in PARTS:
        cfg = StatsConfig(parts=tuple(p for p in PARTS if p != part))
        without = {f: explain_stats(evs[f], freq, src.vocab, kinds=src.kinds, cfg=cfg, promoted=src.promoted(f))
                   for f in feats}  # fmt: skip
        changed = [f for f in feats if without[f].rule != stats[f].rule]
        row: dict[str, Any] = {"labels_changed": len(changed)}
        for scorer in ("detection", "fuzzing"):
            row[scorer] = _diff([score(scorer, without[f].rule, f) for f in changed],
                                [score(scorer, stats[f].rule, f) for f in changed])  # fmt: skip
        ablation[part] = row
    out["ablation_part_on_vs_off"] = ablation
    rng = np.random.default_rng(seed + 1)
    pick = sorted(int(f) for f in rng.choice(feats, size=min(10, len(feats)), replace=False))
    out["random_examples"] = [
        {"feature": f, "token_list": stats[f].token_text, "label": stats[f].text,
         "detection": [score("detection", stats[f].token_rule, f), score("detection", stats[f].rule, f)],
         "fuzzing": [score("fuzzing", stats[f].token_rule, f), score("fuzzing", stats[f].rule, f)]}
        for f in pick
    ]  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--atlas", type=Path, default=None)
    p.add_argument("--build-dir", type=Path, default=Path("benchmarks/results/explain_demo"))
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--d-sae", type=int, default=2048)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--features", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local", action="store_true", help="also evaluate the local explainer (SmolLM2-Instruct)")
    p.add_argument("--local-features", type=int, default=10, help="features for the (slow) local explainer")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/explain_eval.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    build = None
    atlas = args.atlas
    if atlas is None or not atlas.is_file():
        args.build_dir.mkdir(parents=True, exist_ok=True)
        atlas = args.build_dir / "atlas.db"
        if not atlas.is_file():
            print(f"building a demo atlas under {args.build_dir} ...", file=sys.stderr)
            build = build_demo_atlas(args.build_dir, args.tokens, args.d_sae, args.k, args.epochs, args.context)
    src = AtlasEvidence(open_atlas(atlas))
    live = src.live_features()
    rng = np.random.default_rng(args.seed)
    feats = sorted(int(f) for f in rng.choice(live, size=min(args.features, len(live)), replace=False))
    evs = {f: src.evidence(f) for f in feats}
    freq = text_frequencies(src.token_freq(), src.vocab)
    t1 = time.time()
    stats = {f: explain_stats(evs[f], freq, src.vocab, kinds=src.kinds, promoted=src.promoted(f)) for f in feats}
    offline = evaluate({f: s.text for f, s in stats.items()}, evs,
                       lambda sc, lab, ev: rule_score(sc, lab, ev, kinds=src.kinds).score)  # fmt: skip
    conf = np.array([stats[f].confidence for f in feats])
    dets = [offline["per_feature"][f]["detection"] for f in feats]
    det = np.array([0.5 if d is None else d for d in dets])
    offline["confidence"] = distribution(conf.tolist())
    offline["confidence_vs_detection_r"] = round(float(np.corrcoef(conf, det)[0, 1]), 4) if conf.std() else None
    offline["seconds"] = round(time.time() - t1, 2)
    quoted = evaluate({f: s.text for f, s in stats.items()}, evs, quoted_token_score)
    quoted["coverage"] = round(sum(bool(quoted_strings(stats[f].text)) for f in feats) / max(1, len(feats)), 4)
    result: dict[str, Any] = {
        "benchmark": "explain_eval", "atlas": str(atlas), "build": build, "live_features": len(live),
        "sampled": len(feats), "seed": args.seed, "score_config": vars(ScoreConfig()),
        "negatives": "windows from atlas contexts that are not among the feature's examples (see docs/explain.md)",
        "explainers": {"stats": {"reader": RULE_READER, **offline},
                       "stats_read_by_quoted_tokens": {"reader": QUOTED_READER, **quoted}},
        "readers_note": "the rule reader reads the stats explainer's own wording (it parses the templates the "
                        "explainer writes); the quoted-token reader does not, and scores the same labels "
                        "independently of those templates",
    }  # fmt: skip
    t3 = time.time()
    result["context_vs_token_list"] = context_comparison(feats, evs, src, stats, freq, args.seed)
    result["context_vs_token_list"]["seconds"] = round(time.time() - t3, 1)
    if args.local:
        t2 = time.time()
        usage = Usage()
        caller = Caller(LocalBackend(), OpsConfig(concurrency=1, retries=0), usage,
                        JsonCache(args.build_dir / "local-cache.json"))  # fmt: skip
        sub = feats[: args.local_features]
        labels: dict[int, str] = {}
        for f in sub:
            try:
                msgs = with_prefill(explain_messages(evs[f].explain, evs[f].max_act, 10), "Label:", True)
                labels[f] = caller.call(msgs, parse_label, max_tokens=24)
            except BackendError as exc:
                print(f"#{f}: {exc}", file=sys.stderr)

        def lm(sc: str, lab: str, ev: FeatureEvidence) -> float | None:
            try:
                return lm_score(sc, lab, ev, caller, ScoreConfig(n_pos=5, n_neg=5)).score
            except BackendError:
                return None

        local = evaluate(labels, {f: evs[f] for f in labels}, lm) if labels else {"features": 0}
        # the stats labels of the same features under the same (local) reader, for a like-for-like comparison
        stats_sub = evaluate({f: stats[f].text for f in labels}, {f: evs[f] for f in labels}, lm) if labels else {}
        result["explainers"]["local"] = {"reader": "local (SmolLM2-135M-Instruct)", **local,
                                         "usage": usage.to_dict(), "seconds": round(time.time() - t2, 1)}  # fmt: skip
        result["explainers"]["stats_read_by_local"] = {"reader": "local (SmolLM2-135M-Instruct)", **stats_sub}
    result["seconds"] = round(time.time() - t0, 1)
    result["machine"] = {"platform": platform.platform(), "python": platform.python_version(),
                         "torch": torch.__version__, "threads": args.threads}  # fmt: skip
    result["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    result["command"] = " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    brief = {k: v for k, v in result.items() if k != "explainers"}
    brief["explainers"] = {name: {k: v for k, v in e.items() if k != "per_feature"}
                           for name, e in result["explainers"].items()}  # fmt: skip
    print(json.dumps(brief, indent=2))


if __name__ == "__main__":
    main()
