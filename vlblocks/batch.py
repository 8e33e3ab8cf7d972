"""The data contract: one typed batch carries every tensor from collate to the loss."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor


def normalize_pixels(pixels: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 pixels [..., 3, H, W] → float32 (pixel - mean) / std, channel by channel ([3] each)."""
    return (pixels.float() - mean[:, None, None]) / std[:, None, None]


# Fields that hold one entry per image (or none per row), not one per row.
PER_IMAGE_FIELDS = ("images", "region_features", "image_region_slots", "pixel_mean", "pixel_std", "image_extents", "dropped_features")


@dataclass
class VLBatch:
    """A padded batch of image-text samples.

    Shapes use B = batch size, L = longest text row, N = most regions in a row.

    Attributes:
        text_ids: [B, L] long. WordPiece ids, padded with 0.
        segment_ids: [B, L] long. 0 for segment A, 1 for segment B.
        text_mask: [B, L] bool. True at real tokens.
        boxes: [B, N, 4] float. (x1, y1, x2, y2) in pixels of the image the features or pixels
            belong to (the resized image in end-to-end mode). Region 0 is the whole image.
        region_mask: [B, N] bool. True at real regions.
        image_sizes: [B, 2] float. (width, height) of that image; boxes are normalised by it.
        region_features: [B, N, D] float, precomputed appearance features (e.g. 2048-d pool5),
            or None in end-to-end mode.
        images: [I, 3, H, W], the pixels for end-to-end mode (I = B / rows_per_image), or None:
            uint8 as read (in the backbone's channel order, padded with 0), normalised with
            `pixel_mean` and `pixel_std` into float32 by `to` on the device they go to (or by
            `with_normalized_images`); or float32 already normalised.
        token_region_index: [B, L] long. The region whose feature each token sees; None means
            region 0 (the whole image) for every token, as in pre-training, VQA and RefCOCO+.
        word_index: [B, L] long. Index of the basic-tokenised word each WordPiece belongs to
            (-1 for special tokens), so objectives can mask whole words. Optional.
        masked_regions: [B, N] bool. Regions whose [IMG] token is replaced by the learned
            masked-region token (masked RoI classification). None means no region is masked.
        region_class_scores: [B, N, C] float. The detector's class distribution of every region
            (zero rows for the whole-image box and padding). Optional.
        mlm_labels: [B, L] long. Original ids at masked tokens, -1 elsewhere. Optional.
        region_targets: [B, N, C] float. Soft class distributions of the regions selected for
            masked-region classification, zero rows elsewhere. Optional.
        relation_labels: [B] long. The relation head's target class: by default 1 if the caption
            matches the image (`CaptionImageRelation.matched_class`). Optional.
        answer_positions: [B] long. The token whose final state answers the question (VQA's
            [MASK] slot). Optional.
        answer_scores: [B, A] float. Soft VQA scores over the answer vocabulary. Optional.
        choice_labels: [B] float. 1 at the row holding the right choice of its group, 0 at the
            others (multiple choice, e.g. VCR). Optional.
        region_labels: [B, N] float. 1 at regions that match the referring expression (IoU > 0.5
            with the referred box), 0 elsewhere (RefCOCO+). Optional.
        region_classes: [B, N] long. Detector class of each region (COCO, 0 = background and the
            whole image), -1 at padding (VCR's auxiliary region loss). Optional.
        region_masks: [B, N, M, M] float. Instance masks on an M x M grid over each box (VCR's
            14 x 14 polygon masks; all ones for the whole image), multiplied into the RoI head's
            feature map in end-to-end mode. Optional.
        rows_per_image: consecutive rows that share one image: `images` / `region_features`
            then hold B / rows_per_image entries, and the visual front end runs once per image
            (VCR's 4 choices of a question). 1 otherwise.
        sample_seeds: [B] long. Each row's seed, a function of (run seed, epoch, sample index)
            only (`vlblocks.seeding`); the masking objectives draw from it. Optional.
        mlm_positions: [K, 2] long. (row, token) of the K tokens masked LM scores, decided with
            the masking (so no device sync is needed to find them). Optional.
        region_positions: [K, 2] long. (row, region) of the regions masked-region
            classification scores. Optional.
        sequence_length: the packed length T = max over rows of (text + regions) + 1, counted
            on the host when the batch is made; None: counted on the device when packing.
        scored_length: the most final states one row's objectives read (scored tokens and
            regions, +1 for a pooled output), counted on the host when pre-training masks the
            batch (`PretrainingTask.prepare`): the row count of a last layer that computes only
            those. None: the last layer computes every position.
        image_region_slots: [K, 2] long. (image, region) of every valid region of each image
            (the first row of each `rows_per_image` group), listed on the host when the batch is
            made: the visual front end's RoIs. None: found from `region_mask` on the device.
        pixel_mean, pixel_std: [3] float. The normalisation of uint8 `images`, channel by channel.
        image_extents: [I, 2] long. (width, height) of each uint8 image's real pixels: padding
            beyond them, and the whole of a blanked image (0, 0), is 0 once normalised.
        dropped_boxes: [B, M, 4] float. The detector boxes that the text + box budget cut off
            (pre-training), in the frame of `boxes`: region masking draws over them too, as
            the official code masks before it truncates. Optional.
        dropped_box_mask: [B, M] bool. True at real dropped boxes. Optional.
        dropped_features: [I, M, D] float. Their precomputed features (precomputed mode). Optional.
        masked_dropped: [B, M] bool. Dropped boxes that region masking masked. Optional.
        caption_matches: [B] bool. Whether the row's caption is its image's, after a matching
            objective swapped some (`CaptionImageRelation`). Optional.
        region_attribute_labels: [B, N] long. Each region's attribute class, -1 where unknown
            (LXMERT's attribute objective). Optional.
        region_feature_targets: [K, D] float. The precomputed features of the regions at
            `region_positions`, before masking hid them (feature regression). Optional.
    """

    text_ids: Tensor
    segment_ids: Tensor
    text_mask: Tensor
    boxes: Tensor
    region_mask: Tensor
    image_sizes: Tensor
    region_features: Optional[Tensor] = None
    images: Optional[Tensor] = None
    token_region_index: Optional[Tensor] = None
    word_index: Optional[Tensor] = None
    masked_regions: Optional[Tensor] = None
    region_class_scores: Optional[Tensor] = None
    mlm_labels: Optional[Tensor] = None
    region_targets: Optional[Tensor] = None
    relation_labels: Optional[Tensor] = None
    answer_positions: Optional[Tensor] = None
    answer_scores: Optional[Tensor] = None
    choice_labels: Optional[Tensor] = None
    region_labels: Optional[Tensor] = None
    region_classes: Optional[Tensor] = None
    region_masks: Optional[Tensor] = None
    rows_per_image: int = 1
    sample_seeds: Optional[Tensor] = None
    mlm_positions: Optional[Tensor] = None
    region_positions: Optional[Tensor] = None
    sequence_length: Optional[int] = None
    scored_length: Optional[int] = None
    image_region_slots: Optional[Tensor] = None
    pixel_mean: Optional[Tensor] = None
    pixel_std: Optional[Tensor] = None
    image_extents: Optional[Tensor] = None
    dropped_boxes: Optional[Tensor] = None
    dropped_box_mask: Optional[Tensor] = None
    dropped_features: Optional[Tensor] = None
    masked_dropped: Optional[Tensor] = None
    caption_matches: Optional[Tensor] = None
    region_attribute_labels: Optional[Tensor] = None
    region_feature_targets: Optional[Tensor] = None

    def __post_init__(self) -> None:
        batch, length = self.text_ids.shape
        for name in ("segment_ids", "text_mask", "token_region_index", "word_index", "mlm_labels"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (batch, length):
                raise ValueError(f"VLBatch.{name} has shape {tuple(value.shape)}, expected {(batch, length)}")
        if self.boxes.dim() != 3 or self.boxes.shape[0] != batch or self.boxes.shape[-1] != 4:
            raise ValueError(f"VLBatch.boxes has shape {tuple(self.boxes.shape)}, expected ({batch}, N, 4)")
        regions = self.boxes.shape[1]
        for name in ("region_mask", "masked_regions", "region_labels", "region_classes", "region_attribute_labels"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (batch, regions):
                raise ValueError(f"VLBatch.{name} has shape {tuple(value.shape)}, expected {(batch, regions)}")
        for name in ("mlm_positions", "region_positions", "image_region_slots"):
            value = getattr(self, name)
            if value is not None and (value.dim() != 2 or value.shape[1] != 2):
                raise ValueError(f"VLBatch.{name} has shape {tuple(value.shape)}, expected (K, 2)")
        for name in ("answer_positions", "choice_labels", "relation_labels", "sample_seeds", "caption_matches"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (batch,):
                raise ValueError(f"VLBatch.{name} has shape {tuple(value.shape)}, expected ({batch},)")
        if self.answer_scores is not None and (self.answer_scores.dim() != 2 or self.answer_scores.shape[0] != batch):
            raise ValueError(f"VLBatch.answer_scores has shape {tuple(self.answer_scores.shape)}, expected ({batch}, A)")
        if self.rows_per_image < 1 or batch % self.rows_per_image:
            raise ValueError(f"VLBatch.rows_per_image = {self.rows_per_image} does not divide the {batch} rows")
        images = batch // self.rows_per_image
        for name in ("images", "region_features"):
            value = getattr(self, name)
            if value is not None and value.shape[0] != images:
                raise ValueError(f"VLBatch.{name} holds {value.shape[0]} images, expected {images} ({batch} rows / {self.rows_per_image})")
        if tuple(self.image_sizes.shape) != (batch, 2):
            raise ValueError(f"VLBatch.image_sizes has shape {tuple(self.image_sizes.shape)}, expected ({batch}, 2)")
        if self.region_features is not None and self.region_features.shape[1] != regions:
            raise ValueError(
                f"VLBatch.region_features has shape {tuple(self.region_features.shape)}, expected ({images}, {regions}, D)"
            )
        if self.dropped_boxes is not None:
            dropped = tuple(self.dropped_boxes.shape[:2])
            for name in ("dropped_box_mask", "masked_dropped"):
                value = getattr(self, name)
                if value is not None and tuple(value.shape) != dropped:
                    raise ValueError(f"VLBatch.{name} has shape {tuple(value.shape)}, expected {dropped} (dropped_boxes)")
        for name in ("region_class_scores", "region_targets", "region_masks"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape[:2]) != (batch, regions):
                raise ValueError(f"VLBatch.{name} has shape {tuple(value.shape)}, expected ({batch}, {regions}, C)")

    @property
    def batch_size(self) -> int:
        return self.text_ids.shape[0]

    def map_tensors(self, function: Callable[[Tensor], Tensor]) -> "VLBatch":
        """A copy with `function` applied to every tensor field (None fields stay None)."""
        mapped = {
            field.name: (function(value) if isinstance(value, Tensor) else value)
            for field in dataclasses.fields(self)
            for value in [getattr(self, field.name)]
        }
        return VLBatch(**mapped)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "VLBatch":
        """A copy with every tensor moved to `device` (`non_blocking` from pinned memory), and
        uint8 images normalised there (a quarter of float32's bytes cross to the device)."""
        return self.map_tensors(lambda tensor: tensor.to(device, non_blocking=non_blocking)).with_normalized_images()

    def with_normalized_images(self) -> "VLBatch":
        """This batch with uint8 `images` normalised to float32 where they are: (pixel - mean) /
        std per channel, 0 outside each image's extent; itself when there is nothing to do."""
        if self.images is None or self.images.is_floating_point():
            return self
        if self.pixel_mean is None or self.pixel_std is None:
            raise ValueError("VLBatch.images are uint8 but the batch has no pixel_mean / pixel_std to normalise them with")
        images = normalize_pixels(self.images, self.pixel_mean, self.pixel_std)
        if self.image_extents is not None:
            height, width = images.shape[-2:]
            rows = torch.arange(height, device=images.device)[None, :, None] < self.image_extents[:, 1, None, None]
            columns = torch.arange(width, device=images.device)[None, None, :] < self.image_extents[:, 0, None, None]
            images = torch.where((rows & columns)[:, None], images, 0.0)
        return dataclasses.replace(self, images=images)

    def pin_memory(self) -> "VLBatch":
        """A copy in page-locked memory, for non-blocking copies to a GPU (DataLoader's
        `pin_memory=True` calls it)."""
        return self.map_tensors(Tensor.pin_memory)

    def image_rows(self) -> "VLBatch":
        """The first row of each image's group, with `rows_per_image` 1: what the visual front
        end sees, so it runs once per image."""
        if self.rows_per_image == 1:
            return self
        step = self.rows_per_image
        picked = {
            field.name: (value[::step] if isinstance(value, Tensor) and field.name not in PER_IMAGE_FIELDS else value)
            for field in dataclasses.fields(self)
            for value in [getattr(self, field.name)]
        }
        picked.update(
            rows_per_image=1, mlm_positions=None, region_positions=None, sequence_length=None, scored_length=None, region_feature_targets=None
        )
        return VLBatch(**picked)

    def packed_length(self) -> int:
        """T = max over rows of (valid text + valid regions) + 1: the packed sequence's length
        (reads the masks, so count it on the host, before the batch goes to a GPU)."""
        if self.batch_size == 0:
            return 1
        return int((self.text_mask.sum(1) + self.region_mask.sum(1)).max()) + 1

    def replace(self, **changes: Optional[Tensor]) -> "VLBatch":
        """A copy with some fields replaced (objectives use this to apply their masking)."""
        return dataclasses.replace(self, **changes)
