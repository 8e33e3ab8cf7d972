"""Pre-training masks before it truncates, as the official ConceptualCaptionsDataset does: words over
the whole caption, regions over all boxes (a masked box the budget drops still has its pixels
zeroed and still leaves the whole-image feature), and masked RoI classification run through
`PretrainingTask` end to end."""

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from vlblocks.batch import VLBatch
from vlblocks.data.datasets.pretraining import PretrainingDataset
from vlblocks.data.formats.example import ImageTextExample
from vlblocks.data.pipeline.collate import collate_pretraining
from vlblocks.data.pipeline.images import ImageTransform
from vlblocks.objectives.masked_lm import MaskedLanguageModeling
from vlblocks.objectives.masked_region import MaskedRegionClassification
from vlblocks.objectives.pretraining_task import PretrainingTask

TINY_RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "models", "vlbert_tiny.gin")


class OnePiecePerWord:
    """A stand-in tokenizer: word w → piece 10 + w."""

    cls_id, sep_id, mask_id, vocab_size, pad_id = 1, 2, 3, 50, 0

    def encode_words(self, words):
        return [10 + index for index in range(len(words))], list(range(len(words)))


def gray_example(boxes, features=None, size=32):
    """A `size` x `size` picture of colour (200, 200, 200), one caption word, 2-class scores."""
    boxes = np.asarray(boxes, np.float32)
    scores = np.tile(np.asarray([[0.5, 0.5]], np.float32), (len(boxes), 1))
    return ImageTextExample(
        "rec", ["a"], size, size, boxes, scores, features, lambda: Image.new("RGB", (size, size), (200, 200, 200))
    )


def end_to_end_dataset(example, max_elements):
    # no resize (32 -> 32), RGB, mean 100, std 1: every real pixel normalises to 200 - 100 = 100
    transform = ImageTransform(shorter_side=32, longer_side=32, mean=(100.0, 100.0, 100.0), std=(1.0, 1.0, 1.0), bgr=False)
    return PretrainingDataset([example], OnePiecePerWord(), transform, max_elements=max_elements)


def tiny_task(region_probability=1.0, mask_fraction=1.0):
    from vlblocks.app.recipes import model_from_recipe

    model = model_from_recipe(TINY_RECIPE, ["MaskedRegionHead.num_classes = 2"], echo=lambda line: None)
    with torch.no_grad():  # constant logits (0, ln 3): softmax (1/4, 3/4) for every region
        model.region_head.region_cls_pred.weight.zero_()
        model.region_head.region_cls_pred.bias.copy_(torch.tensor([0.0, math.log(3.0)]))
    return PretrainingTask(model, [MaskedRegionClassification(probability=region_probability, mask_fraction=mask_fraction)]).eval()


def backbone_input(task, batch):
    """The images the backbone receives when the task runs on `batch`, and the task's output."""
    seen = []
    hook = task.model.vlbert.region_features.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        output = task(batch)
    finally:
        hook.remove()
    return seen[0], output


def test_a_masked_box_the_budget_drops_still_has_its_pixels_zeroed_before_the_backbone():
    # caption "a": [CLS] a [SEP] = 3 tokens; boxes: whole image + 3 = 4; budget 6:
    # 3 + 4 = 7 > 6 and 4 boxes > 3 tokens → drop a box: 3 + 3 = 6 fits. Kept: whole, A, B; dropped: C.
    boxes = [[0, 0, 7, 7], [16, 0, 19, 3], [10, 20, 13, 22]]  # A, B, C
    sample = end_to_end_dataset(gray_example(boxes), max_elements=6)[0]
    assert len(sample.text_ids) == 3 and len(sample.boxes) == 3
    np.testing.assert_allclose(sample.dropped_boxes, [[10, 20, 13, 22]])

    task = tiny_task(region_probability=1.0, mask_fraction=1.0)  # every box, dropped or not, is masked
    batch, _ = task.prepare(collate_pretraining([sample]).replace(sample_seeds=torch.tensor([7])))
    assert batch.masked_regions.tolist() == [[False, True, True]] and batch.masked_dropped.tolist() == [[True]]
    images, _ = backbone_input(task, batch)
    expected = torch.full((1, 3, 32, 32), 100.0)
    expected[..., 0:8, 0:8] = 0  # A: rows 0..7, columns 0..7
    expected[..., 0:4, 16:20] = 0  # B: rows 0..3, columns 16..19
    expected[..., 20:23, 10:14] = 0  # C (dropped): rows 20..22, columns 10..13
    torch.testing.assert_close(images, expected)


def test_region_masking_draws_do_not_depend_on_where_the_budget_cuts():
    boxes = [[i, i, i + 3, i + 3] for i in range(12)]
    whole = end_to_end_dataset(gray_example(boxes), max_elements=64)[0]
    cut = end_to_end_dataset(gray_example(boxes), max_elements=8)[0]
    assert len(whole.boxes) == 13 and len(whole.dropped_boxes) == 0
    assert len(cut.boxes) == 5 and len(cut.dropped_boxes) == 8  # 3 tokens + 5 boxes = 8
    objective = MaskedRegionClassification(probability=0.5, mask_fraction=1.0)
    seeds = torch.arange(40) * 13 + 5
    full = objective.mask(collate_pretraining([whole] * 40), seeds)
    truncated = objective.mask(collate_pretraining([cut] * 40), seeds)
    masked_all_boxes = torch.cat([truncated.masked_regions, truncated.masked_dropped], dim=1)
    assert torch.equal(masked_all_boxes, full.masked_regions)
    assert truncated.masked_dropped.any(), "some dropped boxes are masked"


