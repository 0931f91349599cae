"""`lmscope export ATLAS --static OUT`: the explorer as plain files, to host anywhere or open from disk.

The overview and every feature page are rendered by the explorer's own templates (read-only: no label editing,
no inspector or steering, which need a running model), with their links made relative so that the site works from
any folder and over `file://`. The feature list is one page whose search runs in the browser over
`features/index.js` (ids, densities, activations, labels and each feature's top example text); it holds at most
`MAX_STATIC_FEATURES` features (`limit` exports the first N of a larger atlas). Every feature's JSON, as the API
serves it, goes to `api/features/{id}.json`, and as circuit-tracer's attribution-graph viewer reads it to
`features/{scan}/{id}.json` (lmscope.atlas.neuronpedia: the fields, and how a graph node names its file); the scan
defaults to the atlas's model and hook, the name lmscope's graphs give a layer's transcoder features. The feature map
and its families go to `map.html`, their data inside the page (a page opened from disk cannot fetch them).

The site is written into a temporary folder beside OUT and renamed into place when complete: an interrupted export
leaves no half-written site, and an existing non-empty OUT is refused rather than overwritten.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from lmscope.atlas.db.schema import AtlasError
from lmscope.atlas.neuronpedia import atlas_scan, check_scan, feature_json
from lmscope.atlas.store import AtlasStore
from lmscope.core.progress import ProgressCallback, ProgressEvent
from lmscope.errors import LmscopeError
from lmscope.web import pages
from lmscope.web.app import STATIC, plotly_js
from lmscope.web.map_api import map_page_context

MAX_STATIC_FEATURES = 65_536  # the client-side search index stays a few MB (about 150 bytes a feature)
LINK = re.compile(r'(href|src|action)="/([^"]*)"')
FEATURE = re.compile(r"features/(\d+)")
SITE_NAMES = re.compile(r"\d+\.html|index\.(html|json|js)")  # the site's own files in features/: no scan folder


class ExportError(LmscopeError):
    """The static export cannot be written as asked."""


def _request(store: AtlasStore) -> Any:
    """What the templates read from a request: the app's state, for a read-only site without a model."""
    state = SimpleNamespace(store=store, live=None, live_note="a static export has no model", read_only=True,
                            graphs_dir=None, diffs_dir=None, audits_dir=None)  # fmt: skip
    return SimpleNamespace(app=SimpleNamespace(state=state))


def relink(html: str, prefix: str, exported: int) -> str:
    """Make the explorer's absolute links relative to a page `prefix` ("" at the root, "../" one folder down):
    `/` the overview, `/features[?q]` the list, `/features/N` a feature page (the list, for one not exported),
    `/map` the feature map, `/static/...` and `/vendor/...` the assets."""

    def one(m: re.Match[str]) -> str:
        attr, path = m.group(1), m.group(2)
        base, sep, query = path.partition("?")
        base, _, frag = base.partition("#")
        if base == "":
            target = "index.html"
        elif base == "features":
            target = "features/index.html" + (sep + query if sep else "")
        elif (fm := FEATURE.fullmatch(base)) is not None:
            fid = int(fm.group(1))
            target = f"features/{fid}.html" if fid < exported else "features/index.html"
        elif base == "map":  # the feature map, one page (its families are in the page, picked by #family-N)
            target = "map.html"
        elif base.startswith(("static/", "vendor/")):
            target = base
        else:  # a page a static site does not have (the inspector, graphs, the API): leave the link out
            return f'{attr}="#"'
        return f'{attr}="{prefix}{target}{"#" + frag if frag else ""}"'

    return LINK.sub(one, html)


def _index_row(store: AtlasStore, f: dict[str, Any]) -> dict[str, Any]:
    lab = f.get("label") or {}
    top = f.get("top_examples") or []
    return {"id": f["id"], "density": f["density"], "max_act": f["max_act"], "mean_act": f["mean_act"],
            "dead": bool(f["dead"]), "label": lab.get("text"), "score": lab.get("score"),
            "text": top[0]["text"] if top else ""}  # fmt: skip


