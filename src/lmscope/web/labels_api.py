"""Human labels from the explorer: set, correct or remove a feature's human label (machine labels stay as they are).

Mount it in `create_app` with `app.include_router(labels_api.router)`. The explorer's store reads the atlas
read-only; these routes open their own short-lived read-write connection (the atlas is in WAL mode, so readers
are not blocked). An atlas in a read-only place answers 409 with the reason.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field

from lmscope.errors import LmscopeError
from lmscope.explain.labels import MAX_LABEL_CHARS, feature_labels, open_rw, remove_human_label, set_human_label

router = APIRouter(prefix="/api", tags=["labels"])


class HumanLabel(BaseModel):
    text: str = Field(min_length=1, max_length=MAX_LABEL_CHARS, description="what the feature fires on")
    author: str | None = Field(None, max_length=100)


class StoredLabel(BaseModel):
    id: int
    text: str
    source: str
    explainer: str | None = None
    score: float | None = None
    scorer: str | None = None
    created: str


def _write(request: Request, fn: Any) -> list[dict[str, Any]]:
    path = request.app.state.store.path
    try:
        conn = open_rw(path)
    except (LmscopeError, sqlite3.Error) as exc:
        raise HTTPException(409, f"the atlas cannot be written ({exc}); run the server on a writable copy") from None
    try:
        return fn(conn)  # type: ignore[no-any-return]
    except LmscopeError as exc:
        raise HTTPException(404 if "not in this atlas" in str(exc) else 422, str(exc)) from None
    except sqlite3.OperationalError as exc:
        raise HTTPException(409, f"the atlas cannot be written ({exc})") from None
    finally:
        conn.close()


@router.get("/features/{fid}/labels", response_model=list[StoredLabel])
def get_labels(request: Request, fid: int) -> list[dict[str, Any]]:
    """Every label of a feature (human first), with its explainer, score and scorer."""
    conn = request.app.state.store.conn
    return feature_labels(conn, fid)


@router.put("/features/{fid}/label", response_model=list[StoredLabel], responses={404: {}, 409: {}, 422: {}})
def put_label(request: Request, fid: int, body: HumanLabel) -> list[dict[str, Any]]:
    """Set or correct the human label of a feature; returns all its labels."""

    def run(conn: sqlite3.Connection) -> list[dict[str, Any]]:
        set_human_label(conn, fid, body.text, author=body.author)
        return feature_labels(conn, fid)

    return _write(request, run)


@router.delete("/features/{fid}/label", response_model=list[StoredLabel], responses={404: {}, 409: {}})
def delete_label(request: Request, fid: int) -> list[dict[str, Any]]:
    """Remove the human label of a feature; returns the labels left."""

    def run(conn: sqlite3.Connection) -> list[dict[str, Any]]:
        remove_human_label(conn, fid)
        return feature_labels(conn, fid)

    return _write(request, run)
