"""Atlas features as the JSON files that circuit-tracer's attribution-graph viewer (the one Neuronpedia hosts)
fetches for a graph's feature nodes, and the scan names that tie lmscope's graphs to those files.

Where the viewer looks (circuit-tracer, `frontend/assets/feature_examples/init-feature-examples.js` loadFeature,
`frontend/assets/attribution_graph/init-cg-feature-detail.js`, `util-cg.js` formatData): for a node of
feature_type "cross layer transcoder" it fetches `./features/{scan}/{featureIndex}.json`, where featureIndex is
the node's `feature` as written and scan is `metadata.scan`, or `metadata.transcoder_list[node.layer]` when
metadata.scan starts with "custom-" (one scan per layer, circuit-tracer's form for a list of per-layer
transcoders, whose `feature` is then the layer's own index). lmscope's graphs take that second form
(`graph_scan`, `transcoder_scans`): layer i's scan is `scan_name(model, "blocks.{i}.mlp_in")`, which is also the
default scan of that layer's atlas (`lmscope atlas --dict TC/` builds one per layer, at hook blocks.i.mlp_in), and
a node's `feature` is the layer's feature id, which is the atlas's id. So the file is
`features/{scan}/{atlas id}.json`: no global index (circuit-tracer's preset scans encode layer and index into one
number, 10^ceil(log10(width)) * layer + index before its schema_version 1, a Cantor pairing since; neither is
needed with one scan per layer, and lmscope's graphs carry no schema_version, so the viewer reads `feature` as is).

The fields (circuit-tracer `frontend/feature_models.py`) and what fills them (`feature_json`, from
`AtlasStore.feature`):
- `examples_quantiles` [{quantile_name, examples: [{tokens, tokens_acts_list, train_token_ind,
  is_repeated_datapoint}]}]: "Top activations" (the atlas's top examples), then each quantile bin that holds
  samples, highest first, named by its range and its number of firing tokens. `tokens` are the window's token
  texts with newlines and tabs shown as ↵ and → (as the explorer shows them), `tokens_acts_list` the activations
  (same length), `train_token_ind` the peak's index in the window, `is_repeated_datapoint` whether the same
  (context, position) was shown in an earlier group (the viewer fades those). Special tokens (BOS/EOS/pad), which
  the explorer greys and keeps out of its colour scales, keep their text with activation 0 (the viewer leaves
  tokens at 0 uncoloured); the build leaves them out of every statistic, so a peak is never one.
- `top_logits`, `bottom_logits`: the tokens of the atlas's logit effects, strongest first (empty without them).
- `act_min` 0 and `act_max` the atlas's max activation: the colour scale and the histogram's range.
- `histogram`: the atlas's activation histogram counts (bins of one width from 0, the last ending at or just above
  act_max; the viewer spreads them evenly over [act_min, act_max], so its "current activation" mark is within one
  bin of exact).
- `quantile_values`: percentiles 1..100 of the feature's activation where it fires, interpolated linearly within
  the histogram's bins (the viewer shows a node's activation as the first percentile it does not exceed).
- `activation_frequency`: the density (share of the corpus's non-special tokens where it fires).
- `transcoder_id`: the scan; `index`: the atlas's feature id (the viewer reads neither).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lmscope.atlas.db.schema import AtlasError

SCAN_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")
CUSTOM = "custom-"  # a graph scan with this prefix makes the viewer read metadata.transcoder_list, one per layer
TRANSCODER_HOOK = "blocks.{layer}.mlp_in"  # the hook of a layer's transcoder, and so of its atlas
TOP_NAME = "Top activations"
PERCENTILES = 100
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def check_scan(name: str, what: str = "scan") -> str:
    """`name` if it can name a scan (one folder under features/, and a name the viewer reads as a plain scan);
    else AtlasError saying why (`what` names it there: "--scan" for an option)."""
    if not SCAN_RE.fullmatch(name):
        raise AtlasError(
            f"{what} {name!r}: a scan names one folder: 1-100 letters, digits, '.', '_' or '-', starting with a "
            "letter, digit or '_' (no '/' or '\\')"
        )
    if name.startswith(CUSTOM):
        raise AtlasError(
            f"{what} {name!r}: the viewer reads a scan starting with {CUSTOM!r} as a list of per-layer scans; "
            "choose another name"
        )
    return name


def model_name(spec: str) -> str:
    """The short name of a model spec: its last path part (`smollm2-135m`; `SmolLM2-135M` of
    `HuggingFaceTB/SmolLM2-135M`; the folder name of a local path), with other characters than letters, digits,
    '.', '_' and '-' made '-'."""
    last = spec.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return _UNSAFE.sub("-", last).strip("-.") or "model"


def scan_name(model: str, hook: str) -> str:
    """The default scan of an atlas of `model` at `hook`: `{model_name(model)}-{hook}`, e.g.
    `smollm2-135m-blocks.10.resid_post`."""
    hook_part = _UNSAFE.sub("-", hook).strip("-") or "hook"
    return check_scan(f"{model_name(model)}-{hook_part}"[:100])


def atlas_scan(summary: Mapping[str, Any], provenance: Mapping[str, Any]) -> str:
    """The default scan of an atlas, from its recorded model spec and hook."""
    model = summary.get("model") or (provenance.get("model") or {}).get("spec") or "model"
    hook = summary.get("hook") or provenance.get("hook") or "hook"
    return scan_name(str(model), str(hook))


def transcoder_scans(model: str, n_layers: int) -> list[str]:
    """The scan of each layer's transcoder features, indexed by layer: the default scans of the per-layer atlases."""
    return [scan_name(model, TRANSCODER_HOOK.format(layer=i)) for i in range(n_layers)]


