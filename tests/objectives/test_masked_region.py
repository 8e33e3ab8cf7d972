import pytest
import torch

from vlblocks.batch import VLBatch
from vlblocks.objectives.masked_region import MaskedRegionClassification, zero_region_pixels


def region_batch(rows=200, regions=10, features=None, images=None):
    scores = torch.softmax(torch.randn(rows, regions, 5), -1)
    scores[:, 0] = 0
    region_mask = torch.ones(rows, regions, dtype=torch.bool)
    region_mask[0, 5:] = False
    return VLBatch(
        text_ids=torch.ones(rows, 3, dtype=torch.long), segment_ids=torch.zeros(rows, 3, dtype=torch.long),
        text_mask=torch.ones(rows, 3, dtype=torch.bool),
        boxes=torch.tensor([0.0, 0.0, 15.0, 15.0]).repeat(rows, regions, 1), region_mask=region_mask,
        image_sizes=torch.full((rows, 2), 16.0), region_features=features, images=images, region_class_scores=scores,
    )


def seeds(rows):
    return torch.arange(rows) * 7 + 1


def test_selection_rates_never_the_whole_image_and_targets():
    objective = MaskedRegionClassification(precomputed_feature_size=8)
    batch = region_batch(features=torch.randn(200, 10, 8))
    masked = objective.mask(batch, seeds(200))
    chosen = masked.region_targets.sum(-1) > 0
    assert torch.equal(masked.region_positions, chosen.nonzero())
    assert torch.equal(masked.region_features, batch.region_features), "features are hidden on the device, by conceal"
    alone = objective.mask(batch.map_tensors(lambda tensor: tensor[50:60]), seeds(200)[50:60])
    assert torch.equal(alone.masked_regions, masked.masked_regions[50:60]), "a sample's choice does not depend on its batch"
    assert not chosen[:, 0].any() and not masked.masked_regions[:, 0].any()
    assert not chosen[~batch.region_mask].any()
    assert abs(chosen[:, 1:].float().mean().item() - 0.15) < 0.02
    assert torch.all(masked.masked_regions <= chosen)
    assert abs(masked.masked_regions.sum().item() / chosen.sum().item() - 0.9) < 0.05
    torch.testing.assert_close(masked.region_targets[chosen], batch.region_class_scores[chosen])


def test_precomputed_masking_uses_the_mask_feature_and_recomputes_the_whole_image():
    objective = MaskedRegionClassification(precomputed_feature_size=4)
    with torch.no_grad():
        objective.mask_feature.fill_(7.0)
    features = torch.randn(1, 4, 4)
    features[0, 0] = features[0, 1:].mean(0)
    batch = region_batch(rows=1, regions=4, features=features)
    masked_regions = torch.tensor([[False, True, False, True]])
    hidden = objective.conceal(batch.replace(masked_regions=masked_regions)).region_features
    torch.testing.assert_close(hidden, objective.hide_features(batch, masked_regions))
    assert torch.all(hidden[0, 1] == 7.0) and torch.all(hidden[0, 3] == 7.0)
    torch.testing.assert_close(hidden[0, 2], features[0, 2])
    expected_whole = (3 * features[0, 0] - features[0, 1] - features[0, 3]) / (3 - 2 + 1e-5)
    torch.testing.assert_close(hidden[0, 0], expected_whole)
    torch.testing.assert_close(hidden[0, 0], features[0, 2], atol=1e-4, rtol=1e-4)


def test_end_to_end_masking_zeroes_exactly_the_box_pixels():
    images = torch.ones(1, 3, 10, 12)
    boxes = torch.tensor([[[0.0, 0.0, 11.0, 9.0], [2.7, 1.2, 5.9, 3.5], [8.0, 8.0, 11.0, 9.0]]])
    out = zero_region_pixels(images, boxes, torch.tensor([[False, True, False]]))
    expected = torch.ones(1, 3, 10, 12)
    expected[:, :, 1:4, 2:6] = 0  # [int(y1):int(y2)+1, int(x1):int(x2)+1]
    assert torch.equal(out, expected)
    assert torch.equal(images, torch.ones(1, 3, 10, 12)), "the input batch is not modified"


def test_soft_cross_entropy_scores_only_normalised_targets():
    objective = MaskedRegionClassification(precomputed_feature_size=8)
    unmasked = region_batch(rows=20, features=torch.randn(20, 10, 8))
    batch = objective.mask(unmasked, seeds(20))
    chosen = batch.region_targets.sum(-1) > 0
    logits = torch.randn(int(chosen.sum()), 5)
    targets = batch.region_targets[chosen]
    expected = -(targets * torch.log_softmax(logits, -1)).sum(-1).mean()
    torch.testing.assert_close(objective.loss(logits, batch).loss, expected)
    # a chosen region whose detector distribution does not sum to 1 is not scored
    broken = unmasked.region_class_scores.clone()
    first = chosen.nonzero()[0]
    broken[first[0], first[1]] *= 0.5
    rescored = objective.mask(unmasked.replace(region_class_scores=broken), seeds(20))
    assert rescored.region_positions.shape[0] == chosen.sum().item() - 1
    result = objective.loss(logits[1:], rescored)
    assert result.metrics["mvrc/count"] == chosen.sum().item() - 1
    none = objective.loss(torch.zeros(0, 5), batch.replace(region_positions=torch.zeros(0, 2, dtype=torch.long)))
    assert none.loss.item() == 0.0 and none.metrics["mvrc/count"] == 0.0


def test_end_to_end_masking_needs_images():
    with pytest.raises(ValueError, match="needs batch.images"):
        MaskedRegionClassification().mask(region_batch(rows=2), seeds(2))


def test_class_count_mismatch_is_named():
    objective = MaskedRegionClassification(precomputed_feature_size=8)
    batch = objective.mask(region_batch(rows=20, features=torch.randn(20, 10, 8)), seeds(20))
    chosen = batch.region_positions.shape[0]
    with pytest.raises(ValueError, match="targets have 5 classes but the region head predicts 1601"):
        objective.loss(torch.zeros(chosen, 1601), batch)
