"""Pre-training objectives, each owning its (seeded) masking and its loss, and `PretrainingTask`, a model with a list of them.
May import: vlblocks.batch, vlblocks.contracts, vlblocks.seeding, vlblocks.blocks, vlblocks.models.
"""

from vlblocks.objectives.masked_lm import MaskedLanguageModeling
from vlblocks.objectives.masked_region import MaskedRegionClassification
from vlblocks.objectives.output import ObjectiveOutput
from vlblocks.objectives.pretraining_task import PretrainingTask
from vlblocks.objectives.relation import CaptionImageRelation
from vlblocks.objectives.text_only import TextOnlyMaskedLM

__all__ = [
    "CaptionImageRelation",
    "MaskedLanguageModeling",
    "MaskedRegionClassification",
    "ObjectiveOutput",
    "PretrainingTask",
    "TextOnlyMaskedLM",
]
