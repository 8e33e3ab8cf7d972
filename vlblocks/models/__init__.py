"""Assemblies of blocks: the VL-BERT core and its pre-training model."""

from vlblocks.models.pretraining import PretrainingOutput, VLBertForPretraining
from vlblocks.models.vlbert import VLBert, VLBertOutput

__all__ = ["PretrainingOutput", "VLBert", "VLBertForPretraining", "VLBertOutput"]
