"""Collation with dynamic padding: each batch is padded to its own longest row."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from vlblocks.batch import VLBatch
from vlblocks.data.pipeline.sample import EncodedSample, TextChunk

# The dtypes batches are padded in, and numpy's for them: rows are copied in numpy, where a row
# costs about a microsecond against ten for a tensor's.
_NUMPY_DTYPES = {torch.long: np.int64, torch.bool: np.bool_, torch.float32: np.float32}


def _pad(arrays: Sequence[np.ndarray], length: int, value: float, dtype: torch.dtype) -> torch.Tensor:
    """[B, length, ...] of `dtype` (long, bool or float32): row b holds `arrays[b]` ([n_b, ...],
    n_b <= length), then `value`."""
    out = np.full((len(arrays), length, *np.shape(arrays[0])[1:]), value, dtype=_NUMPY_DTYPES[dtype])
    for row, array in enumerate(arrays):
        out[row, : len(array)] = array
    return torch.from_numpy(out)


def _pad_optional(samples: Sequence[EncodedSample], name: str, length: int, value: float, dtype: torch.dtype) -> Optional[torch.Tensor]:
    arrays = [getattr(s, name) for s in samples]
    if arrays[0] is None:
        return None
    if any(a is None for a in arrays):
        raise ValueError(f"some samples of the batch have {name} and some do not")
    return _pad(arrays, length, value, dtype)


def _stack_optional(samples: Sequence[EncodedSample], name: str, dtype: torch.dtype) -> Optional[torch.Tensor]:
    values = [getattr(s, name) for s in samples]
    if values[0] is None:
        return None
    if any(v is None for v in values):
        raise ValueError(f"some samples of the batch have {name} and some do not")
    return torch.as_tensor(np.stack(values) if isinstance(values[0], np.ndarray) else values, dtype=dtype)


def _images(samples: Sequence[EncodedSample]) -> dict[str, Optional[torch.Tensor]]:
    """The images of `samples` padded with 0 to the largest: `images`, and for uint8 pixels
    their `pixel_mean`, `pixel_std` and `image_extents` (normalised later, on the device)."""
    if samples[0].image is None:
        return {"images": None}
    height = max(s.image.shape[1] for s in samples)
    width = max(s.image.shape[2] for s in samples)
    images = torch.zeros(len(samples), 3, height, width, dtype=samples[0].image.dtype)
    for row, sample in enumerate(samples):
        images[row, :, : sample.image.shape[1], : sample.image.shape[2]] = sample.image
    if images.is_floating_point():
        return {"images": images}
    if samples[0].pixel_normalization is None:
        raise ValueError("uint8 sample images need pixel_normalization (mean, std) to be normalised with")
    mean, std = (torch.tensor(values, dtype=torch.float32) for values in samples[0].pixel_normalization)
    extents = [s.image_extent if s.image_extent is not None else (s.image.shape[2], s.image.shape[1]) for s in samples]
    return {"images": images, "pixel_mean": mean, "pixel_std": std, "image_extents": torch.tensor(extents, dtype=torch.long)}


def collate_pretraining(samples: Sequence[EncodedSample], rows_per_image: int = 1) -> VLBatch:
    """Samples → `VLBatch` padded to the longest text, region list and image.

    With `rows_per_image` > 1, each run of that many consecutive samples shares one image (its
    first sample carries the pixels or features), and the batch holds each image once.
    """
    text_length = max(len(s.text_ids) for s in samples)
    regions = max(len(s.boxes) for s in samples)
    leaders = samples[::rows_per_image]
    features = _pad_optional(leaders, "features", regions, 0.0, torch.float32)
    text_ids = _pad([s.text_ids for s in samples], text_length, 0, torch.long)
    segment_ids = _pad_optional(samples, "segment_ids", text_length, 0, torch.long)
    return VLBatch(
        text_ids=text_ids,
        segment_ids=segment_ids if segment_ids is not None else torch.zeros_like(text_ids),
        text_mask=_pad([np.ones(len(s.text_ids), bool) for s in samples], text_length, False, torch.bool),
        boxes=_pad([s.boxes for s in samples], regions, 0.0, torch.float32),
        region_mask=_pad([np.ones(len(s.boxes), bool) for s in samples], regions, False, torch.bool),
        image_sizes=torch.tensor([s.image_size for s in samples], dtype=torch.float32),
        region_features=features,
        **_images(leaders),
        token_region_index=_pad_optional(samples, "token_regions", text_length, 0, torch.long),
        word_index=_pad([s.word_index for s in samples], text_length, -1, torch.long),
        region_class_scores=_pad_optional(samples, "class_scores", regions, 0.0, torch.float32),
        answer_positions=_stack_optional(samples, "answer_position", torch.long),
        answer_scores=_stack_optional(samples, "answer_scores", torch.float32),
        choice_labels=_stack_optional(samples, "choice_label", torch.float32),
        region_labels=_pad_optional(samples, "region_labels", regions, 0.0, torch.float32),
        region_classes=_pad_optional(samples, "region_classes", regions, -1, torch.long),
        region_masks=_pad_optional(samples, "region_masks", regions, 0.0, torch.float32),
        rows_per_image=rows_per_image,
        sequence_length=max(len(s.text_ids) + len(s.boxes) for s in samples) + 1,
        image_region_slots=torch.tensor([(image, region) for image, s in enumerate(leaders) for region in range(len(s.boxes))], dtype=torch.long).view(-1, 2),
        **_dropped(samples, leaders),
    )


def _dropped(samples: Sequence[EncodedSample], leaders: Sequence[EncodedSample]) -> dict[str, Optional[torch.Tensor]]:
    """The boxes (and features) that truncation cut off, padded to the most of a row: pre-training's
    region masking still draws over them. Empty when no sample carries any."""
    if samples[0].dropped_boxes is None:
        return {}
    dropped = max(len(s.dropped_boxes) for s in samples)
    return {
        "dropped_boxes": _pad_optional(samples, "dropped_boxes", dropped, 0.0, torch.float32),
        "dropped_box_mask": _pad([np.ones(len(s.dropped_boxes), bool) for s in samples], dropped, False, torch.bool),
        "dropped_features": _pad_optional(leaders, "dropped_features", dropped, 0.0, torch.float32),
    }


def collate_choice_groups(groups: Sequence[Sequence[EncodedSample]]) -> VLBatch:
    """Questions with their choices (each a list of samples sharing one image) → one `VLBatch`
    of all choice rows, question after question, with `rows_per_image` = choices per question."""
    sizes = {len(group) for group in groups}
    if len(sizes) != 1:
        raise ValueError(f"every question of a batch needs the same number of choices, got {sorted(sizes)}")
    return collate_pretraining([sample for group in groups for sample in group], rows_per_image=sizes.pop())


def collate_text(samples: Sequence[TextChunk]) -> VLBatch:
    """Text-only chunks → `VLBatch` with no regions (the text-only stream)."""
    text_length = max(len(s.text_ids) for s in samples)
    text_ids = _pad([s.text_ids for s in samples], text_length, 0, torch.long)
    batch = len(samples)
    return VLBatch(
        text_ids=text_ids,
        segment_ids=torch.zeros_like(text_ids),
        text_mask=_pad([np.ones(len(s.text_ids), bool) for s in samples], text_length, False, torch.bool),
        boxes=torch.zeros(batch, 0, 4),
        region_mask=torch.zeros(batch, 0, dtype=torch.bool),
        image_sizes=torch.ones(batch, 2),
        word_index=_pad([s.word_index for s in samples], text_length, -1, torch.long),
        sequence_length=text_length + 1,
        image_region_slots=torch.zeros(0, 2, dtype=torch.long),
    )
