"""What language-model labels cost: the exact prompts `lmscope explain --explainer anthropic|openai` and
`lmscope score --backend ...` would send for random live features of an atlas, counted, then priced per 1,000
features with lmscope's price table (lmscope.explain.ops.PRICES). Nothing is sent anywhere.

Input tokens are counted with SmolLM2's tokenizer (a byte-level BPE with a 49k vocabulary), a proxy: Claude and
OpenAI models count with their own tokenizers, and `lmscope explain` prints the provider's real counts and cost
at the end of every run (`--json REPORT` keeps them). Output tokens are bounded by the `max_tokens` each call
asks for; the explain reply is usually far shorter than its 300-token budget, so the output cost is an upper bound.

    .venv/bin/python benchmarks/explain_cost.py --atlas runs/demo/atlas.db
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from lmscope.atlas import open_atlas
from lmscope.explain.evidence import AtlasEvidence
from lmscope.explain.ops import PRICES
from lmscope.explain.prompts import (
    DETECT_SYSTEM,
    FUZZ_SYSTEM,
    batch_messages,
    clean,
    explain_messages,
    mark,
    simulate_messages,
)
from lmscope.explain.scorers import ScoreConfig, detection_items, fuzz_items, simulation_windows

MODELS = ("claude-sonnet-4-5", "claude-haiku-4-5", "gpt-4o-mini", "gpt-4.1-mini")
EXPLAIN_MAX_TOKENS = 300  # what explain_atlas asks a remote model for (pipeline.py)
LABEL = "the tokens 'INF' and 'Infinity' inside Decimal string literals"  # a typical label, for scorer prompts


def _price(model: str) -> tuple[float, float]:
    key = max((p for p in PRICES if model.startswith(p)), key=len)
    return PRICES[key]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--atlas", type=Path, required=True)
    p.add_argument("--features", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/explain_cost.json"))
    args = p.parse_args()
    from lmscope.model.loading import load_model

    tok = load_model("smollm2-135m", device="cpu").tokenizer

    def count(msgs: list[dict[str, str]]) -> int:
        return sum(len(tok(m["content"], add_special_tokens=False)["input_ids"]) + 4 for m in msgs)

    src = AtlasEvidence(open_atlas(args.atlas))
    live = src.live_features()
    rng = np.random.default_rng(args.seed)
    feats = sorted(int(f) for f in rng.choice(live, size=min(args.features, len(live)), replace=False))
    cfg = ScoreConfig()
    per: dict[str, list[tuple[int, int]]] = {"explain": [], "detection": [], "fuzzing": [], "simulation": []}
    for f in feats:
        ev = src.evidence(f)
        per["explain"].append((count(explain_messages(ev.explain, ev.max_act, 20)), EXPLAIN_MAX_TOKENS))
        for name, system, texts in (
            ("detection", DETECT_SYSTEM, ["".join(clean(t) for t in w.tokens) for w, _ in detection_items(ev, cfg)]),
            ("fuzzing", FUZZ_SYSTEM, [mark(w.tokens, m) for w, m, _ in fuzz_items(ev, cfg)]),
        ):
            tin = tout = 0
            for i in range(0, len(texts), cfg.batch):
                chunk = texts[i : i + cfg.batch]
                tin += count(batch_messages(system, LABEL, chunk))
                tout += 20 + 6 * len(chunk)
            per[name].append((tin, tout))
        tin = tout = 0
        for w in simulation_windows(ev, cfg):
            tin += count(simulate_messages(LABEL, w.tokens))
            tout += 8 * len(w.tokens) + 20
        per["simulation"].append((tin, tout))
    result: dict[str, Any] = {"benchmark": "explain_cost", "atlas": str(args.atlas), "features": len(feats),
                              "tokenizer": "SmolLM2-135M (a proxy for the providers' own)", "calls": {}}  # fmt: skip
    for name, rows in per.items():
        a = np.array(rows, dtype=np.float64)
        result["calls"][name] = {"input_tokens_mean": round(float(a[:, 0].mean()), 1),
                                 "output_tokens_budget_mean": round(float(a[:, 1].mean()), 1)}  # fmt: skip
    costs: dict[str, Any] = {}
    for model in MODELS:
        pin, pout = _price(model)
        row = {}
        for name, rows in per.items():
            a = np.array(rows, dtype=np.float64)
            row[name] = round(1000 * float((a[:, 0] * pin + a[:, 1] * pout).mean()) / 1e6, 2)
        row["explain_input_only"] = round(1000 * float(np.array(per["explain"])[:, 0].mean()) * pin / 1e6, 2)
        costs[model] = {"usd_per_1000_features": row, "price_per_million_tokens": {"input": pin, "output": pout}}
    result["cost"] = costs
    result["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    result["command"] = " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
