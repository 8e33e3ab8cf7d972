import math

import torch

from vlblocks.blocks.geometry import RegionGeometryEmbedding


def test_hand_computed_values_and_layout():
    embedding = RegionGeometryEmbedding(dim=2, wavelength=1000.0, scale=100.0)
    boxes = torch.tensor([[10.0, 20.0, 50.0, 60.0]], dtype=torch.float64)
    sizes = torch.tensor([100.0, 200.0], dtype=torch.float64)
    # centre x 30/100, centre y 40/200, width 40/100, height 40/200, each times 100
    coordinates = [30.0, 20.0, 40.0, 20.0]
    slow = 1000.0 ** 0.5
    expected = []
    for c in coordinates:
        expected += [math.sin(c), math.sin(c / slow), math.cos(c), math.cos(c / slow)]
    torch.testing.assert_close(embedding(boxes, sizes[None]), torch.tensor([expected], dtype=torch.float64), atol=1e-12, rtol=0)


def test_default_size_and_batched_image_sizes():
    embedding = RegionGeometryEmbedding()
    boxes = torch.tensor([[[0.0, 0.0, 99.0, 49.0], [5.0, 5.0, 10.0, 20.0]], [[0.0, 0.0, 9.0, 9.0], [1.0, 1.0, 2.0, 2.0]]])
    sizes = torch.tensor([[100.0, 50.0], [10.0, 10.0]])
    features = embedding(boxes, sizes)
    assert features.shape == (2, 2, 2048)
    # The same box in a twice-larger image at twice the coordinates gives the same features.
    torch.testing.assert_close(embedding(boxes * 2, sizes * 2), features)
    # Each image's own size is used: image 1 differs from image 0 for the same pixel box.
    same_box = torch.tensor([[[5.0, 5.0, 10.0, 20.0]], [[5.0, 5.0, 10.0, 20.0]]])
    out = embedding(same_box, torch.tensor([[100.0, 50.0], [50.0, 50.0]]))
    assert not torch.allclose(out[0], out[1])
