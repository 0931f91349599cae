"""Human labels from the explorer: set, correct or remove a feature's human label (machine labels stay as they are).

Mounted by `create_app`. The explorer's store reads the atlas read-only; the write routes open their own
short-lived read-write connection per request that changes only the `labels` table (the FTS `search` rows and
the deleted label's `scores` follow by trigger) and never migrates the file; the atlas is in WAL mode, so
readers are not blocked. An atlas in a read-only place answers 409 with the reason; a server started with
`lmscope serve --read-only` answers 403.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field

from lmscope.atlas.db.schema import Connection, DbError, DbOperationalError
from lmscope.errors import LmscopeError
from lmscope.explain.labels import MAX_LABEL_CHARS, feature_labels, open_rw, remove_human_label, set_human_label
from lmscope.web.api import LabelFull
from lmscope.web.state import is_read_only, store_of

router = APIRouter(prefix="/api", tags=["labels"])


class HumanLabel(BaseModel):
    text: str = Field(min_length=1, max_length=MAX_LABEL_CHARS, description="what the feature fires on")
    author: str | None = Field(None, max_length=100)


class StoredLabel(LabelFull):
    pass


READ_ONLY_NOTE = "label editing is off: this explorer was started with --read-only (restart it without it to edit)"


def _write(request: Request, fn: Callable[[Connection], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    if is_read_only(request):
        raise HTTPException(403, READ_ONLY_NOTE)
    path = store_of(request).path
    try:
        conn = open_rw(path, migrate=False)
    except (LmscopeError, DbError) as exc:
        raise HTTPException(409, f"the atlas cannot be written ({exc}); run the server on a writable copy") from None
    try:
        return fn(conn)
    except LmscopeError as exc:
        raise HTTPException(404 if "not in this atlas" in str(exc) else 422, str(exc)) from None
    except DbOperationalError as exc:
        raise HTTPException(409, f"the atlas cannot be written ({exc})") from None
    finally:
        conn.close()


@router.get("/features/{fid}/labels", response_model=list[StoredLabel])
def get_labels(request: Request, fid: int) -> list[dict[str, Any]]:
    """Every label of a feature (human first), with its explainer, latest score, and every scorer's score."""
    store = store_of(request)
    if not 0 <= fid < store.n_features:
        raise HTTPException(404, f"feature {fid} does not exist; ids run from 0 to {store.n_features - 1}")
    return feature_labels(store.conn, fid)


@router.put("/features/{fid}/label", response_model=list[StoredLabel], responses={403: {}, 404: {}, 409: {}, 422: {}})
def put_label(request: Request, fid: int, body: HumanLabel) -> list[dict[str, Any]]:
    """Set or correct the human label of a feature; returns all its labels."""

    def run(conn: Connection) -> list[dict[str, Any]]:
        set_human_label(conn, fid, body.text, author=body.author)
        return feature_labels(conn, fid)

    return _write(request, run)


@router.delete("/features/{fid}/label", response_model=list[StoredLabel], responses={403: {}, 404: {}, 409: {}})
def delete_label(request: Request, fid: int) -> list[dict[str, Any]]:
    """Remove the human label of a feature; returns the labels left."""

    def run(conn: Connection) -> list[dict[str, Any]]:
        remove_human_label(conn, fid)
        return feature_labels(conn, fid)

    return _write(request, run)
