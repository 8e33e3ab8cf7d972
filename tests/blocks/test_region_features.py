import pytest
import torch

from vlblocks.batch import VLBatch
from vlblocks.blocks.backbones import PooledRoIHead, TinyBackbone
from vlblocks.blocks.region_features import EndToEndRegionFeatures, PrecomputedRegionFeatures
from vlblocks.ops.roi_align import roi_align


def image_batch(with_images=True):
    torch.manual_seed(0)
    boxes = torch.tensor(
        [[[0.0, 0.0, 63.0, 47.0], [4.0, 6.0, 30.0, 40.0], [0.0, 0.0, 0.0, 0.0]], [[0.0, 0.0, 63.0, 47.0], [10.0, 2.0, 12.0, 5.0], [40.0, 30.0, 70.0, 60.0]]]
    )
    return VLBatch(
        text_ids=torch.ones(2, 3, dtype=torch.long),
        segment_ids=torch.zeros(2, 3, dtype=torch.long),
        text_mask=torch.ones(2, 3, dtype=torch.bool),
        boxes=boxes,
        region_mask=torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool),
        image_sizes=torch.tensor([[64.0, 48.0], [64.0, 48.0]]),
        images=torch.randn(2, 3, 48, 64) if with_images else None,
    )


def test_end_to_end_features_equal_per_box_roi_align_and_head():
    backbone, head = TinyBackbone(out_channels=16, stride=8, width=8), PooledRoIHead(16, 12)
    source = EndToEndRegionFeatures(backbone, head, output_size=4, sampling_ratio=2, aligned=False)
    batch = image_batch()
    features = source(batch)
    assert features.shape == (2, 3, 12)
    feature_map = backbone(batch.images)
    for b in range(2):
        for r in range(3):
            if not batch.region_mask[b, r]:
                assert torch.all(features[b, r] == 0)
                continue
            grid = roi_align(feature_map[b : b + 1], [batch.boxes[b, r : r + 1]], 4, 1 / 8, 2, False)
            torch.testing.assert_close(features[b, r], head(grid)[0])


def test_end_to_end_gradients_reach_the_backbone():
    backbone = TinyBackbone(out_channels=8, stride=4, width=8)
    source = EndToEndRegionFeatures(backbone, PooledRoIHead(8), output_size=3)
    assert source.spatial_scale == 1 / 4 and source.out_features == 8
    source(image_batch()).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.parameters() if p.dim() > 1)


def test_missing_inputs_are_named():
    with pytest.raises(ValueError, match="no images"):
        EndToEndRegionFeatures(TinyBackbone(), PooledRoIHead(64))(image_batch(with_images=False))
    with pytest.raises(ValueError, match="region_features is None"):
        PrecomputedRegionFeatures(16)(image_batch())
    batch = image_batch().replace(region_features=torch.zeros(2, 3, 8))
    with pytest.raises(ValueError, match="size 8, the recipe expects 16"):
        PrecomputedRegionFeatures(16)(batch)
    assert PrecomputedRegionFeatures(8)(batch) is batch.region_features


def test_instance_masks_multiply_the_head_map_before_pooling():
    """VCR: pooled = mean over the grid of (head map x mask), the mask resampled to the map's size."""
    backbone, head = TinyBackbone(out_channels=16, stride=8, width=8), PooledRoIHead(16, 12)
    source = EndToEndRegionFeatures(backbone, head, output_size=4, sampling_ratio=2, aligned=False)
    batch = image_batch()
    masks = torch.zeros(2, 3, 8, 8)
    masks[:, :, :, :4] = 1.0  # the left half of every box
    masked = source(batch.replace(region_masks=masks))
    grids = source.roi_grids(batch)
    left_half = torch.zeros(1, 1, 4, 4)
    left_half[..., :2] = 1.0
    expected = (head.feature_map(grids) * left_half).mean(dim=(2, 3))
    torch.testing.assert_close(masked[batch.region_mask], expected)
    full = source(batch.replace(region_masks=torch.ones(2, 3, 4, 4)))
    torch.testing.assert_close(full, source(batch))
