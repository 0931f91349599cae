"""Feature atlas: a per-feature dossier (statistics, examples, logit effects, neighbours) in one SQLite file."""

from lmscope.atlas.build import AtlasConfig, build_atlas
from lmscope.atlas.schema import SCHEMA_VERSION, AtlasError, add_label, open_atlas

__all__ = ["SCHEMA_VERSION", "AtlasConfig", "AtlasError", "add_label", "build_atlas", "open_atlas"]
