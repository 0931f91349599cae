"""The main job: the whole MRI of a model in one run directory.

harvest a layer -> train a TopK dictionary -> evaluate it -> build the atlas -> label and score the features
offline -> train a transcoder at every layer -> build one attribution graph -> audit the model (concept probes with
controls, inside vs outside, a backdoor scan, steering and feature checks) -> (serve the web explorer, graph and
audit views included). Each stage is verified before it is skipped on a rerun (`pipeline.py`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lmscope.core.progress import ProgressCallback
from lmscope.errors import LmscopeError
from lmscope.model.adapter import Model
from lmscope.workflows.pipeline import Pipeline, Stage
from lmscope.workflows.steer_search import (
    SteerSearchConfig,
    atlas_candidates,
    search_steering,
    steer_command,
)

ACTS, TRAIN, ATLAS, EVAL = "acts", "train", "atlas.db", "eval.json"
IMPORTED = "dictionary"  # a given dictionary (--dict), in lmscope's format
TRANSCODERS, GRAPHS, GRAPH_SLUG = "transcoders", "graphs", "demo-circuit"
AUDITS, AUDIT_NAME = "audits", "demo"


@dataclass(frozen=True)
class DemoConfig:
    """Everything that decides the run's results (the run directory is tied to it)."""

    model: str = "smollm2-135m"
    corpus: str = "stdlib"
    layer: int | None = None  # None: n_layers // 3
    harvest_tokens: int = 200_000
    train_tokens: int = 400_000  # passes over the harvest as often as needed
    expansion: int = 8
    k: int = 32
    eval_tokens: int = 8_192
    atlas_tokens: int = 65_536
    explain_limit: int | None = None  # None: every live feature
    context: int = 128
    seed: int = 0
    # the circuit stages: small transcoders at every layer from one streaming pass, then one attribution graph
    circuit_tokens: int = 32_768
    circuit_k: int = 16
    circuit_expansion: int = 2
    circuit_prompt: str = "The capital of France is"
    circuit_features: int = 256
    # the audit stage: a few concept batteries, inside vs outside, a backdoor scan, steering and feature checks
    audit_batteries: str = "truth,refusal,sentiment"  # comma-separated shipped battery names
    audit_contexts: int = 64
    # someone else's dictionary instead of harvesting and training one: any format `open_dictionary` reads
    # (lmscope, SAELens, sparsify, Gemma Scope), with `dict_hook` naming or replacing its hook (any naming)
    dictionary: str | None = None
    dict_hook: str | None = None

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """A minutes-long version of the same pipeline, for smoke tests."""
        base = {
            "harvest_tokens": 32_768,
            "train_tokens": 98_304,
            "expansion": 4,
            "eval_tokens": 2_048,
            "atlas_tokens": 8_192,
            "explain_limit": 64,
            "circuit_tokens": 8_192,
            "circuit_features": 64,
            "audit_batteries": "sentiment",
            "audit_contexts": 16,
        }
        return cls(**{**base, **{k: v for k, v in overrides.items() if v is not None}})

    def hook(self, model: Model) -> str:
        if self.dictionary is not None:
            raise LmscopeError("a demo on a given dictionary reads the hook that dictionary names (Demo.hook)")
        layer = model.n_layers // 3 if self.layer is None else self.layer
        if not 0 <= layer < model.n_layers:
            raise LmscopeError(f"--layer {layer} is out of range: {self.model} has layers 0..{model.n_layers - 1}")
        return f"blocks.{layer}.resid_post"