def graph_scan(model: str) -> str:
    """A graph's metadata.scan: "custom-" (so the viewer looks features up by layer in transcoder_list) and the
    model."""
    return f"{CUSTOM}lmscope-{model_name(model)}"


def feature_path(scan: str, index: int) -> str:
    """Where the viewer fetches a feature, relative to its page: `features/{scan}/{index}.json`."""
    return f"features/{scan}/{int(index)}.json"


def node_feature_path(doc: Mapping[str, Any], node: Mapping[str, Any]) -> str | None:
    """The feature file the viewer fetches for `node` of graph `doc` (None for a node that is not a feature),
    by the viewer's rule (see the module's docstring)."""
    if node.get("feature_type") != "cross layer transcoder":
        return None
    meta = doc["metadata"]
    scan = str(meta.get("scan") or "")
    if scan.startswith(CUSTOM):
        scan = str(meta["transcoder_list"][int(node["layer"])])
    return feature_path(scan, int(node["feature"]))


def _num(x: float) -> float:
    return float(f"{x:.5g}")


def show_token(t: str) -> str:
    """A token's text as the explorer shows it: newlines as ↵, tabs as →."""
    return t.replace("\n", "↵").replace("\t", "→")


def percentiles(counts: Sequence[int], width: float, top: float, n: int = PERCENTILES) -> list[float]:
    """Percentiles 1..n of the values a histogram (bins of `width` from 0) counts, interpolated linearly within a
    bin and capped at `top` (the true maximum); all 0 for an empty histogram."""
    c = np.asarray(counts, dtype=np.float64)
    total = float(c.sum())
    if total <= 0 or width <= 0:
        return [0.0] * n
    cum = np.cumsum(c)
    targets = total * np.arange(1, n + 1) / n
    j = np.minimum(np.searchsorted(cum, targets), len(c) - 1)  # the first bin whose cumulative count reaches it
    below = np.where(j > 0, cum[j - 1], 0.0)
    frac = np.clip((targets - below) / np.maximum(c[j], 1.0), 0.0, 1.0)
    values = np.clip((j + frac) * width, 0.0, top)
    return [_num(v) for v in np.maximum.accumulate(values)]


def _example(ex: Mapping[str, Any], seen: set[tuple[int, int]]) -> dict[str, Any]:
    key = (int(ex["context"]), int(ex["pos"]))
    repeated = key in seen
    seen.add(key)
    return {
        "tokens": [show_token(t) for t in ex["tokens"]],
        "tokens_acts_list": [0.0 if sp else _num(a) for a, sp in zip(ex["acts"], ex["special"], strict=True)],
        "train_token_ind": int(ex["peak"]),
        "is_repeated_datapoint": repeated,
    }


def feature_json(f: Mapping[str, Any], scan: str) -> dict[str, Any]:
    """Feature `f` (as `AtlasStore.feature` returns it) in the viewer's JSON (see the module's docstring)."""
    seen: set[tuple[int, int]] = set()
    groups: list[dict[str, Any]] = []
    if f["top_examples"]:
        groups.append({"quantile_name": TOP_NAME, "examples": [_example(ex, seen) for ex in f["top_examples"]]})
    for q in sorted(f["quantiles"], key=lambda q: -q["hi"]):
        if q["examples"]:
            name = f"Activations {q['lo']:.3g} to {q['hi']:.3g} ({q['count']:,} tokens)"
            groups.append({"quantile_name": name, "examples": [_example(ex, seen) for ex in q["examples"]]})
    effects = f.get("logit_effects") or {}
    counts = [int(c) for c in f["histogram"]["counts"]]
    edges = f["histogram"]["edges"]
    width = float(edges[-1]) / len(counts) if counts else 0.0
    max_act = float(f["max_act"])
    return {
        "transcoder_id": scan,
        "index": int(f["id"]),
        "examples_quantiles": groups,
        "top_logits": [show_token(e["token"]) for e in effects.get("positive", [])],
        "bottom_logits": [show_token(e["token"]) for e in effects.get("negative", [])],
        "act_min": 0.0,
        "act_max": max_act,
        "quantile_values": percentiles(counts, width, max_act),
        "histogram": counts,
        "activation_frequency": float(f["density"]),
    }
