"""Pre-training objectives, each owning its (seeded) masking and its loss, and `PretrainingTask`, a model with a list of them.
May import: vlblocks.batch, vlblocks.contracts, vlblocks.seeding, vlblocks.blocks, vlblocks.models.
"""

from vlblocks.objectives.masked_lm import MaskedLanguageModeling
from vlblocks.objectives.masked_region import MaskedRegionClassification, RegionMasking
from vlblocks.objectives.objective import PretrainingObjective
from vlblocks.objectives.output import ObjectiveOutput
from vlblocks.objectives.pretraining_task import PretrainingTask, PretrainingTaskOutput
from vlblocks.objectives.region_prediction import AttributeClassification, MaskedFeatureRegression, ObjectLabelClassification
from vlblocks.objectives.relation import CaptionImageRelation, ImageTextMatching
from vlblocks.objectives.text_only import TextOnlyMaskedLM

__all__ = [
    "AttributeClassification",
    "CaptionImageRelation",
    "ImageTextMatching",
    "MaskedFeatureRegression",
    "MaskedLanguageModeling",
    "MaskedRegionClassification",
    "ObjectLabelClassification",
    "ObjectiveOutput",
    "PretrainingObjective",
    "PretrainingTask",
    "PretrainingTaskOutput",
    "RegionMasking",
    "TextOnlyMaskedLM",
]