class Demo:
    """The demo's stages over one model, built lazily so that verified reruns load nothing they don't need."""

    def __init__(
        self,
        cfg: DemoConfig,
        run_dir: str | Path,
        device: str = "auto",
        dtype: str = "auto",
        progress: ProgressCallback | None = None,
    ) -> None:
        self.cfg, self.run_dir, self.device, self.dtype = cfg, Path(run_dir), device, dtype
        self.progress = progress  # the harvest, training and atlas stages report through it (None: silent)
        self._model: Model | None = None
        self._given_hook: str | None = None
        if cfg.dictionary is not None and cfg.layer is not None:
            raise LmscopeError(
                "--layer and --dict both choose the layer: the dictionary reads the hook it names; drop --layer "
                "(or pass --dict-hook to name the dictionary's hook)"
            )

    @property
    def model(self) -> Model:
        if self._model is None:
            from lmscope.model.loading import load_model

            self._model = load_model(self.cfg.model, device=self.device, dtype=self.dtype)
        return self._model

    @property
    def hook(self) -> str:
        if self.cfg.dictionary is None:
            return self.cfg.hook(self.model)
        if self._given_hook is None:  # the hook the given dictionary reads, in lmscope's naming
            self._given_hook = str(self._open_given().cfg.hook)
        return self._given_hook

    def dict_dir(self) -> Path:
        """The dictionary's directory: trained (the trainer names it after hook, arch, width and k) or imported."""
        if self.cfg.dictionary is not None:
            return self.run_dir / IMPORTED
        found = sorted(p.parent for p in (self.run_dir / TRAIN).glob("*/config.json"))
        if len(found) != 1:
            raise LmscopeError(f"expected one trained dictionary under {self.run_dir / TRAIN}, found {len(found)}")
        return found[0]

    def dictionary(self) -> Any:
        from lmscope.dictionaries.formats import load_dictionary

        return load_dictionary(self.dict_dir(), device=self.model.device)

    # ------------------------------------------------------------------ stages
    def harvest(self, run: Path) -> dict[str, Any]:
        from lmscope.activations import HarvestConfig, harvest

        manifest = harvest(
            self.model,
            self.cfg.corpus,
            run / ACTS,
            HarvestConfig(hooks=[self.hook], tokens=self.cfg.harvest_tokens, context=self.cfg.context),
            command="lmscope demo",
            progress=self.progress,
        )
        return {"tokens": manifest.get("tokens"), "hook": self.hook, "shards": len(manifest.get("shards", []))}

    def verify_harvest(self, run: Path) -> None:
        from lmscope.activations import read_manifest, verify

        report = verify(run / ACTS)
        if not report.ok:
            raise LmscopeError("; ".join(report.problems))
        if int(read_manifest(run / ACTS).get("tokens", 0)) < self.cfg.harvest_tokens:
            raise LmscopeError("the harvest holds fewer tokens than asked for")

    def train(self, run: Path) -> dict[str, Any]:
        from lmscope.activations.sources import StoreSource
        from lmscope.activations.store import ActivationStore
        from lmscope.dictionaries import DictConfig
        from lmscope.training import RunSpec, TrainConfig, Trainer

        batch = 4096
        # Special tokens are excluded and the last partial batch of each epoch dropped: count real batches.
        per_epoch = int(ActivationStore.open(run / ACTS, hooks=[self.hook]).n_rows or 0) // batch * batch
        if per_epoch == 0:
            raise LmscopeError(f"the harvest holds fewer than one batch ({batch}) of usable tokens; harvest more")
        epochs = -(-self.cfg.train_tokens // per_epoch)
        source = StoreSource(run / ACTS, [self.hook], batch, self.cfg.seed, epochs)
        d_in = source.widths[self.hook]
        dcfg = DictConfig(
            arch="topk", d_in=d_in, d_sae=d_in * self.cfg.expansion, k=self.cfg.k, hook=self.hook, model=self.cfg.model
        )
        steps = max(1, self.cfg.train_tokens // batch)
        tc = TrainConfig(
            total_tokens=self.cfg.train_tokens,
            warmup_steps=max(1, steps // 20),
            dead_window_tokens=max(batch, self.cfg.train_tokens // 4),
            checkpoint_every=max(10, steps // 10),
            seed=self.cfg.seed,
        )
        Trainer([RunSpec(dcfg)], tc, run / TRAIN, device=self.model.device).fit(source, progress=self.progress)
        return {"dictionary": str(self.dict_dir().relative_to(run)), "d_sae": dcfg.d_sae, "k": dcfg.k}

    def verify_train(self, run: Path) -> None:
        from lmscope.dictionaries.formats import load_dictionary

        d = load_dictionary(self.dict_dir())
        if d.cfg.hook != self.hook:
            raise LmscopeError(f"the dictionary reads {d.cfg.hook}, not {self.hook}")

    def _open_given(self) -> Any:
        """The given dictionary (`cfg.dictionary`, any format lmscope reads), its hook translated or replaced."""
        from lmscope.dictionaries.pretrained import open_dictionary

        assert self.cfg.dictionary is not None
        d = open_dictionary(self.cfg.dictionary, hook=self.cfg.dict_hook)
        if not d.cfg.hook:
            raise LmscopeError(
                f"{self.cfg.dictionary} does not name the hook it reads; pass --dict-hook (e.g. blocks.6.resid_post or "
                "blocks.6.hook_resid_post)"
            )
        return d

    def import_dictionary(self, run: Path) -> dict[str, Any]:
        """Check a given dictionary against the model (hook and width) and save it in lmscope's format."""
        from lmscope.dictionaries.formats import dictionary_hash, save_dictionary
        from lmscope.steer.edits import check_dictionary

        d = self._open_given()
        check_dictionary(self.model, d)
        meta = getattr(d, "metadata", None) or {}
        save_dictionary(d, run / IMPORTED, meta.get("normalization"), {**(meta.get("training") or {}),
                        "imported_from": str(self.cfg.dictionary)})  # fmt: skip
        return {"dictionary": IMPORTED, "source": str(self.cfg.dictionary), "arch": d.cfg.arch,
                "d_sae": d.cfg.d_sae, "hook": d.cfg.hook, "hash": dictionary_hash(d)}  # fmt: skip

    def verify_import(self, run: Path) -> None:
        """The imported copy still equals the given dictionary (a changed source is imported again)."""
        from lmscope.dictionaries.formats import dictionary_hash, load_dictionary

        copy = dictionary_hash(load_dictionary(run / IMPORTED))
        if copy != dictionary_hash(self._open_given()):
            raise LmscopeError(f"{self.cfg.dictionary} changed since it was imported into {run / IMPORTED}")

    def evaluate(self, run: Path) -> dict[str, Any]:
        from lmscope.dictionaries.formats import load_dictionary
        from lmscope.training.evaluate import eval_contexts, evaluate, save_json

        d = load_dictionary(self.dict_dir(), device=self.model.device)
        # Held out: the tokens right after those the dictionary was trained on.
        ids, special = eval_contexts(
            self.model, self.cfg.corpus, self.cfg.eval_tokens, self.cfg.context, self.cfg.harvest_tokens
        )
        results = evaluate(d, self.model, ids, special=special)
        results.update({"tokens": int(ids.numel()), "skip_tokens": self.cfg.harvest_tokens, "corpus": self.cfg.corpus})
        save_json(results, self.dict_dir() / EVAL)  # the atlas stores it with the dictionary
        save_json(results, run / EVAL)
        keys = ("fvu", "l0", "dead_frac", "ce_recovered", "ce_clean", "ce_spliced", "kl_spliced")
        return {k: results[k] for k in keys if k in results}

    def verify_eval(self, run: Path) -> None:
        results = json.loads((run / EVAL).read_text())
        for key in ("fvu", "ce_recovered"):
            if not isinstance(results.get(key), float):
                raise LmscopeError(f"{run / EVAL} lacks {key}")

    def atlas(self, run: Path) -> dict[str, Any]:
        from lmscope.atlas.build import build_atlas

        # The harvest already holds these contexts' activations (the atlas's tokens are its first ones): read them
        # instead of running the model again (float16, as harvested). A given dictionary (--dict) has no harvest.
        harvested = self.cfg.dictionary is None and self.cfg.atlas_tokens <= self.cfg.harvest_tokens
        build_atlas(
            self.model,
            self.dict_dir(),
            self.cfg.corpus,
            tokens=self.cfg.atlas_tokens,
            out=run / ATLAS,
            overwrite=True,
            command="lmscope demo",
            progress=self.progress,
            activations=run / ACTS if harvested else None,
        )
        from lmscope.atlas.db.read import feature_counts

        conn = self._open_atlas(run)
        total, live = feature_counts(conn)
        conn.close()
        return {"features": total, "live": live, "activations": "harvest" if harvested else "model"}

    def _open_atlas(self, run: Path) -> Any:
        from lmscope.atlas.schema import open_atlas

        return open_atlas(run / ATLAS, readonly=True)

    def verify_atlas(self, run: Path) -> None:
        self._open_atlas(run).close()  # refuses a missing, unfinished or newer-schema file

    def explain(self, run: Path) -> dict[str, Any]:
        from lmscope.explain import explain_atlas, score_atlas

        report = explain_atlas(run / ATLAS, "stats", limit=self.cfg.explain_limit)
        fuzz = score_atlas(run / ATLAS, "fuzzing", "stats", explainer="stats", limit=self.cfg.explain_limit)
        scores = [d["score"] for d in report.done if isinstance(d.get("score"), float)]
        return {
            "labelled": len(report.done) + report.skipped,
            "failed": len(report.failed),
            "fuzzing_scored": len(fuzz.done) + fuzz.skipped,
            "mean_detection": sum(scores) / len(scores) if scores else None,
        }

    def verify_explain(self, run: Path) -> None:
        from lmscope.atlas.db.labels import count_machine_labelled
        from lmscope.atlas.db.read import feature_counts

        conn = self._open_atlas(run)
        try:
            live = feature_counts(conn)[1]
            labelled = count_machine_labelled(conn, "stats")
        finally:
            conn.close()
        expected = min(live, self.cfg.explain_limit or live)
        if labelled < expected:
            raise LmscopeError(f"only {labelled} of {expected} live features carry a stats label")

    def transcoders(self, run: Path) -> dict[str, Any]:
        from lmscope.circuits.train import TranscoderRecipe, train_transcoders

        c = self.cfg
        recipe = TranscoderRecipe(
            k=c.circuit_k, expansion=c.circuit_expansion, tokens=c.circuit_tokens, batch_size=2048,
            context=c.context, warmup_steps=2, seed=c.seed, checkpoint_every=4,
            eval_tokens=max(1024, c.eval_tokens // 4), norm_sample_tokens=min(8192, c.circuit_tokens // 2),
        )  # fmt: skip
        info = train_transcoders(self.model, c.corpus, run / TRANSCODERS, recipe, progress=self.progress,
                                 device=self.model.device)  # fmt: skip
        ev = info["eval"]
        return {"layers": len(info["layers"]), "ce_recovered": ev["ce_recovered"], "kl": ev["kl_spliced"],
                "fvu_mean": sum(ev["fvu"].values()) / len(ev["fvu"])}  # fmt: skip

    def verify_transcoders(self, run: Path) -> None:
        from lmscope.circuits.transcoders import MANIFEST, TranscoderSet

        if not (run / TRANSCODERS / MANIFEST).is_file():
            raise LmscopeError(f"{run / TRANSCODERS} has no {MANIFEST}: the transcoder stage did not finish")
        TranscoderSet.load(run / TRANSCODERS).check(self.model)

    def circuit(self, run: Path) -> dict[str, Any]:
        from lmscope.circuits import AttributionConfig, TranscoderSet, attribute
        from lmscope.circuits.export import to_neuronpedia, write_neuronpedia

        tcs = TranscoderSet.load(run / TRANSCODERS, device=self.model.device)
        g = attribute(
            self.model, tcs, self.cfg.circuit_prompt, AttributionConfig(max_feature_nodes=self.cfg.circuit_features)
        )
        (run / GRAPHS).mkdir(parents=True, exist_ok=True)
        g.save(run / GRAPHS / f"{GRAPH_SLUG}.safetensors")
        doc = to_neuronpedia(g, GRAPH_SLUG)
        write_neuronpedia(doc, run / GRAPHS / f"{GRAPH_SLUG}.json")
        sc = doc["metadata"]["lmscope"]["scores"]
        return {"prompt": self.cfg.circuit_prompt, "targets": [t["label"] for t in g.targets][:3],
                "replacement": sc["unpruned"]["replacement"], "completeness": sc["unpruned"]["completeness"],
                "pruned_nodes": len(doc["nodes"]), "seconds": g.meta["seconds"]}  # fmt: skip

    def verify_circuit(self, run: Path) -> None:
        from lmscope.circuits.export import read_neuronpedia

        read_neuronpedia(run / GRAPHS / f"{GRAPH_SLUG}.json")

    def audit(self, run: Path) -> dict[str, Any]:
        from lmscope.audit import AuditConfig, ScanConfig, run_audit
        from lmscope.workflows.audit_checks import feature_links, steering_checks

        out = run / AUDITS / AUDIT_NAME
        scan = ScanConfig(corpus=self.cfg.corpus, contexts=self.cfg.audit_contexts, prompts=8, null=12, candidates=6,
                          seed=self.cfg.seed)  # fmt: skip
        names = [b.strip() for b in self.cfg.audit_batteries.split(",") if b.strip()]
        cfg = AuditConfig(batteries=names, scan=scan, inside_outside="truth" in names, seed=self.cfg.seed)
        from lmscope.atlas.store import AtlasStore

        d = self.dictionary()
        run_audit(self.model, out, cfg, dictionary=d, atlas_density=AtlasStore(run / ATLAS).densities())
        steering_checks(self.model, out)
        report = feature_links(self.model, out, d, run / ATLAS)
        colours = [light["colour"] for light in report["summary"]]
        return {"report": str(out / "report.html"), **{c: colours.count(c) for c in ("red", "amber", "green", "grey")}}

    def verify_audit(self, run: Path) -> None:
        p = run / AUDITS / AUDIT_NAME / "report.json"
        if not p.is_file() or "features" not in json.loads(p.read_text()):
            raise LmscopeError(f"{p} is missing or incomplete: the audit stage did not finish")

    def stages(self) -> list[Stage]:
        if self.cfg.dictionary is not None:  # someone else's dictionary: nothing to harvest or train
            first = [Stage("import", "import the given dictionary", self.import_dictionary, self.verify_import)]
        else:
            first = [
                Stage("harvest", "harvest activations", self.harvest, self.verify_harvest),
                Stage("train", "train a TopK dictionary", self.train, self.verify_train),
            ]
        return [
            *first,
            Stage("eval", "evaluate it", self.evaluate, self.verify_eval),
            Stage("atlas", "build the atlas", self.atlas, self.verify_atlas),
            Stage("explain", "label and score every feature offline", self.explain, self.verify_explain),
            Stage("transcoders", "train a transcoder at every layer", self.transcoders, self.verify_transcoders),
            Stage("circuit", "build an attribution graph", self.circuit, self.verify_circuit),
            Stage("audit", "audit the model (probes, inside vs outside, backdoor scan)", self.audit, self.verify_audit),
        ]

    def pipeline(self) -> Pipeline:
        return Pipeline(self.run_dir, asdict(self.cfg), self.stages())


def demo_summary(
    job: Demo, search: SteerSearchConfig | None = None, progress: ProgressCallback | None = None
) -> dict[str, Any]:
    """Metrics, the most clearly labelled features, and a steering command whose effect was measured just now:
    a feature whose clamp raises the rate of its own tokens over seeds, found by `steer_search` (or, when none
    holds up, the best figures measured and `found` False)."""
    run = job.run_dir
    metrics = json.loads((run / EVAL).read_text())
    from lmscope.atlas.db.labels import best_scored_machine_labels
    from lmscope.atlas.db.read import feature_counts

    conn = job._open_atlas(run)
    try:
        total, live = feature_counts(conn)
        labels: list[dict[str, Any]] = []
        rows = best_scored_machine_labels(conn, "rule-detection", "rule-fuzzing", limit=500)
        for feature, text, detection, fuzzing, max_act in rows:  # the best-scored feature of each distinct label
            if len(labels) < 8 and all(x["text"] != text for x in labels):
                labels.append({"feature": feature, "text": text, "detection": detection, "fuzzing": fuzzing,
                               "max_act": max_act})  # fmt: skip
        search = search or SteerSearchConfig()
        candidates = atlas_candidates(conn, job.model.tokenizer, search)
    finally:
        conn.close()
    summary: dict[str, Any] = {
        "run_dir": str(run), "hook": job.hook, "features": total, "live": live, "metrics": metrics, "labels": labels,
    }  # fmt: skip
    audit = run / AUDITS / AUDIT_NAME / "report.json"
    if audit.is_file():
        summary["audit"] = {"name": AUDIT_NAME, "lights": json.loads(audit.read_text())["summary"],
                            "command": f"lmscope audit {job.cfg.model} --dict {job.dict_dir()} --atlas {run / ATLAS} "
                                       f"--out {run / AUDITS}/NAME"}  # fmt: skip
    graph = run / GRAPHS / f"{GRAPH_SLUG}.json"
    if graph.is_file():
        meta = json.loads(graph.read_text())["metadata"]
        summary["circuit"] = {"slug": GRAPH_SLUG, "prompt": meta["prompt"], "scores": meta["lmscope"]["scores"],
                              "targets": [t["label"] for t in meta["lmscope"]["targets"]][:3],
                              "command": f"lmscope circuit {job.cfg.model} --transcoders {run / TRANSCODERS} "
                                         f"--prompt \"...\" --out {run / GRAPHS}/NAME.json"}  # fmt: skip
    d = job.dictionary()
    steer = search_steering(job.model, d, job.hook, candidates, search, progress)
    if "feature" in steer:
        steer["command"] = steer_command(job.cfg.model, job.dict_dir(), steer)
    summary["steer"] = steer
    return summary
