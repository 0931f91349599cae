"""Feature families ("organs"): a hierarchy of the live features by decoder geometry and co-firing, and a 2-D map.

The distance between two live features i, j mixes the cosine of their decoder directions and how often they fire
together:

    d(i, j) = 1 - [(1 - w) cos(W_dec[i], W_dec[j]) + w cofire(i, j)],   w = `FamilyConfig.cofire_weight`

where cofire(i, j) = c_ij / sqrt(n_i n_j), the cosine of the two features' binary firing patterns over the atlas's
co-firing sample (c_ij tokens where both fire, n_i where i fires). The atlas stores c_ij only for each feature's
`AtlasConfig.cofire` most frequent partners (features.cofire, with n_i = c_ij / fraction), so every other pair counts
as 0: co-firing is a sparse signal here, decoder cosine a dense one.

Hierarchy: average-linkage agglomerative clustering (scipy) of that distance, cut at several levels (numbers of
families, coarsest first); the cuts of one tree nest, so each family's parent is the family of the level above that
holds it. Average linkage works on any distance (Ward assumes a Euclidean one) and, on the demo's SAE, gives families
of balanced sizes with no singletons (docs/atlas.md).

Map: t-SNE (scikit-learn, Barnes-Hut) of the same distance, given as each feature's nearest neighbours, started from
the first two principal components of the unit decoder directions. It is the bulk of the time (tens of seconds for
4,608 features on one core); a spectral embedding of the same neighbour graph, the other candidate scikit-learn
offers, kept far fewer of each point's map neighbours in its family (docs/atlas.md has both measured). UMAP is not a
dependency.

Dead features have no place in either: they never fired, so they have no co-firing and no examples to label by.
Families are labelled from their members (lmscope.atlas.family_labels). Everything is stored in the atlas's
optional `families` and `family_map` tables (lmscope.atlas.db.families), by `add_families` on an existing atlas
(`lmscope families ATLAS`) or at the end of a build (`AtlasConfig.families`).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmscope.atlas.db import read
from lmscope.atlas.db.families import cofire_lists, peak_tokens, write_families
from lmscope.atlas.db.labels import shown_labels
from lmscope.atlas.db.schema import AtlasError, Connection, get_meta, open_for_writing
from lmscope.atlas.family_labels import base_rates, label_family, member_terms

BYTES_PER_PAIR = 10  # peak memory per feature pair: the float32 distance matrix, its condensed copy, scipy's float64
SHUFFLES = 5  # shuffled family assignments the quality figures are compared with
MAP_NEIGHBOURS = 10  # map neighbours of each point checked against its family


class FamilyError(AtlasError):
    """Families cannot be computed as asked (settings, dictionary, size of the atlas)."""


@dataclass
class FamilyConfig:
    """How families and the map are computed (see the module's docstring)."""

    cofire_weight: float = 0.5  # w in the distance: 0 decoder cosine only, 1 co-firing only (docs/atlas.md)
    levels: tuple[int, ...] | None = None  # families per level, coarsest first; None: about n/256, n/64, n/16
    perplexity: float = 30.0  # t-SNE's (capped below a third of the live features)
    iterations: int = 500  # t-SNE's optimisation steps (the first 250 exaggerate the clusters)
    seed: int = 0
    max_features: int = 16_384  # live features at most (memory: about 10 bytes per pair, 2.7 GB at 16,384)
    label_min_share: float = 0.5  # a term names a family when at least this share of its members have it ...
    label_min_lift: float = 2.0  # ... and it is at least this many times as common there as among all features

    def __post_init__(self) -> None:
        if not 0.0 <= self.cofire_weight <= 1.0:
            raise FamilyError(f"the co-firing weight must be between 0 and 1 (0: decoder cosine only, 1: co-firing "
                              f"only), got {self.cofire_weight:g}; pass e.g. --cofire-weight 0.3")  # fmt: skip
        if self.levels is not None:
            lv = tuple(int(k) for k in self.levels)
            if not lv or any(k < 1 for k in lv) or list(lv) != sorted(set(lv)):
                got = ",".join(map(str, self.levels)) or "none"
                raise FamilyError(f"levels must be numbers of families, at least 1 and increasing (coarsest first), "
                                  f"e.g. --levels 16,64,256; got {got}")  # fmt: skip
            self.levels = lv
        if self.perplexity <= 0 or self.iterations < 250:
            raise FamilyError("the perplexity must be positive and the iterations at least 250 (t-SNE's first 250 "
                              "steps only exaggerate the clusters)")  # fmt: skip
        if self.max_features < 2:
            raise FamilyError(f"max_features must be at least 2, got {self.max_features}")
        if not 0.0 < self.label_min_share <= 1.0 or self.label_min_lift < 1.0:
            raise FamilyError("label_min_share must be in (0, 1] and label_min_lift at least 1")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["levels"] = list(self.levels) if self.levels is not None else None
        return d


def auto_levels(n: int) -> tuple[int, ...]:
    """Families per level for `n` live features when none are given: about n/256, n/64 and n/16 (families of 256,
    64 and 16 members on average), at least 2 and below n, without repeats."""
    return tuple(sorted({min(max(2, round(n / s)), max(1, n - 1)) for s in (256, 64, 16)}))


# ---------------------------------------------------------------------------------------------------- geometry
def unit_rows(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, dtype=np.float32)
    return w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)


