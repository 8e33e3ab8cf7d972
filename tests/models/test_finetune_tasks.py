"""Fine-tuning losses against float64 references written from the official equations."""

import math

import torch

from vlblocks.batch import VLBatch
from vlblocks.blocks.embeddings import VLEmbedding
from vlblocks.blocks.encoder import Pooler, TransformerEncoder
from vlblocks.blocks.geometry import RegionGeometryEmbedding
from vlblocks.blocks.region_features import PrecomputedRegionFeatures
from vlblocks.blocks.task_heads import AnswerHead, ChoiceHead, RegionScoreHead
from vlblocks.blocks.visual import VisualFeatureEmbedding
from vlblocks.models.grounding_task import ReferringExpressionTask, grounding_loss, pick_region
from vlblocks.models.vcr_task import VCRTask, choice_loss, region_class_loss
from vlblocks.models.vlbert import VLBert
from vlblocks.models.vqa_task import VQATask, vqa_loss, vqa_score


def bce(logit, target):
    """-[t log s(x) + (1 - t) log(1 - s(x))], one scalar at a time."""
    s = 1 / (1 + math.exp(-logit))
    return -(target * math.log(s) + (1 - target) * math.log(1 - s))


def test_vqa_loss_is_mean_bce_times_the_number_of_answers():
    torch.manual_seed(0)
    logits, scores = torch.randn(3, 5, dtype=torch.float64), torch.rand(3, 5, dtype=torch.float64)
    expected = sum(bce(logits[b, a].item(), scores[b, a].item()) for b in range(3) for a in range(5)) / 15 * 5
    assert math.isclose(vqa_loss(logits, scores).item(), expected, rel_tol=1e-6)
    assert vqa_score(logits, scores).tolist() == [scores[b, logits[b].argmax()].item() for b in range(3)]


def test_grounding_loss_averages_over_valid_regions_only():
    logits = torch.tensor([[0.5, -1.0, 3.0], [2.0, 0.1, 9.0]], dtype=torch.float64)
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    expected = sum(bce(logits[b, n].item(), labels[b, n].item()) for b, n in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]) / 5
    assert math.isclose(grounding_loss(logits, labels, mask).item(), expected, rel_tol=1e-6)
    assert pick_region(logits, mask).tolist() == [2, 0]  # padding never wins


def test_choice_loss_is_bce_against_the_one_hot_right_choice():
    logits = torch.tensor([0.2, -0.3, 1.5, 0.0], dtype=torch.float64)
    labels = torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    expected = sum(bce(logits[i].item(), labels[i].item()) for i in range(4)) / 4
    assert math.isclose(choice_loss(logits, labels).item(), expected, rel_tol=1e-6)


def test_region_class_loss_is_cross_entropy_over_valid_regions():
    logits = torch.randn(1, 3, 4, dtype=torch.float64)
    classes = torch.tensor([[0, 2, -1]])
    mask = torch.tensor([[True, True, False]])
    log_probs = logits.log_softmax(-1)
    expected = -(log_probs[0, 0, 0] + log_probs[0, 1, 2]).item() / 2
    assert math.isclose(region_class_loss(logits, classes, mask).item(), expected, rel_tol=1e-6)


def tiny_vlbert(pooler=False, hidden=16, feature=8):
    torch.manual_seed(0)
    return VLBert(
        PrecomputedRegionFeatures(feature),
        VisualFeatureEmbedding(feature, hidden, RegionGeometryEmbedding(dim=4), dropout=0.0),
        VLEmbedding(vocab_size=20, hidden_size=hidden, visual_size=hidden, dropout=0.0, visual_scale_init=1.0),
        TransformerEncoder(num_layers=1, hidden_size=hidden, num_heads=2, intermediate_size=32, dropout=0.0, attention_dropout=0.0),
        Pooler(hidden) if pooler else None,
    ).double().eval()


def batch(rows=2, regions=3, length=5, **fields):
    torch.manual_seed(1)
    boxes = torch.tensor([[0.0, 0.0, 9.0, 9.0], [1.0, 1.0, 5.0, 5.0], [2.0, 3.0, 8.0, 9.0]], dtype=torch.float64)[:regions]
    return VLBatch(
        text_ids=torch.randint(5, 20, (rows, length)),
        segment_ids=torch.zeros(rows, length, dtype=torch.long),
        text_mask=torch.ones(rows, length, dtype=torch.bool),
        boxes=boxes.expand(rows, -1, -1).clone(),
        region_mask=torch.ones(rows, regions, dtype=torch.bool),
        image_sizes=torch.full((rows, 2), 10.0, dtype=torch.float64),
        region_features=torch.randn(rows // fields.get("rows_per_image", 1), regions, 8, dtype=torch.float64),
        **fields,
    )


def test_vqa_task_reads_the_answer_slot_state():
    task = VQATask(tiny_vlbert(), AnswerHead(16, 4, dropout=0.0).double(), init_classifier_from_words=False).eval()
    data = batch(answer_positions=torch.tensor([3, 1]), answer_scores=torch.tensor([[0, 1.0, 0, 0], [0.3, 0, 0, 0]], dtype=torch.float64))
    output = task(data)
    states = task.vlbert(data).text_states
    expected = task.head(torch.stack([states[0, 3], states[1, 1]]))
    torch.testing.assert_close(output.model_output, expected)
    assert output.metrics["vqa/count"] == 2.0
    assert math.isclose(output.loss.item(), vqa_loss(expected, data.answer_scores).item(), rel_tol=1e-6)


def test_grounding_task_accuracy_reads_the_label_of_the_best_region():
    task = ReferringExpressionTask(tiny_vlbert(), RegionScoreHead(16, 1).double()).eval()
    data = batch(region_labels=torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64))
    output = task(data)
    picked = output.model_output.argmax(-1)
    expected = sum(data.region_labels[b, picked[b]].item() for b in range(2)) / 2
    assert output.metrics["refcoco/accuracy"] == expected


def test_vcr_task_groups_rows_by_question_and_adds_the_region_loss():
    task = VCRTask(tiny_vlbert(pooler=True), ChoiceHead(16, dropout=0.0).double(), RegionScoreHead(16, 5, xavier=False).double()).eval()
    labels = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    data = batch(rows=8, rows_per_image=4, choice_labels=labels, region_classes=torch.tensor([[0, 1, 3]] * 8))
    output = task(data)
    assert output.model_output.shape == (2, 4)
    right = (output.model_output.argmax(-1) == torch.tensor([1, 3])).double().mean().item()
    assert output.metrics["vcr/accuracy"] == right and output.metrics["vcr/count"] == 2.0
    core = task.vlbert(data)
    expected = choice_loss(task.head(core.pooled), labels) + region_class_loss(task.region_head(core.region_states), data.region_classes, data.region_mask)
    assert math.isclose(output.loss.item(), expected.item(), rel_tol=1e-6)
