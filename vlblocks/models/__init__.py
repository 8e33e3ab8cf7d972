"""Assemblies of blocks (the VL-BERT core and its pre-training model) and the fine-tuning task models, all behind one protocol (`Task`).
May import: vlblocks.batch, vlblocks.contracts, vlblocks.blocks.
"""

from vlblocks.models.grounding_task import ReferringExpressionTask
from vlblocks.models.interface import VLModel, VLOutput
from vlblocks.models.pretraining import PretrainingOutput, VLBertForPretraining
from vlblocks.models.task import LossTerm, Task, TaskData, TaskOutput
from vlblocks.models.two_stream import TwoStreamModel
from vlblocks.models.vcr_task import VCRTask
from vlblocks.models.vlbert import VLBert, VLBertOutput
from vlblocks.models.vqa_task import VQATask

__all__ = [
    "LossTerm",
    "PretrainingOutput",
    "ReferringExpressionTask",
    "Task",
    "TaskData",
    "TaskOutput",
    "TwoStreamModel",
    "VCRTask",
    "VLBert",
    "VLBertForPretraining",
    "VLBertOutput",
    "VLModel",
    "VLOutput",
    "VQATask",
]
