"""Plain `nn.Module` blocks (visual front end, embeddings, encoder, heads): import them into any model, no data or gin needed.
May import: vlblocks.batch, vlblocks.ops.
"""

from vlblocks.blocks.backbones import (
    DilatedC5RoIHead,
    FlattenRoIHead,
    IdentityBackbone,
    PooledRoIHead,
    ResNetC4Backbone,
    TinyBackbone,
)
from vlblocks.blocks.co_attention import CoAttentionEncoder, CrossModalityLayer, TwoStreamEncoderOutput
from vlblocks.blocks.embeddings import RegionEmbedding, TextEmbedding, VLEmbedding, VLEmbeddingOutput
from vlblocks.blocks.encoder import EncoderOutput, MultiHeadAttention, Pooler, TransformerEncoder, TransformerLayer
from vlblocks.blocks.geometry import BoxCoordinates, RegionGeometryEmbedding
from vlblocks.blocks.heads import MaskedLMHead, MaskedRegionHead, RegionPredictionHead, RelationHead
from vlblocks.blocks.region_features import EndToEndRegionFeatures, PrecomputedRegionFeatures
from vlblocks.blocks.roi_align import RoIAlign
from vlblocks.blocks.task_heads import AnswerHead, ChoiceHead, RegionScoreHead
from vlblocks.blocks.visual import AveragedRegionFeatureEmbedding, VisualFeatureEmbedding
from vlblocks.blocks.word_embedding import WordEmbedding
from vlblocks.ops.roi_align import roi_align  # the functional form, re-exported beside RoIAlign

__all__ = [
    "AnswerHead",
    "AveragedRegionFeatureEmbedding",
    "BoxCoordinates",
    "CoAttentionEncoder",
    "CrossModalityLayer",
    "MultiHeadAttention",
    "RegionEmbedding",
    "RegionPredictionHead",
    "TextEmbedding",
    "TransformerLayer",
    "TwoStreamEncoderOutput",
    "ChoiceHead",
    "RegionScoreHead",
    "DilatedC5RoIHead",
    "EncoderOutput",
    "EndToEndRegionFeatures",
    "FlattenRoIHead",
    "IdentityBackbone",
    "MaskedLMHead",
    "MaskedRegionHead",
    "Pooler",
    "PooledRoIHead",
    "PrecomputedRegionFeatures",
    "RegionGeometryEmbedding",
    "RelationHead",
    "ResNetC4Backbone",
    "RoIAlign",
    "TinyBackbone",
    "TransformerEncoder",
    "VLEmbedding",
    "VLEmbeddingOutput",
    "VisualFeatureEmbedding",
    "WordEmbedding",
    "roi_align",
]
