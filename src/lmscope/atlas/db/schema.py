"""The atlas file: one SQLite database in WAL mode, with a versioned schema (see docs/atlas.md).

`SCHEMA_VERSION` is stored in `meta` under `schema_version` and in `PRAGMA user_version`. A reader refuses a
file whose version is newer than its own; a file without `meta.complete = "1"` is an unfinished build and is
refused too (builds write to `OUT.partial` and rename it only once complete, so that should not happen).

Version history: 1 the first release; 2 adds the `scores` table (several scorers' scores per label). A
version-1 file is migrated forward in place when it is opened read-write (`migrate_v1`); opened read-only it
is read as it is (readers treat a missing `scores` table as empty).

Optional, within version 2: `search_trigram`, a trigram index of the top examples' text (substring search that
finds punctuation such as `>>>` or `==`), filled by a trigger as a build writes its examples. Atlases built
before it, or with an SQLite without the trigram tokenizer (before 3.34), lack it; readers then fall back to the
word index or a scan (lmscope.atlas.db.read), so its absence changes no version.

Optional, within version 2: `crosscoder_latents`, written only by an atlas of a two-model crosscoder (`lmscope
atlas BASE --other OTHER`, or `lmscope diff --atlas`): each latent's relative decoder norm and band, and the Latent
Scaling ratios that `lmscope diff` measures (NULL until it does). Readers treat its absence as "not a crosscoder".

This module holds the DDL and everything about connections: creating, opening, checking, migrating, `meta`.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from lmscope.errors import LmscopeError

SCHEMA_VERSION = 2
FORMAT = "lmscope.atlas"
BUSY_TIMEOUT_MS = 10_000  # how long a writer waits for another writer's lock

# The connection and error types of the access layer, so that callers never import the driver themselves.
Connection = sqlite3.Connection
Row = sqlite3.Row
DbError = sqlite3.Error
DbOperationalError = sqlite3.OperationalError


class AtlasError(LmscopeError):
    """An atlas file is missing, incomplete, damaged, or written by a newer lmscope."""


DDL = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL                    -- JSON
);
CREATE TABLE IF NOT EXISTS features (
    id         INTEGER PRIMARY KEY,        -- latent index in the dictionary
    n_fired    INTEGER NOT NULL,           -- tokens (special tokens excluded) where the activation is > 0
    density    REAL NOT NULL,              -- n_fired / tokens
    mean_act   REAL NOT NULL,              -- mean activation over the tokens where it fired (0 if dead)
    max_act    REAL NOT NULL,
    dead       INTEGER NOT NULL,           -- 1 if it never fired
    hist       TEXT NOT NULL,              -- JSON {"edges": [...], "counts": [...]} over (0, max]
    logits     TEXT,                       -- JSON {"positive": [[token_id, value]...], "negative": [...]}
    neighbours TEXT NOT NULL,              -- JSON [[feature, cosine]...] by decoder cosine, best first
    cofire     TEXT NOT NULL               -- JSON [[feature, count, fraction]...] from the co-firing sample
);
CREATE INDEX IF NOT EXISTS features_density ON features(density);
CREATE INDEX IF NOT EXISTS features_max_act ON features(max_act);
CREATE TABLE IF NOT EXISTS contexts (
    id     INTEGER PRIMARY KEY,            -- index of the context in the build's token stream
    tokens BLOB NOT NULL                   -- int32 little-endian token ids, `context` of them
);
CREATE TABLE IF NOT EXISTS examples (
    feature    INTEGER NOT NULL,
    kind       TEXT NOT NULL CHECK (kind IN ('top', 'quantile')),
    bin        INTEGER NOT NULL,           -- quantile bin (-1 for top examples)
    rank       INTEGER NOT NULL,           -- order within (feature, kind, bin)
    context    INTEGER NOT NULL REFERENCES contexts(id),
    pos        INTEGER NOT NULL,           -- position of the example token in the context
    act        REAL NOT NULL,              -- activation at `pos`
    start      INTEGER NOT NULL,           -- first position of the window
    acts       BLOB NOT NULL,              -- float32 activations of the feature at start .. start+len-1
    peak_token INTEGER NOT NULL,           -- token id at `pos`
    text       TEXT NOT NULL               -- the window decoded to text
);
CREATE INDEX IF NOT EXISTS examples_feature ON examples(feature, kind, bin, rank);
CREATE INDEX IF NOT EXISTS examples_peak_token ON examples(peak_token, kind);
CREATE TABLE IF NOT EXISTS quantile_bins (
    feature INTEGER NOT NULL,
    bin     INTEGER NOT NULL,
    lo      REAL NOT NULL,                 -- the bin holds activations in [lo, hi)
    hi      REAL NOT NULL,
    count   INTEGER NOT NULL,              -- firings in the bin (all of them, not just the samples)
    PRIMARY KEY (feature, bin)
);
CREATE TABLE IF NOT EXISTS vocab (
    id   INTEGER PRIMARY KEY,              -- token id
    text TEXT NOT NULL                     -- the token decoded on its own
);
CREATE INDEX IF NOT EXISTS vocab_text ON vocab(text);
CREATE TABLE IF NOT EXISTS labels (
    id        INTEGER PRIMARY KEY,
    feature   INTEGER NOT NULL,
    text      TEXT NOT NULL,
    source    TEXT NOT NULL CHECK (source IN ('human', 'machine')),
    explainer TEXT,                        -- machine labels: the explainer (model/prompt) that wrote it
    score     REAL,                        -- machine labels: the scorer's score
    scorer    TEXT,
    created   TEXT NOT NULL                -- ISO 8601
);
CREATE INDEX IF NOT EXISTS labels_feature ON labels(feature);
CREATE VIRTUAL TABLE IF NOT EXISTS search USING fts5(
    text, feature UNINDEXED, kind UNINDEXED, ref UNINDEXED, tokenize = 'unicode61'
);
CREATE TRIGGER IF NOT EXISTS labels_search_insert AFTER INSERT ON labels BEGIN
    INSERT INTO search (text, feature, kind, ref) VALUES (new.text, new.feature, 'label', new.id);
END;
CREATE TRIGGER IF NOT EXISTS labels_search_delete AFTER DELETE ON labels BEGIN
    DELETE FROM search WHERE kind = 'label' AND ref = old.id;
END;
CREATE TRIGGER IF NOT EXISTS labels_search_update AFTER UPDATE OF text ON labels BEGIN
    UPDATE search SET text = new.text WHERE kind = 'label' AND ref = old.id;
END;
"""