def site_scan(store: AtlasStore, scan: str | None) -> str:
    """The scan folder of the viewer's feature JSON: `scan`, checked, or the atlas's default."""
    try:
        name = atlas_scan(store.summary, store.provenance) if scan is None else check_scan(scan, "--scan")
    except AtlasError as exc:
        raise ExportError(str(exc)) from None
    if SITE_NAMES.fullmatch(name):
        raise ExportError(f"--scan {name!r} is the name of one of the site's own files in features/; choose another")
    return name


def export_static(
    atlas: str | Path,
    out: str | Path,
    limit: int | None = None,
    progress: ProgressCallback | None = None,
    scan: str | None = None,
) -> dict[str, Any]:
    """Write the static site for `atlas` into `out` (which must not exist or be empty); returns a summary. `scan`
    names the folder of the viewer's feature JSON, `features/{scan}/` (default: the atlas's model and hook)."""
    store = AtlasStore(atlas)
    scan = site_scan(store, scan)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty folder; choose a new --static folder or empty it")
    n = store.n_features if limit is None else min(int(limit), store.n_features)
    if limit is not None and limit < 1:
        raise ExportError(f"--limit must be at least 1, got {limit}")
    if n > MAX_STATIC_FEATURES:
        raise ExportError(
            f"the atlas has {n:,} features; a static site's in-browser search holds at most {MAX_STATIC_FEATURES:,}: "
            f"pass --limit {MAX_STATIC_FEATURES} (the first features) or serve it with `lmscope serve`"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        request = _request(store)
        shutil.copytree(STATIC, tmp / "static")
        js = plotly_js()
        if js is not None:  # without plotly the pages draw no histograms and say so
            (tmp / "vendor").mkdir()
            shutil.copy(js, tmp / "vendor" / "plotly.min.js")
        (tmp / "features" / scan).mkdir(parents=True)
        (tmp / "api" / "features").mkdir(parents=True)
        html = pages.render("overview.html", request, static=True, **pages.overview_context(store))
        (tmp / "index.html").write_text(relink(html, "", n), encoding="utf-8")
        rows = []
        for fid in range(n):
            f = store.feature(fid)
            if f is None:
                continue
            (tmp / "api" / "features" / f"{fid}.json").write_text(json.dumps(f), encoding="utf-8")
            viewer = json.dumps(feature_json(f, scan), ensure_ascii=False, separators=(",", ":"))
            (tmp / "features" / scan / f"{fid}.json").write_text(viewer, encoding="utf-8")
            html = pages.render("feature.html", request, static=True, **pages.feature_context(store, f, True))
            (tmp / "features" / f"{fid}.html").write_text(relink(html, "../", n), encoding="utf-8")
            rows.append(_index_row(store, f))
            if progress and (fid % 256 == 0 or fid == n - 1):
                progress(ProgressEvent("export", fid + 1, n, "features"))
        index = json.dumps(rows, separators=(",", ":"))
        (tmp / "features" / "index.json").write_text(index, encoding="utf-8")
        # a script, not a fetch: browsers refuse fetch() of a local file, so the site works from disk too
        (tmp / "features" / "index.js").write_text(f"window.LMSCOPE_FEATURES = {index};\n", encoding="utf-8")
        html = pages.render("static_features.html", request, static=True, exported=n, total=store.n_features)
        (tmp / "features" / "index.html").write_text(relink(html, "../", n), encoding="utf-8")
        html = pages.render("map.html", request, static=True, **map_page_context(store, static=True, exported=n))
        (tmp / "map.html").write_text(relink(html, "", n), encoding="utf-8")  # "no map" when the atlas has none
        tmp.chmod(0o755)  # mkdtemp makes it private; a site is for others to read
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        progress(ProgressEvent("export", n, n, "features", finished=True))
    return {"out": str(out), "features": n, "total": store.n_features, "index_bytes": len(index), "scan": scan}
