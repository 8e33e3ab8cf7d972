"""`PretrainingTask(model, objectives=[...])` and the objectives VisualBERT and LXMERT add."""

import math

import pytest
import torch
import torch.nn.functional as F

from vlblocks.batch import VLBatch
from vlblocks.blocks import (
    AveragedRegionFeatureEmbedding,
    CoAttentionEncoder,
    MaskedLMHead,
    Pooler,
    PrecomputedRegionFeatures,
    RegionPredictionHead,
    RelationHead,
    TextEmbedding,
)
from vlblocks.models import TwoStreamModel, VLBertForPretraining
from vlblocks.objectives import (
    AttributeClassification,
    ImageTextMatching,
    MaskedFeatureRegression,
    MaskedLanguageModeling,
    ObjectLabelClassification,
    PretrainingTask,
    RegionMasking,
)

HIDDEN, VOCAB, FEATURES, CLASSES, ATTRIBUTES = 32, 60, 12, 5, 3


def lxmert_like_model() -> VLBertForPretraining:
    torch.manual_seed(0)
    core = TwoStreamModel(
        PrecomputedRegionFeatures(FEATURES),
        AveragedRegionFeatureEmbedding(FEATURES, HIDDEN, dropout=0.0),
        TextEmbedding(VOCAB, HIDDEN, 32, 2, dropout=0.0),
        CoAttentionEncoder(1, 1, 1, HIDDEN, 4, 64, dropout=0.0, attention_dropout=0.0),
        Pooler(HIDDEN),
    )
    outputs = {"object": CLASSES, "attribute": ATTRIBUTES, "feature": FEATURES}
    return VLBertForPretraining(core, MaskedLMHead(HIDDEN, VOCAB), relation_head=RelationHead(HIDDEN), visual_head=RegionPredictionHead(HIDDEN, outputs))


def batch(rows: int = 6, length: int = 7, regions: int = 5) -> VLBatch:
    generator = torch.Generator().manual_seed(1)
    word_index = torch.arange(length).repeat(rows, 1) - 1
    word_index[:, -1] = -1
    scores = torch.softmax(torch.randn(rows, regions, CLASSES, generator=generator), -1)
    scores[:, 0] = 0
    corners = torch.rand(rows, regions, 2, generator=generator) * 30
    attributes = torch.randint(-1, ATTRIBUTES, (rows, regions), generator=generator)
    return VLBatch(
        text_ids=torch.randint(5, VOCAB, (rows, length), generator=generator),
        segment_ids=torch.zeros(rows, length, dtype=torch.long),
        text_mask=torch.ones(rows, length, dtype=torch.bool),
        boxes=torch.cat([corners, corners + 20], -1),
        region_mask=torch.ones(rows, regions, dtype=torch.bool),
        image_sizes=torch.full((rows, 2), 64.0),
        region_features=torch.randn(rows, regions, FEATURES, generator=generator),
        word_index=word_index,
        region_class_scores=scores,
        region_attribute_labels=attributes,
        sample_seeds=torch.arange(rows) + 7,
    )


def lxmert_objectives():
    return [
        ImageTextMatching(),
        MaskedLanguageModeling(VOCAB, 3, probability=0.4),
        RegionMasking(probability=0.6, mask_fraction=1.0, precomputed_feature_size=FEATURES),
        ObjectLabelClassification(),
        AttributeClassification(weight=0.5),
        MaskedFeatureRegression(weight=2.0),
    ]


def test_lxmert_objectives_sum_with_their_weights_and_share_one_visual_head_pass():
    task = PretrainingTask(lxmert_like_model(), lxmert_objectives())
    prepared, _ = task.prepare(batch())
    calls = []
    task.model.visual_head.transform.register_forward_hook(lambda *_: calls.append(1))
    output = task(prepared)
    metrics = output.metrics
    expected = metrics["itm/loss"] + metrics["mlm/loss"] + metrics["object/loss"] + 0.5 * metrics["attribute/loss"] + 2.0 * metrics["feature/loss"]
    assert math.isclose(float(metrics["loss"]), float(expected), rel_tol=1e-6)
    assert len(calls) == 1, "the three region objectives score the same positions with one pass of the head"
    assert set(output.model_output.logits) == {"itm", "mlm", "object", "attribute", "feature"}
    assert task.loss_counts(prepared) == {
        "itm": 6.0,
        "mlm": float(prepared.mlm_positions.shape[0]),
        "object": float(prepared.region_positions.shape[0]),
        "attribute": float(prepared.region_positions.shape[0]),
        "feature": float(prepared.region_positions.shape[0]),
    }
    output.loss.backward()
    assert task.model.visual_head.decoders["feature"].weight.grad.abs().sum() > 0
    assert task.objectives["region_masking"].mask_feature.grad.abs().sum() > 0


