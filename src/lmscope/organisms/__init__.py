"""Model organisms: models with a change we planted ourselves, and controls where nothing was planted.

`make_organism` fine-tunes a base model (float32) by a documented, seeded recipe (`OrganismConfig`: backdoor,
suppress, overwrite, sycophancy, control) and writes `ground_truth.json` with exactly what was planted and the
behaviour measured on held-out prompts. `read_ground_truth` refuses a directory that is not a finished organism.
Facts and prompts come from templates shipped here (`facts`, `prompts`). See docs/diff.md.
"""

from lmscope.organisms.facts import Fact, capital_facts, read_facts, write_facts
from lmscope.organisms.organism import GROUND_TRUTH, make_organism, read_ground_truth
from lmscope.organisms.recipes import KINDS, OrganismConfig

__all__ = [
    "GROUND_TRUTH",
    "KINDS",
    "Fact",
    "OrganismConfig",
    "capital_facts",
    "make_organism",
    "read_facts",
    "read_ground_truth",
    "write_facts",
]
