"""Padded regions carry exactly zero visual vectors through VLBert, as the official FastRCNN's
zero-padded `obj_reps` (common/fast_rcnn.py) do."""

import torch

from vlblocks.batch import VLBatch
from vlblocks.blocks.embeddings import VLEmbedding
from vlblocks.blocks.encoder import TransformerEncoder
from vlblocks.blocks.geometry import RegionGeometryEmbedding
from vlblocks.blocks.region_features import PrecomputedRegionFeatures
from vlblocks.blocks.visual import VisualFeatureEmbedding
from vlblocks.models.vlbert import VLBert


def tiny_vlbert() -> VLBert:
    """Appearance 2 → visual size 3 with weight 0 and bias [1, -1, 2]: every real region's vector is
    ReLU([1, -1, 2]) = [1, 0, 2] whatever its box and features."""
    visual = VisualFeatureEmbedding(appearance_size=2, out_features=3, geometry=RegionGeometryEmbedding(dim=2), dropout=0.0)
    with torch.no_grad():
        visual.projection.weight.zero_()
        visual.projection.bias.copy_(torch.tensor([1.0, -1.0, 2.0]))
    return VLBert(
        region_features=PrecomputedRegionFeatures(2),
        visual_embedding=visual,
        embedding=VLEmbedding(10, 4, 3, 16, 2),
        encoder=TransformerEncoder(1, 4, 1, 8),
    ).eval()


def test_region_vectors_and_a_grounding_index_on_padding_read_zeros():
    region_mask = torch.tensor([[True, True, False], [True, False, False]])
    batch = VLBatch(
        text_ids=torch.tensor([[1, 2, 3], [1, 2, 3]]),
        segment_ids=torch.zeros(2, 3, dtype=torch.long),
        text_mask=torch.ones(2, 3, dtype=torch.bool),
        boxes=torch.tensor([[[0.0, 0.0, 9.0, 9.0], [1.0, 1.0, 4.0, 4.0], [0.0] * 4]] * 2),
        region_mask=region_mask,
        image_sizes=torch.tensor([[10.0, 10.0]] * 2),
        region_features=torch.ones(2, 3, 2),
        token_region_index=torch.tensor([[0, 1, 2], [0, 1, 2]]),  # tokens 2 (and 1 in row 1) point at padding
    )
    model = tiny_vlbert()
    vectors = model.region_vectors(batch)
    real, zero = [1.0, 0.0, 2.0], [0.0, 0.0, 0.0]
    assert vectors.tolist() == [[real, real, zero], [real, zero, zero]]
    assert model.text_visual(batch, vectors).tolist() == [[real, real, zero], [real, zero, zero]]