# Version 2: one row per (label, scorer); `labels.score`/`labels.scorer` keep the latest score for v1 readers.
SCORES_STATEMENTS = (
    """CREATE TABLE IF NOT EXISTS scores (
    label_id INTEGER NOT NULL,             -- labels.id
    scorer   TEXT NOT NULL,                -- e.g. rule-detection, fuzzing:anthropic:MODEL
    score    REAL,
    n        INTEGER,                      -- examples the score was computed on (NULL if unknown)
    created  TEXT NOT NULL,                -- ISO 8601
    PRIMARY KEY (label_id, scorer)
)""",
    """CREATE TRIGGER IF NOT EXISTS labels_scores_delete AFTER DELETE ON labels BEGIN
    DELETE FROM scores WHERE label_id = old.id;
END""",
)
SCORES_DDL = "".join(f"{st};\n" for st in SCORES_STATEMENTS)

# Optional: the trigram index of the top examples' text. Contentless (the text is in `examples`); the rowid
# encodes the example, feature << TRIGRAM_RANK_BITS | rank, so a match names its feature without a join.
TRIGRAM_TABLE = "search_trigram"
TRIGRAM_RANK_BITS = 16
TRIGRAM_STATEMENTS = (
    f"""CREATE VIRTUAL TABLE IF NOT EXISTS {TRIGRAM_TABLE} USING fts5(
    text, tokenize = 'trigram', content = '', columnsize = 0
)""",
    f"""CREATE TRIGGER IF NOT EXISTS examples_search_trigram AFTER INSERT ON examples
WHEN new.kind = 'top' AND new.rank >= 0 AND new.rank < {1 << TRIGRAM_RANK_BITS} BEGIN
    INSERT INTO {TRIGRAM_TABLE} (rowid, text) VALUES ((new.feature << {TRIGRAM_RANK_BITS}) | new.rank, new.text);
END""",
)

# Where each context's tokens came from (optional: atlases built before it, or from a corpus without names,
# have no rows): one row per run of positions from one document, which covers positions start.. up to the next
# row's start. Explainers read it to say "in decimal.py".
SOURCES_TABLE = "context_sources"
SOURCES_DDL = f"""CREATE TABLE IF NOT EXISTS {SOURCES_TABLE} (
    context INTEGER NOT NULL REFERENCES contexts(id),
    start   INTEGER NOT NULL,              -- first position of the run
    source  TEXT NOT NULL,                 -- the document's name, e.g. a file path ('' if unknown)
    PRIMARY KEY (context, start)
)"""

CROSSCODER_TABLE = "crosscoder_latents"
CROSSCODER_DDL = f"""CREATE TABLE IF NOT EXISTS {CROSSCODER_TABLE} (
    feature       INTEGER PRIMARY KEY,     -- features.id
    relative_norm REAL,                    -- 0 BASE-only, 0.5 shared, 1 OTHER-only; NULL if both halves are zero
    band          TEXT NOT NULL,           -- other-only | base-only | shared | in between | dead
    nu_error      REAL,                    -- Latent Scaling (lmscope diff): NULL until measured
    nu_recon      REAL,
    robust        INTEGER                  -- 1: an OTHER-only latent that survives Latent Scaling
)"""


def _connect(uri: str, readonly: bool) -> Connection:
    conn = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None if readonly else "DEFERRED")
    conn.row_factory = sqlite3.Row
    return conn


