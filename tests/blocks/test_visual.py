import pytest
import torch

from vlblocks.blocks.geometry import RegionGeometryEmbedding
from vlblocks.blocks.visual import VisualFeatureEmbedding


def test_geometry_first_then_appearance_then_relu():
    torch.manual_seed(0)
    embedding = VisualFeatureEmbedding(appearance_size=6, out_features=5, geometry=RegionGeometryEmbedding(dim=2)).eval()
    boxes = torch.tensor([[[0.0, 0.0, 9.0, 9.0], [2.0, 3.0, 5.0, 8.0]]])
    sizes = torch.tensor([[10.0, 10.0]])
    appearance = torch.randn(1, 2, 6)
    geometry = RegionGeometryEmbedding(dim=2)(boxes, sizes)
    expected = torch.relu(torch.cat([geometry, appearance], -1) @ embedding.projection.weight.T + embedding.projection.bias)
    torch.testing.assert_close(embedding(appearance, boxes, sizes), expected)
    assert embedding.projection.weight.shape == (5, 16 + 6)
    assert (embedding(appearance, boxes, sizes) >= 0).all()


def test_dropout_acts_in_training_only():
    embedding = VisualFeatureEmbedding(appearance_size=8, out_features=4, geometry=RegionGeometryEmbedding(dim=2), dropout=0.5)
    boxes, sizes, appearance = torch.tensor([[[0.0, 0.0, 5.0, 5.0]]]), torch.tensor([[10.0, 10.0]]), torch.ones(1, 1, 8)
    embedding.eval()
    torch.testing.assert_close(embedding(appearance, boxes, sizes), embedding(appearance, boxes, sizes))
    embedding.train()
    torch.manual_seed(0)
    outs = [embedding(appearance, boxes, sizes) for _ in range(5)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_wrong_appearance_size_is_named():
    embedding = VisualFeatureEmbedding(appearance_size=8, out_features=4)
    with pytest.raises(ValueError, match="size 7.*expects 8"):
        embedding(torch.zeros(1, 1, 7), torch.zeros(1, 1, 4), torch.ones(1, 2))


def test_padded_regions_get_exactly_zero_vectors():
    # Official common/fast_rcnn.py: obj_reps = obj_downsample(...) of the valid boxes only, then
    # pad_sequence / new_zeros fill the padded positions with 0.
    embedding = VisualFeatureEmbedding(appearance_size=2, out_features=3, geometry=RegionGeometryEmbedding(dim=2)).eval()
    with torch.no_grad():
        embedding.projection.weight.zero_()
        embedding.projection.bias.copy_(torch.tensor([1.0, -1.0, 2.0]))
    boxes = torch.tensor([[[0.0, 0.0, 9.0, 9.0], [2.0, 3.0, 5.0, 8.0], [0.0, 0.0, 0.0, 0.0]]])
    sizes = torch.tensor([[10.0, 10.0]])
    region_mask = torch.tensor([[True, True, False]])
    vectors = embedding(torch.zeros(1, 3, 2), boxes, sizes, region_mask)
    # real regions: ReLU(0 x input + [1, -1, 2]) = [1, 0, 2]; the padded one: 0, not ReLU(bias)
    assert vectors.tolist() == [[[1.0, 0.0, 2.0], [1.0, 0.0, 2.0], [0.0, 0.0, 0.0]]]
    assert embedding(torch.zeros(1, 3, 2), boxes, sizes)[0, 2].tolist() == [1.0, 0.0, 2.0]  # no mask: every row projected
