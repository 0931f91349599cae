"""`AtlasConfig`: how an atlas is built (shared by the streaming pass in build.py and the final write in write.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from lmscope.atlas.db.schema import AtlasError
from lmscope.corpora import PackingConfig


@dataclass
class AtlasConfig:
    """How an atlas is built. `bins` and `hist_bins` must be powers of two (see accumulate.py)."""

    tokens: int = 1_000_000
    context: int = 128
    batch_size: int = 8  # contexts per forward pass
    top_k: int = 16  # top-activating examples per feature
    bins: int = 16  # quantile bins over [0, S); 8..16 of them cover (0, max]
    samples_per_bin: int = 4
    hist_bins: int = 64
    window_before: int = 16  # tokens shown before an example's token
    window_after: int = 8
    neighbours: int = 10
    cofire: int = 10
    cofire_tokens: int = 32_768  # size of the co-firing token sample
    logit_top: int = 10
    seed: int = 0
    families: bool = True  # feature families and the 2-D map at the end (lmscope.atlas.families)
    packing: PackingConfig = field(default_factory=PackingConfig)

    def __post_init__(self) -> None:
        if self.tokens < 1 or self.context < 2 or self.batch_size < 1 or self.top_k < 1:
            raise AtlasError("tokens, batch size and top_k must be positive and the context at least 2 tokens")
        for name in ("bins", "hist_bins"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise AtlasError(f"{name} must be a power of two (8, 16, 32 ...), got {v}")
        self.packing = replace(self.packing, context=self.context)  # every other packing setting kept

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["packing"] = self.packing.to_dict()
        return d
