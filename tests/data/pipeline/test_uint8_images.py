"""Images travel as uint8 and are normalised where the batch lands: the same float32 numbers as
normalising on the host, 0 in the padding and in blanked images, masked regions zeroed after."""

import numpy as np
import torch
from PIL import Image

from vlblocks.data.pipeline.collate import collate_pretraining
from vlblocks.data.pipeline.images import ImageTransform
from vlblocks.data.pipeline.sample import EncodedSample
from vlblocks.objectives.masked_region import MaskedRegionClassification, zero_region_pixels


def picture(width, height, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def sample(pixels, transform, extent=None):
    boxes = np.asarray([[0, 0, pixels.shape[2] - 1, pixels.shape[1] - 1], [1, 1, 5, 4]], np.float32)
    return EncodedSample(np.asarray([101, 7, 102]), np.asarray([-1, 0, -1]), boxes, np.full((2, 3), 1 / 3, np.float32), None, pixels,
                         (pixels.shape[2], pixels.shape[1]), pixel_normalization=transform.normalization(), image_extent=extent)


def test_uint8_images_normalise_on_arrival_to_the_host_numbers():
    transform = ImageTransform(shorter_side=12, longer_side=20, mean=(102.98, 115.95, 122.77), std=(57.4, 57.1, 58.4))
    images = [picture(20, 12, 0), picture(12, 18, 1), picture(16, 16, 2)]
    pixels = [transform.pixels(image)[0] for image in images]
    assert all(p.dtype == torch.uint8 for p in pixels)
    blanked = torch.zeros_like(pixels[2])
    batch = collate_pretraining([sample(pixels[0], transform), sample(pixels[1], transform), sample(blanked, transform, (0, 0))])
    assert batch.images.dtype == torch.uint8 and batch.image_extents.tolist() == [[20, 12], [12, 18], [0, 0]]

    normalised = batch.to("cpu").images
    assert normalised.dtype == torch.float32
    for row in range(2):
        host, _ = transform(images[row])
        height, width = host.shape[1:]
        assert torch.equal(normalised[row, :, :height, :width], host), "bit-identical to normalising on the host"
        padding = torch.ones_like(normalised[row], dtype=torch.bool)
        padding[:, :height, :width] = False
        assert torch.all(normalised[row][padding] == 0)
    assert torch.all(normalised[2] == 0), "a blanked image is the mean colour"
    assert torch.equal(batch.with_normalized_images().images, normalised)


def test_end_to_end_masking_zeroes_pixels_on_the_device_after_normalising():
    transform = ImageTransform(shorter_side=12, longer_side=12)
    pixels = transform.pixels(picture(12, 12, 3))[0]
    batch = collate_pretraining([sample(pixels, transform)])
    masked = torch.tensor([[False, True]])
    objective = MaskedRegionClassification()
    concealed = objective.conceal(batch.replace(masked_regions=masked))
    expected = zero_region_pixels(batch.to("cpu").images, batch.boxes, masked)
    assert torch.equal(concealed.images, expected)
    assert concealed.images[0, :, 1:5, 1:6].eq(0).all() and not concealed.images[0, :, 6:, 7:].eq(0).all()