def create(path: str | Path) -> Connection:
    """A new, empty atlas database at `path` (which must not exist), in WAL mode, with the schema."""
    path = Path(path)
    conn = _connect(f"file:{path}?mode=rwc", readonly=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(DDL + SCORES_DDL)
    conn.execute(SOURCES_DDL)
    try:
        for stmt in TRIGRAM_STATEMENTS:
            conn.execute(stmt)
    except sqlite3.OperationalError:  # no trigram tokenizer in this SQLite: search falls back (see the docstring)
        conn.execute(f"DROP TABLE IF EXISTS {TRIGRAM_TABLE}")
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    set_meta(conn, "format", FORMAT)
    set_meta(conn, "schema_version", SCHEMA_VERSION)
    set_meta(conn, "complete", 0)
    conn.commit()
    return conn


def set_meta(conn: Connection, key: str, value: Any) -> None:
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))


def get_meta(conn: Connection, key: str, default: Any = None) -> Any:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return default if row is None else json.loads(row[0])


def check_version(conn: Connection, path: str | Path, require_complete: bool = True) -> int:
    """The schema version of an open atlas; AtlasError if it is not an atlas, too new, or unfinished."""
    try:
        fmt = get_meta(conn, "format")
        version = get_meta(conn, "schema_version")
    except sqlite3.DatabaseError as exc:
        raise AtlasError(f"{path} is not an lmscope atlas ({exc}); build one with `lmscope atlas`") from None
    if fmt != FORMAT or not isinstance(version, int):
        raise AtlasError(f"{path} is an SQLite file but not an lmscope atlas; build one with `lmscope atlas`")
    if version > SCHEMA_VERSION:
        raise AtlasError(
            f"{path} uses atlas schema version {version}, but this lmscope reads up to version {SCHEMA_VERSION}; "
            "upgrade lmscope (pip install -U lmscope) to open it"
        )
    if require_complete and get_meta(conn, "complete") != 1:
        raise AtlasError(
            f"{path} is an unfinished atlas build (meta.complete is not 1); rerun the `lmscope atlas` command "
            "that made it to rebuild it"
        )
    return version


def is_complete(path: str | Path) -> bool:
    """Whether the file at `path` is a complete atlas this lmscope can read (it is opened read-only)."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            check_version(conn, path)
            return True
        finally:
            conn.close()
    except (AtlasError, sqlite3.DatabaseError):
        return False


def has_table(conn: Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


def migrate_v1(conn: Connection) -> bool:
    """Bring a version-1 atlas to version 2 in one transaction: add `scores` (and its trigger) and copy each
    label's `score`/`scorer` into it. Returns whether anything was migrated (False for a current file)."""
    if get_meta(conn, "schema_version") != 1:
        return False
    conn.commit()
    conn.execute("BEGIN IMMEDIATE")
    try:
        for stmt in SCORES_STATEMENTS:  # not executescript: it would commit mid-transaction
            conn.execute(stmt)
        conn.execute(
            "INSERT OR IGNORE INTO scores (label_id, scorer, score, n, created) "
            "SELECT id, scorer, score, NULL, created FROM labels WHERE scorer IS NOT NULL AND score IS NOT NULL"
        )
        set_meta(conn, "schema_version", SCHEMA_VERSION)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    return True


def open_atlas(path: str | Path, readonly: bool = True, migrate: bool = True) -> Connection:
    """Open a complete atlas. Read-only opens use SQLite's `mode=ro`, so the server can never write to it.
    A read-write open migrates an older-version file forward (unless `migrate` is False)."""
    path = Path(path)
    if not path.is_file():
        hint = ""
        partial = path.with_name(path.name + ".partial")
        if partial.exists():
            hint = f" ({partial} is an interrupted build: rerun the `lmscope atlas` command to finish it)"
        raise AtlasError(
            f"{path} does not exist{hint}; build an atlas with `lmscope atlas MODEL --dict DIR --out {path}`"
        )
    uri = f"file:{path.resolve()}?mode={'ro' if readonly else 'rw'}"
    try:
        conn = _connect(uri, readonly)
        check_version(conn, path)
    except sqlite3.OperationalError:
        if not readonly:
            raise
        # A WAL database needs its -shm file; in a read-only directory open it as immutable instead.
        conn = _connect(f"file:{path.resolve()}?mode=ro&immutable=1", readonly)
        check_version(conn, path)
    if readonly:
        conn.execute("PRAGMA query_only=1")
    elif migrate:
        migrate_v1(conn)
    return conn


def open_for_writing(path: str | Path, migrate: bool = True) -> Connection:
    """The atlas opened read-write to add or change labels and scores, waiting up to `BUSY_TIMEOUT_MS` for
    another writer (a running explorer keeps reading it: the file is in WAL mode). A version-1 file is migrated
    first unless `migrate` is False."""
    conn = open_atlas(path, readonly=False, migrate=migrate)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return conn
