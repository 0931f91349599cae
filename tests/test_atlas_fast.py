"""The atlas build's vectorised parts equal the straightforward code they replaced: example rows (one Python call
per row before), co-firing counts (a sparse-dense product before) and the trigram index (filled row by row by a
trigger before). The references below are that earlier code, kept here as the specification."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lmscope.atlas.accumulate import FeatureAccumulator
from lmscope.atlas.db import read
from lmscope.atlas.db import write as db_write
from lmscope.atlas.db.schema import TRIGRAM_TABLE, create, has_table
from lmscope.atlas.neighbours import CofireSample
from lmscope.atlas.write import _example_rows


def _reference_example_rows(
    acc: FeatureAccumulator, conn: sqlite3.Connection, vocab: list[str], context: int
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    top = {k: v.cpu().numpy() for k, v in vars(acc.top).items()}
    q = {k: v.cpu().numpy() for k, v in vars(acc.q).items()}
    width, n_cov = (t.cpu().numpy() for t in acc.bin_ranges())
    q_count = acc.q_count.cpu().numpy()
    max_act = acc.max_act.cpu().numpy()
    tokens = dict(read.iter_contexts(conn))
    before = acc.before
    rows: list[tuple[Any, ...]] = []

    def add(f: int, kind: str, b: int, rank: int, ctx: int, pos: int, act: float, win: np.ndarray) -> None:
        start, end = max(0, pos - before), min(context, pos + acc.after + 1)
        ids = tokens[ctx][start:end]
        acts = win[start - (pos - before) : end - (pos - before)].astype("<f4")
        text = "".join(vocab[t] if 0 <= t < len(vocab) else "" for t in ids.tolist())
        rows.append((f, kind, b, rank, ctx, pos, float(act), start, acts.tobytes(), int(tokens[ctx][pos]), text))

    bin_rows: list[tuple[Any, ...]] = []
    for f in range(acc.F):
        for rank, j in enumerate(np.nonzero(top["ctx"][f] >= 0)[0]):
            add(f, "top", -1, rank, int(top["ctx"][f, j]), int(top["pos"][f, j]), top["act"][f, j], top["win"][f, j])
        for b in range(int(n_cov[f])):
            lo, hi = b * float(width[f]), min((b + 1) * float(width[f]), float(max_act[f]))
            bin_rows.append((f, b, lo, hi, int(q_count[f, b])))
            slots = np.nonzero(q["ctx"][f, b] >= 0)[0]
            slots = slots[np.argsort(-q["act"][f, b, slots], kind="stable")]
            for rank, j in enumerate(slots):
                add(f, "quantile", b, rank, int(q["ctx"][f, b, j]), int(q["pos"][f, b, j]), q["act"][f, b, j],
                    q["win"][f, b, j])  # fmt: skip
    return rows, bin_rows


def _reference_cofire(sample: CofireSample, k: int, chunk: int = 512) -> tuple[torch.Tensor, ...]:
    k = min(k, sample.d_sae - 1)
    counts = torch.zeros(sample.d_sae, k)
    ids = torch.zeros(sample.d_sae, k, dtype=torch.long)
    r, c = torch.cat(sample.rows), torch.cat(sample.cols)
    z = torch.sparse_coo_tensor(
        torch.stack([c, r]), torch.ones(r.numel()), (sample.d_sae, sample.n_rows), check_invariants=False
    ).coalesce()
    own = torch.zeros(sample.d_sae).index_add_(0, c, torch.ones(c.numel()))
    dense_cols = torch.zeros(sample.n_rows, chunk)
    for s in range(0, sample.d_sae, chunk):
        e = min(s + chunk, sample.d_sae)
        dense_cols.zero_()
        sel = (c >= s) & (c < e)
        dense_cols[r[sel], c[sel] - s] = 1.0
        block = torch.sparse.mm(z, dense_cols[:, : e - s]).T
        rows = torch.arange(e - s)
        block[rows, rows + s] = -1.0
        v, i = block.topk(k, dim=1)
        counts[s:e], ids[s:e] = v.clamp_min(0), i
    return counts, ids, counts / own.clamp_min(1).unsqueeze(1)


def _accumulated(tmp_path: Path, F: int = 40, C: int = 24, n_batches: int = 10) -> tuple[Any, ...]:
    """An accumulator over a random stream whose maxima grow (bins merge), and an atlas file with its contexts."""
    g = torch.Generator().manual_seed(0)
    acc = FeatureAccumulator(F, top_k=5, bins=8, samples=3, hist_bins=16, before=6, after=3, seed=1)
    conn = create(tmp_path / "a.db")
    vocab = [f"t{i}" if i % 7 else f" é{i}\n" for i in range(50)]
    n_ctx = 0
    for i in range(n_batches):
        B = 3
        z = torch.relu(torch.randn(B, C, F, generator=g) * (1 + i) - 1.5)
        z[:, :, : F // 4] = torch.round(z[:, :, : F // 4])  # ties in activation
        special = torch.zeros(B, C, dtype=torch.bool)
        special[:, 0] = True
        acc.update(z, special, torch.arange(n_ctx, n_ctx + B))
        tokens = torch.randint(0, 55, (B, C), generator=g).numpy()  # some ids outside the vocabulary
        db_write.insert_contexts(conn, n_ctx, tokens)
        n_ctx += B
    conn.commit()
    return acc, conn, vocab, C


def test_example_rows_equal_the_row_by_row_reference(tmp_path: Path) -> None:
    acc, conn, vocab, C = _accumulated(tmp_path)
    rows, bins = _example_rows(acc, conn, vocab, C)
    want_rows, want_bins = _reference_example_rows(acc, conn, vocab, C)
    assert len(rows) > 200 and any(r[1] == "quantile" for r in rows) and any(r[7] == 0 for r in rows)
    assert any(len(r[8]) < 4 * acc.W for r in rows), "windows cut at the context's edges are exercised"
    assert rows == want_rows
    assert bins == want_bins
    for got, want in zip(rows, want_rows, strict=True):  # same Python types as well (what SQLite stores)
        assert [type(x) for x in got] == [type(x) for x in want]


def test_example_rows_of_an_empty_accumulator(tmp_path: Path) -> None:
    acc = FeatureAccumulator(6, top_k=2, bins=4, samples=2, hist_bins=4, before=2, after=1)
    conn = create(tmp_path / "e.db")
    assert _example_rows(acc, conn, ["a"], 8) == ([], [])


@pytest.mark.parametrize("max_pairs", [1, 50, 1 << 22])
def test_cofire_counts_equal_the_sparse_product(max_pairs: int) -> None:
    g = torch.Generator().manual_seed(3)
    F, n = 700, 900
    p = torch.rand(F, generator=g) ** 3  # skewed: frequent pairs and many ties
    sample = CofireSample(F)
    for lo in (0, 400):  # two pieces, as batches arrive
        rows, cols = [], []
        for t in range(lo, min(n, lo + 400) if lo == 0 else n):
            m = int(torch.randint(0, 12, (1,), generator=g))
            if m:
                rows.append(torch.full((m,), t - lo))
                cols.append(torch.multinomial(p, m, generator=g).sort().values)
        sample.add(torch.cat(rows), torch.cat(cols), (400 if lo == 0 else n - 400))
    got = sample.top(10, chunk=256, max_pairs=max_pairs)
    want = _reference_cofire(sample, 10, chunk=256)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_the_trigram_index_holds_what_its_trigger_would(tmp_path: Path) -> None:
    conn = create(tmp_path / "t.db")
    if not has_table(conn, TRIGRAM_TABLE):
        pytest.skip("this SQLite has no trigram tokenizer")
    texts = ["def f(x) >>> 1", "x == y", "plain words", "a(b)", "tail == end"]
    examples = [
        (f, kind, -1 if kind == "top" else 0, r, 0, 1, 1.0, 0, b"", 5, texts[(f + r) % len(texts)])
        for f in range(3) for kind in ("top", "quantile") for r in range(2)
    ]  # fmt: skip
    db_write.insert_contexts(conn, 0, np.zeros((1, 4), dtype=np.int64))
    db_write.write_build(conn, ["a"], [], examples, [], {})
    want = {(f << 16) | r for f, kind, _, r, *_, text in examples if kind == "top" and "== " in text}
    got = {row[0] for row in conn.execute(f"SELECT rowid FROM {TRIGRAM_TABLE} WHERE text MATCH '\"== \"'")}
    assert got == want and want
    trigger = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name = 'examples_search_trigram'")
    assert trigger.fetchone() is not None, "the trigger is back for rows written later"
