"""Feature atlas: a per-feature dossier (statistics, examples, logit effects, neighbours) in one SQLite file.

All SQL against the file is in the access layer, lmscope.atlas.db.
"""

from lmscope.atlas.build import build_atlas
from lmscope.atlas.config import AtlasConfig
from lmscope.atlas.db.labels import add_label
from lmscope.atlas.db.schema import SCHEMA_VERSION, AtlasError, open_atlas

__all__ = ["SCHEMA_VERSION", "AtlasConfig", "AtlasError", "add_label", "build_atlas", "open_atlas"]
