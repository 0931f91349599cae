"""The atlas schema and connections, under their lmscope 0.1 import path.

They live in the access layer now: lmscope.atlas.db.schema (DDL, versions, open/create/migrate, meta) and
lmscope.atlas.db.labels (`add_label`, `label_scores`). This module re-exports them unchanged.
"""

from lmscope.atlas.db.labels import add_label, label_scores
from lmscope.atlas.db.schema import (
    DDL,
    FORMAT,
    SCHEMA_VERSION,
    SCORES_DDL,
    SCORES_STATEMENTS,
    AtlasError,
    check_version,
    create,
    get_meta,
    has_table,
    migrate_v1,
    open_atlas,
    set_meta,
)

__all__ = [
    "DDL",
    "FORMAT",
    "SCHEMA_VERSION",
    "SCORES_DDL",
    "SCORES_STATEMENTS",
    "AtlasError",
    "add_label",
    "check_version",
    "create",
    "get_meta",
    "has_table",
    "label_scores",
    "migrate_v1",
    "open_atlas",
    "set_meta",
]