def test_region_losses_equal_their_definitions():
    task = PretrainingTask(lxmert_like_model(), lxmert_objectives()).eval()
    original = batch()
    prepared, _ = task.prepare(original)
    positions = prepared.region_positions
    assert positions.shape[0] > 0
    output = task(prepared)
    logits = output.model_output.logits
    rows, regions = positions[:, 0], positions[:, 1]

    confidence, labels = original.region_class_scores[rows, regions].max(-1)
    terms = [confidence[k] * -torch.log_softmax(logits["object"][k], -1)[labels[k]] for k in range(len(labels))]
    torch.testing.assert_close(output.metrics["object/loss"], torch.stack(terms).mean())

    attributes = original.region_attribute_labels[rows, regions]
    kept = [k for k in range(len(attributes)) if attributes[k] >= 0]
    terms = [-torch.log_softmax(logits["attribute"][k], -1)[attributes[k]] for k in kept]
    torch.testing.assert_close(output.metrics["attribute/loss"], torch.stack(terms).mean())

    # the targets are the features before masking hid them (the model saw the mask feature)
    targets = original.region_features[rows, regions]
    torch.testing.assert_close(prepared.region_feature_targets, targets)
    torch.testing.assert_close(output.metrics["feature/loss"], F.smooth_l1_loss(logits["feature"], targets))


def test_matching_class_convention():
    plain = batch()
    one = ImageTextMatching(matched_class=1).mask(plain, plain.sample_seeds)
    zero = ImageTextMatching(matched_class=0).mask(plain, plain.sample_seeds)
    assert torch.equal(one.text_ids, zero.text_ids), "the same swaps"
    assert torch.equal(one.relation_labels, 1 - zero.relation_labels)
    assert 0 < int(one.relation_labels.sum()) < plain.batch_size


def test_objective_list_errors_are_clear():
    model = lxmert_like_model()
    with pytest.raises(ValueError, match="region_head"):
        PretrainingTask(model, [MaskedLanguageModeling(VOCAB, 3), RegionMasking(), ObjectLabelClassification(), _RegionClassification()])
    with pytest.raises(ValueError, match="named"):
        PretrainingTask(model, [MaskedLanguageModeling(VOCAB, 3), MaskedLanguageModeling(VOCAB, 3)])
    task = PretrainingTask(model, [ObjectLabelClassification()])
    with pytest.raises(ValueError, match="RegionMasking"):
        task(task.prepare(batch())[0])
    task = PretrainingTask(model, [RegionMasking(), MaskedFeatureRegression()])
    without_features = batch().replace(region_features=None, images=torch.zeros(6, 3, 8, 8))
    with pytest.raises(ValueError, match="precomputed"):
        task.prepare(without_features)


def _RegionClassification():
    from vlblocks.objectives import MaskedRegionClassification

    return MaskedRegionClassification()


def test_masked_lm_on_matched_captions_only():
    plain = batch(rows=8)
    swapped = ImageTextMatching(matched_class=0).mask(plain, plain.sample_seeds)
    assert torch.equal(swapped.caption_matches, swapped.relation_labels == 0)
    everywhere = MaskedLanguageModeling(VOCAB, 3, probability=0.5).mask(swapped, swapped.sample_seeds)
    matched = MaskedLanguageModeling(VOCAB, 3, probability=0.5, matched_only=True).mask(swapped, swapped.sample_seeds)
    rows = swapped.caption_matches
    assert set(everywhere.mlm_positions[:, 0].tolist()) - set(rows.nonzero().flatten().tolist()), "the draws mask swapped rows too"
    assert set(matched.mlm_positions[:, 0].tolist()) <= set(rows.nonzero().flatten().tolist())
    kept = rows[everywhere.mlm_positions[:, 0]]
    assert torch.equal(matched.mlm_positions, everywhere.mlm_positions[kept]), "a matched row's masking does not change"
    with pytest.raises(ValueError, match="matching objective"):
        MaskedLanguageModeling(VOCAB, 3, matched_only=True).mask(plain, plain.sample_seeds)
