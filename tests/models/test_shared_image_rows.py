"""Rows that share an image (VCR's choices) see the same region vectors as if each had its own copy."""

import pytest
import torch

from vlblocks.batch import VLBatch
from vlblocks.blocks.backbones import FlattenRoIHead, IdentityBackbone
from vlblocks.blocks.embeddings import VLEmbedding
from vlblocks.blocks.encoder import TransformerEncoder
from vlblocks.blocks.geometry import RegionGeometryEmbedding
from vlblocks.blocks.region_features import EndToEndRegionFeatures
from vlblocks.blocks.visual import VisualFeatureEmbedding
from vlblocks.models.vlbert import VLBert


def model():
    torch.manual_seed(0)
    head = FlattenRoIHead(in_channels=3, output_size=2, out_channels=8)
    return VLBert(
        EndToEndRegionFeatures(IdentityBackbone(), head, output_size=2, sampling_ratio=1),
        VisualFeatureEmbedding(8, 16, RegionGeometryEmbedding(dim=4), dropout=0.0),
        VLEmbedding(vocab_size=30, hidden_size=16, visual_size=16, dropout=0.0, visual_scale_init=1.0),
        TransformerEncoder(num_layers=1, hidden_size=16, num_heads=2, intermediate_size=32, dropout=0.0, attention_dropout=0.0),
    ).eval()


def test_shared_images_equal_repeated_images():
    torch.manual_seed(1)
    images = torch.randn(2, 3, 12, 12)
    boxes = torch.tensor([[0.0, 0.0, 11.0, 11.0], [2.0, 2.0, 6.0, 8.0]]).expand(6, -1, -1).clone()
    common = dict(
        text_ids=torch.randint(5, 30, (6, 4)), segment_ids=torch.zeros(6, 4, dtype=torch.long),
        text_mask=torch.ones(6, 4, dtype=torch.bool), boxes=boxes, region_mask=torch.ones(6, 2, dtype=torch.bool),
        image_sizes=torch.full((6, 2), 12.0), token_region_index=torch.randint(0, 2, (6, 4)),
    )
    shared = VLBatch(**common, images=images, rows_per_image=3)
    repeated = VLBatch(**common, images=images.repeat_interleave(3, 0))
    net = model()
    torch.testing.assert_close(net(shared).sequence_states, net(repeated).sequence_states)
    assert shared.image_rows().text_ids.shape == (2, 4) and shared.image_rows().images is images


def test_rows_per_image_must_divide_the_rows_and_match_the_images():
    common = dict(
        text_ids=torch.zeros(4, 2, dtype=torch.long), segment_ids=torch.zeros(4, 2, dtype=torch.long),
        text_mask=torch.ones(4, 2, dtype=torch.bool), boxes=torch.zeros(4, 1, 4), region_mask=torch.ones(4, 1, dtype=torch.bool),
        image_sizes=torch.ones(4, 2),
    )
    with pytest.raises(ValueError, match="does not divide"):
        VLBatch(**common, rows_per_image=3)
    with pytest.raises(ValueError, match="holds 4 images, expected 2"):
        VLBatch(**common, images=torch.zeros(4, 3, 2, 2), rows_per_image=2)