def cofire_pairs(ids: list[int], lists: dict[int, list[list[float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, values): cofire(i, j) = c_ij / sqrt(n_i n_j) for the stored pairs of live features, in positions
    of `ids`, each pair once per direction (the larger value if both features list it)."""
    pos = {f: i for i, f in enumerate(ids)}
    own = np.zeros(len(ids))
    for f, partners in lists.items():
        for _j, c, frac in partners:
            if frac > 0 and f in pos:
                own[pos[f]] = round(c / frac)  # n_i, from any partner (fraction = c_ij / n_i)
                break
    vals: dict[tuple[int, int], float] = {}
    for f, partners in lists.items():
        i = pos.get(f)
        for j_id, c, _frac in partners:
            j = pos.get(int(j_id))
            if i is None or j is None or i == j or own[i] <= 0 or own[j] <= 0:
                continue
            v = min(1.0, float(c) / float(np.sqrt(own[i] * own[j])))
            for key in ((i, j), (j, i)):
                vals[key] = max(vals.get(key, 0.0), v)
    if not vals:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    keys = np.array(list(vals), dtype=np.int64)
    return keys[:, 0], keys[:, 1], np.array(list(vals.values()), dtype=np.float32)


def distance_matrix(units: np.ndarray, cofire: tuple[np.ndarray, np.ndarray, np.ndarray], w: float) -> np.ndarray:
    """The dense float32 distance d(i, j) of the module's docstring, clipped at 0, with a zero diagonal."""
    d = units @ units.T
    d *= 1.0 - w
    r, c, v = cofire
    d[r, c] += w * v
    np.subtract(1.0, d, out=d)
    np.clip(d, 0.0, None, out=d)
    np.fill_diagonal(d, 0.0)
    return d


def hierarchy(d: np.ndarray, levels: tuple[int, ...]) -> list[np.ndarray]:
    """Per level, each feature's family index: 0 the largest family (ties: the one with the lowest member)."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    z = linkage(squareform(d, checks=False), method="average")
    out = []
    for k in levels:
        raw = fcluster(z, k, criterion="maxclust")
        fams = np.unique(raw)
        sizes = np.array([(raw == f).sum() for f in fams])
        first = np.array([np.flatnonzero(raw == f)[0] for f in fams])
        order = np.lexsort((first, -sizes))
        remap = np.empty(int(raw.max()) + 1, dtype=np.int64)
        remap[fams[order]] = np.arange(len(fams))
        out.append(remap[raw])
    return out


def _tsne(**kwargs: Any) -> Any:
    from sklearn.manifold import TSNE

    iters = kwargs.pop("iterations")
    key = "max_iter" if "max_iter" in inspect.signature(TSNE).parameters else "n_iter"  # renamed in scikit-learn 1.5
    return TSNE(**kwargs, **{key: iters})


def layout(d: np.ndarray, units: np.ndarray, cfg: FamilyConfig) -> np.ndarray:
    """[n, 2] map coordinates: t-SNE of the distance `d` (each row's nearest neighbours as a sparse graph), started
    from the principal components of `units`, centred. Fewer than 8 features: those principal components."""
    import scipy.sparse as sp
    from sklearn.neighbors import sort_graph_by_row_values

    n = d.shape[0]
    centred = units - units.mean(0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    init = u[:, :2] * s[:2] if u.shape[1] >= 2 else np.column_stack([u[:, 0] * s[0], np.zeros(n)])
    init = init.astype(np.float64)
    if n < 8:
        return init - init.mean(0)
    init = init / max(float(init[:, 0].std()), 1e-12) * 1e-4  # scikit-learn's scale for its own PCA start
    perplexity = min(cfg.perplexity, (n - 1) / 3.0)
    k = min(n - 1, int(3.0 * perplexity + 1))  # the neighbours scikit-learn reads per row, besides the row itself
    np.fill_diagonal(d, np.inf)
    nn = np.argpartition(d, k - 1, axis=1)[:, :k]
    np.fill_diagonal(d, 0.0)
    rows = np.repeat(np.arange(n), k)
    vals = d[rows, nn.ravel()].astype(np.float64) + 1e-6  # no stored zero: a sparse graph would drop it
    own = np.arange(n)  # each row holds itself too, nearest of all (scikit-learn skips it as the query point)
    graph = sp.csr_matrix((np.concatenate([vals, np.full(n, 1e-9)]), (np.concatenate([rows, own]),
                           np.concatenate([nn.ravel(), own]))), shape=(n, n))  # fmt: skip
    graph = sort_graph_by_row_values(graph, warn_when_not_sorted=False)
    tsne = _tsne(n_components=2, metric="precomputed", init=init, perplexity=perplexity, iterations=cfg.iterations,
                 random_state=cfg.seed)  # fmt: skip
    y = np.asarray(tsne.fit_transform(graph), dtype=np.float64)
    return y - y.mean(0)


# ---------------------------------------------------------------------------------------------------- quality
def within_means(
    fam: np.ndarray, units: np.ndarray, cofire: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Per family: mean decoder cosine and mean co-firing over pairs of its members (NaN for one member); and the
    same over all within-family pairs of the level (pairs weighted equally)."""
    k = int(fam.max()) + 1
    cos_sum, pairs = np.zeros(k), np.zeros(k)
    for f in range(k):
        m = np.flatnonzero(fam == f)
        u = units[m]
        g = u.sum(0)
        cos_sum[f] = float(g @ g) - float((u * u).sum())  # sum over ordered pairs i != j of cos(i, j)
        pairs[f] = len(m) * (len(m) - 1)
    r, c, v = cofire
    same = fam[r] == fam[c]
    cof_sum = np.bincount(fam[r[same]], weights=v[same], minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos_f, cof_f = cos_sum / pairs, cof_sum / pairs
    total = max(pairs.sum(), 1.0)
    return cos_f, cof_f, float(cos_sum.sum() / total), float(cof_sum.sum() / total)


def map_neighbours(y: np.ndarray) -> np.ndarray:
    """[n, k]: each point's `MAP_NEIGHBOURS` nearest other points on the map (fewer when there are fewer)."""
    from sklearn.neighbors import NearestNeighbors

    k = min(MAP_NEIGHBOURS, len(y) - 1)
    if k < 1:
        return np.zeros((len(y), 0), dtype=np.int64)
    return NearestNeighbors(n_neighbors=k + 1).fit(y).kneighbors(y, return_distance=False)[:, 1:]


def map_agreement(nn: np.ndarray, fam: np.ndarray) -> float:
    """The share of each point's nearest map neighbours (`map_neighbours`) that are in its family."""
    return float((fam[nn] == fam[:, None]).mean()) if nn.size else float("nan")


# ---------------------------------------------------------------------------------------------------- compute
def _r(x: float, digits: int = 4) -> float | None:
    return None if x != x else round(float(x), digits)


def compute_families(
    conn: Connection, w_dec: Any, cfg: FamilyConfig | None = None, log: Callable[[str], None] | None = None
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], dict[str, Any]]:
    """(family rows, map rows, meta) for the atlas open on `conn` and its dictionary's decoder `w_dec` [d_sae, d_in]
    (a tensor or an array), as lmscope.atlas.db.families.write_families stores them."""
    import json

    cfg = cfg or FamilyConfig()
    log = log or (lambda _m: None)
    started = time.perf_counter()
    w = w_dec.detach().float().cpu().numpy() if hasattr(w_dec, "detach") else np.asarray(w_dec, dtype=np.float32)
    w = w.reshape(w.shape[0], -1) if w.ndim > 2 else w  # a crosscoder's [d_sae, models, d_in]: one direction
    n_total, _live = read.feature_counts(conn)
    if w.ndim != 2 or w.shape[0] != n_total:
        raise FamilyError(f"the decoder has {w.shape[0] if w.ndim == 2 else '?'} rows but the atlas {n_total} "
                          "features: pass the dictionary the atlas was built with (--dict)")  # fmt: skip
    ids = read.live_feature_ids(conn)
    n = len(ids)
    if n < 2:
        raise FamilyError(f"families need at least 2 live features; this atlas has {n} (rebuild it on more tokens)")
    if n > cfg.max_features:
        gb = BYTES_PER_PAIR * n * n / 1e9
        raise FamilyError(
            f"this atlas has {n:,} live features; families of them need about {gb:.1f} GB (a dense {n:,} x {n:,} "
            f"distance): raise --max-features to {n} if the machine has it"
        )
    levels = cfg.levels if cfg.levels is not None else auto_levels(n)
    if levels[-1] > n:
        hint = ",".join(str(k) for k in auto_levels(n))
        raise FamilyError(f"--levels asks for up to {levels[-1]:,} families but the atlas has only {n:,} live "
                          f"features; ask for at most {n:,} (e.g. --levels {hint})")  # fmt: skip
    units = unit_rows(w[ids])
    cof = cofire_pairs(ids, cofire_lists(conn, ids))
    t0 = time.perf_counter()
    d = distance_matrix(units, cof, cfg.cofire_weight)
    td = time.perf_counter()
    log(f"families: {n:,} live features, distance ready; clustering into {', '.join(map(str, levels))} families")
    fams = hierarchy(d, levels)
    t1 = time.perf_counter()
    log("families: laying out the map (t-SNE)")
    y = layout(d, units, cfg)
    del d
    nn = map_neighbours(y)
    t2 = time.perf_counter()
    # labels from the members' peak tokens and shown labels
    vocab = read.vocab_texts(conn)
    peaks = peak_tokens(conn, ids)
    shown = {f: str(v["text"]) for f, v in shown_labels(conn, ids).items()}
    terms = {f: member_terms([vocab[t] if 0 <= t < len(vocab) else "" for t in peaks.get(f, [])], shown.get(f))
             for f in ids}  # fmt: skip
    base = base_rates(terms)
    ids_arr = np.array(ids)
    rng = np.random.default_rng(cfg.seed)
    family_rows: list[tuple[Any, ...]] = []
    offsets: list[int] = []
    quality: list[dict[str, Any]] = []
    offset = 0
    for li, fam in enumerate(fams):
        k = int(fam.max()) + 1
        cos_f, cof_f, cos_all, cof_all = within_means(fam, units, cof)
        labelled = 0
        for f in range(k):
            m = np.flatnonzero(fam == f)
            members = ids_arr[m].tolist()
            text, tj = label_family(members, terms, base, shown, cfg.label_min_share, cfg.label_min_lift)
            labelled += len(m) > 1 and any(t["shared"] for t in tj)
            parent = None
            if li > 0:
                parent = offsets[li - 1] + int(np.bincount(fams[li - 1][m]).argmax())
            family_rows.append((
                offset + f, li, parent, len(m), text, json.dumps(tj, ensure_ascii=False), _r(y[m, 0].mean(), 3),
                _r(y[m, 1].mean(), 3), _r(cos_f[f]), _r(cof_f[f]), json.dumps(members),
            ))  # fmt: skip
        multi = int(sum(np.bincount(fam) > 1))
        shuffled: dict[str, list[float]] = {"cos": [], "cofire": [], "labelled": [], "map": []}
        for _ in range(SHUFFLES):
            p = rng.permutation(fam)
            _, _, sc, sf = within_means(p, units, cof)
            sl = sum(any(t["shared"] for t in label_family(ids_arr[p == f].tolist(), terms, base, shown,
                                                             cfg.label_min_share, cfg.label_min_lift)[1])
                     for f in range(k) if (p == f).sum() > 1)  # fmt: skip
            shuffled["cos"].append(sc)
            shuffled["cofire"].append(sf)
            shuffled["labelled"].append(sl / max(multi, 1))
            shuffled["map"].append(map_agreement(nn, p))
        sizes = np.bincount(fam)
        quality.append({
            "level": li, "families": k, "largest": int(sizes.max()), "median_size": float(np.median(sizes)),
            "singletons": int((sizes == 1).sum()),
            "cos_within": _r(cos_all, 5), "cos_within_shuffled": _r(float(np.mean(shuffled["cos"])), 5),
            "cofire_within": _r(cof_all, 5), "cofire_within_shuffled": _r(float(np.mean(shuffled["cofire"])), 5),
            "labelled": _r(labelled / max(multi, 1)), "labelled_shuffled": _r(float(np.mean(shuffled["labelled"]))),
            "map_agreement": _r(map_agreement(nn, fam)), "map_agreement_shuffled": _r(float(np.mean(shuffled["map"]))),
        })  # fmt: skip
        offsets.append(offset)
        offset += k
    family_rows = name_sub_families(family_rows)
    map_rows = [
        (int(f), round(float(y[i, 0]), 3), round(float(y[i, 1]), 3),
         json.dumps([offsets[li] + int(fam[i]) for li, fam in enumerate(fams)]))
        for i, f in enumerate(ids)
    ]  # fmt: skip
    t3 = time.perf_counter()
    meta = {
        "config": cfg.to_dict() | {"levels": list(levels)},
        "method": {"distance": "1 - [(1 - w) decoder cosine + w co-firing cosine]", "linkage": "average",
                   "layout": "t-SNE (scikit-learn, Barnes-Hut, from a PCA start)"},
        "live": n, "dead_excluded": n_total - n, "level_offsets": offsets,
        "levels": [int(f.max()) + 1 for f in fams],  # as cut: fewer than asked only where merge heights tie
        "cofire_pairs": int(len(cof[0]) // 2),
        "seconds": {"inputs": round(t0 - started, 2), "distance": round(td - t0, 2), "cluster": round(t1 - td, 2),
                    "layout": round(t2 - t1, 2), "labels_and_quality": round(t3 - t2, 2),
                    "total": round(t3 - started, 2)},
        "quality": quality,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }  # fmt: skip
    return family_rows, map_rows, meta


def name_sub_families(rows: list[tuple[Any, ...]], most: int = 3) -> list[tuple[Any, ...]]:
    """Rows (in DDL order) with each mixed family of a coarser level told which of its finest-level sub-families are
    named by a shared term, the `most` largest: "...; named within: ‘self’ 36/37, ‘if’ 33/42"."""
    import json

    by_id = {r[0]: r for r in rows}
    finest = max((r[1] for r in rows), default=0)
    named: dict[int, list[tuple[int, str]]] = {}
    for r in rows:
        if r[1] != finest:
            continue
        shared = [t for t in json.loads(r[5]) if t["shared"]]
        if not shared:
            continue
        note = f"‘{shared[0]['term']}’ {shared[0]['count']}/{r[3]}"
        parent = r[2]
        while parent is not None:
            named.setdefault(parent, []).append((r[3], note))
            parent = by_id[parent][2]
    out = []
    for r in rows:
        subs = sorted(named.get(r[0], []), key=lambda s: -s[0])[:most]
        if subs and r[4].startswith("mixed"):
            r = (*r[:4], f"{r[4]}; named within: {', '.join(s for _, s in subs)}", *r[5:])
        out.append(r)
    return out


def write_at_build(conn: Connection, w_dec: Any, log: Callable[[str], None], cfg: FamilyConfig | None = None) -> None:
    """The end of an atlas build: families and the map into the atlas being written (`conn`). One that cannot have
    them (too few or too many live features), or whose families fail to compute, is left without them (a complete
    atlas, read as "no map"), saying so and how to add them later."""
    try:
        family_rows, map_rows, meta = compute_families(conn, w_dec, cfg, log)
    except FamilyError as exc:
        log(f"no feature families: {exc} (add them later with `lmscope families ATLAS`)")
        return
    except Exception as exc:  # an optional table: the atlas is complete without it, and says how to add it
        log(f"no feature families: computing them failed ({type(exc).__name__}: {exc}); the atlas is complete "
            "without them; add them later with `lmscope families ATLAS`")  # fmt: skip
        return
    meta["dictionary"] = "the atlas build's own"
    write_families(conn, family_rows, map_rows, meta)


def _dictionary_for(conn: Connection, atlas: Path, dictionary: Any) -> tuple[Any, str]:
    """The atlas's dictionary (given, or where its provenance says) and its path; FamilyError when it is missing or
    not the one the atlas was built with."""
    from lmscope.dictionaries.base import Dictionary
    from lmscope.dictionaries.formats import dictionary_hash
    from lmscope.dictionaries.pretrained import open_dictionary
    from lmscope.errors import LmscopeError

    prov = get_meta(conn, "provenance", {}) or {}
    recorded = prov.get("dictionary") or {}
    if dictionary is None:
        path = recorded.get("path")
        if not path or not Path(path).exists():
            where = f"at {path}, which is not there" if path else "nowhere"
            raise FamilyError(f"the atlas records its dictionary {where}; pass it with --dict DIR (dictionary=...)")
        dictionary = path
    name = "the given dictionary"
    if not isinstance(dictionary, Dictionary):
        name = str(dictionary)
        try:
            dictionary = open_dictionary(dictionary, hook=prov.get("hook"))
        except (LmscopeError, OSError) as exc:
            raise FamilyError(f"cannot open the dictionary {name} ({exc}); pass the atlas's dictionary with --dict")  # noqa: B904
    want = recorded.get("sha256")
    if want and dictionary_hash(dictionary) != want:
        was = recorded.get("path") or "unrecorded"
        raise FamilyError(f"{name} is not the dictionary {atlas} was built with (its sha256 differs from the "
                          f"atlas's record); pass that dictionary with --dict ({was})")  # fmt: skip
    return dictionary, name


def add_families(
    atlas: str | Path, dictionary: Any = None, config: FamilyConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Compute the families and map of an existing atlas and store them in it (replacing any), in one transaction:
    a failure leaves the atlas as it was. `dictionary` is a Dictionary or a path (default: the one the atlas records);
    it must be the one the atlas was built with. Returns the `families` meta entry written."""
    atlas = Path(atlas)
    conn = open_for_writing(atlas)  # AtlasError for a missing, unfinished or too-new file
    try:
        d, name = _dictionary_for(conn, atlas, dictionary)
        family_rows, map_rows, meta = compute_families(conn, d.W_dec, config, log)
        meta["dictionary"] = name
        write_families(conn, family_rows, map_rows, meta)
    finally:
        conn.close()
    return meta
