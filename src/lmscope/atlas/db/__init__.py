"""The atlas access layer: every SQL statement against an atlas file lives in this package.

- `schema`: the DDL, the schema version, connections (create, open, check, migrate) and `meta`;
- `read`: features, examples, contexts, vocabulary and full-text search;
- `labels`: labels and scores, read and written;
- `write`: the rows of an atlas build.

Everything else in lmscope calls these functions with a `Connection` and never writes SQL (tests/test_atlas_db.py).
"""

from lmscope.atlas.db.schema import (
    SCHEMA_VERSION,
    AtlasError,
    Connection,
    DbError,
    DbOperationalError,
    Row,
    create,
    get_meta,
    open_atlas,
    open_for_writing,
    set_meta,
)

__all__ = [
    "SCHEMA_VERSION",
    "AtlasError",
    "Connection",
    "DbError",
    "DbOperationalError",
    "Row",
    "create",
    "get_meta",
    "open_atlas",
    "open_for_writing",
    "set_meta",
]