def test_precomputed_whole_image_feature_leaves_out_masked_boxes_the_budget_dropped():
    # features f1 = (1, 2), f2 = (3, 4), f3 = (5, 9); mean over all three = (3, 5).
    # Caption dropped: 2 tokens; 4 boxes; budget 5 → drop one box: kept whole, f1, f2; dropped f3.
    # Masked: f1 (kept) and f3 (dropped). Official: (3 x (3, 5) - (1, 2) - (5, 9)) / (3 - 2 + 1e-5)
    # = (3, 4) / 1.00001 = (2.99997, 3.99996). Counting only the kept boxes would give
    # (2 x (3, 5) - (1, 2)) / (2 - 1 + 1e-5) = (5, 8).
    features = np.asarray([[1, 2], [3, 4], [5, 9]], np.float32)
    example = ImageTextExample("rec", ["a"], 10, 10, np.zeros((3, 4), np.float32), np.full((3, 2), 0.5, np.float32), features)
    sample = PretrainingDataset([example], OnePiecePerWord(), None, max_elements=5).sample(0, drop_caption=True)
    np.testing.assert_allclose(sample.features, [[3, 5], [1, 2], [3, 4]])
    np.testing.assert_allclose(sample.dropped_features, [[5, 9]])
    batch = collate_pretraining([sample])
    objective = MaskedRegionClassification(precomputed_feature_size=2)
    with torch.no_grad():
        objective.mask_feature.fill_(-1.0)
    concealed = objective.conceal(batch.replace(masked_regions=torch.tensor([[False, True, False]]), masked_dropped=torch.tensor([[True]])))
    torch.testing.assert_close(concealed.region_features[0], torch.tensor([[2.99997, 3.99996], [-1.0, -1.0], [3.0, 4.0]]))


def test_masked_words_do_not_depend_on_where_the_budget_cuts():
    # every word chosen, every choice a random piece: the random ids at the kept positions must
    # be those of the untruncated caption (masking, then truncating)
    rows, words = 50, 12
    full_ids = torch.arange(words).repeat(rows, 1) + 10
    cut = 5

    def text_batch(length):
        ids = full_ids[:, :length]
        return VLBatch(
            text_ids=ids, segment_ids=torch.zeros_like(ids), text_mask=torch.ones_like(ids, dtype=torch.bool),
            boxes=torch.zeros(rows, 1, 4), region_mask=torch.ones(rows, 1, dtype=torch.bool), image_sizes=torch.ones(rows, 2),
            word_index=torch.arange(length).repeat(rows, 1),
        )

    objective = MaskedLanguageModeling(vocab_size=1000, mask_token_id=3, probability=1.0, mask_fraction=0.0, random_fraction=1.0)
    seeds = torch.arange(rows) + 17
    full = objective.mask(text_batch(words), seeds)
    truncated = objective.mask(text_batch(cut), seeds)
    assert torch.equal(truncated.text_ids, full.text_ids[:, :cut])
    assert not torch.equal(full.text_ids, full_ids), "the pieces were replaced"


def test_end_to_end_masked_roi_classification_through_the_task_zeroes_pixels_and_scores_only_chosen_regions():
    # seed 5 with probability 0.5 chooses region B only (region 0, the whole image, never);
    # mask_fraction 1: B is masked. A keeps its pixels; B's are 0 before the backbone.
    # Targets: A (0.5, 0.5), B (1, 0). Logits are (0, ln 3) everywhere → softmax (1/4, 3/4).
    # Only B is scored: loss = -(1 x ln(1/4)) = ln 4 = 1.386294; had A also counted:
    # (ln 4 + 0.5 ln 4 + 0.5 ln(4/3)) / 2 = (1.386294 + 0.693147 + 0.143841) / 2 = 1.111641.
    images = torch.full((1, 3, 32, 32), 5.0)
    scores = torch.tensor([[[0.0, 0.0], [0.5, 0.5], [1.0, 0.0]]])
    batch = VLBatch(
        text_ids=torch.tensor([[1, 10, 2]]), segment_ids=torch.zeros(1, 3, dtype=torch.long), text_mask=torch.ones(1, 3, dtype=torch.bool),
        boxes=torch.tensor([[[0.0, 0.0, 31.0, 31.0], [0.0, 0.0, 7.0, 7.0], [16.0, 8.0, 23.0, 11.0]]]),
        region_mask=torch.ones(1, 3, dtype=torch.bool), image_sizes=torch.tensor([[32.0, 32.0]]), images=images,
        word_index=torch.tensor([[-1, 0, -1]]), region_class_scores=scores, sample_seeds=torch.tensor([5]),
    )
    task = tiny_task(region_probability=0.5, mask_fraction=1.0)
    prepared, _ = task.prepare(batch)
    assert prepared.masked_regions.tolist() == [[False, False, True]]
    assert prepared.region_positions.tolist() == [[0, 2]]
    torch.testing.assert_close(prepared.region_targets[0], torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]]))
    seen, output = backbone_input(task, prepared)
    expected = torch.full((1, 3, 32, 32), 5.0)
    expected[..., 8:12, 16:24] = 0  # B: rows 8..11, columns 16..23
    torch.testing.assert_close(seen, expected)
    assert output.metrics["mvrc/loss"].item() == pytest.approx(1.386294, abs=1e-5)
    assert output.metrics["mvrc/count"] == 1.0
