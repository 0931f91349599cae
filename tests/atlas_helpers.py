"""A tiny model, dictionary, corpus and atlas for the atlas and web tests (built offline in seconds)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import torch

import lmscope
from lmscope.atlas import AtlasConfig, add_label, build_atlas
from lmscope.dictionaries import DictConfig, build
from lmscope.dictionaries.formats import save_dictionary
from tiny_models import save_tiny_with_tokenizer

HOOK = "blocks.1.resid_post"
CFG = AtlasConfig(tokens=2048, context=32, batch_size=4, top_k=5, bins=8, samples_per_bin=3, hist_bins=16)
TEXT = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "def f(x): return x + 1\nprint(f(2))",
    "Paris is a city. Rome is a city. France and Italy are countries in Europe.",
    "for i in range(10): print(i * i)  # squares",
]


def make_corpus(root: Path, n_docs: int = 40) -> Path:
    """`n_docs` small text files (40 hold about 2,500 tokens of the tiny tokenizer)."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (root / f"doc{i:02d}.txt").write_text(" ".join(TEXT[(i + j) % 4] for j in range(1 + i % 3)))
    return root


def tiny_dictionary(d_sae: int = 48) -> torch.nn.Module:
    d = build(DictConfig(arch="topk", d_in=32, d_sae=d_sae, k=4, hook=HOOK, model="tiny-llama"), seed=0)
    with torch.no_grad():
        d.b_enc.fill_(0.05)  # some features fire often, some rarely
    return d


def make_tiny_atlas(root: Path, labels: bool = False) -> tuple[lmscope.Model, torch.nn.Module, Path, Path]:
    """(model, dictionary, corpus dir, atlas path); the dictionary is also saved under root/dict."""
    model_dir = save_tiny_with_tokenizer("llama", str(root / "model"))
    model = lmscope.load_model(model_dir, device="cpu", dtype="float32")
    d = tiny_dictionary()
    save_dictionary(d, root / "dict")
    corpus = make_corpus(root / "corpus")
    out = build_atlas(model, root / "dict", str(corpus), out=root / "atlas.db", config=CFG, progress=False)
    if labels:
        import sqlite3

        conn = sqlite3.connect(out)
        add_label(conn, 1, "capital cities", source="human")
        add_label(conn, 2, "Python code", source="machine", explainer="test-explainer", score=0.8, scorer="detection")
        conn.commit()
        conn.close()
    return model, d, corpus, out


def table_rows(db: Path, sql: str) -> list[tuple]:
    """Every row `sql` returns from the atlas at `db`, as tuples (tables compared between two builds)."""
    conn = sqlite3.connect(db)
    try:
        return [tuple(r) for r in conn.execute(sql).fetchall()]
    finally:
        conn.close()
