"""Fine-tuning losses against float64 references written from the official equations."""

import math

import torch

from vlblocks.batch import VLBatch
from vlblocks.blocks.embeddings import VLEmbedding
from vlblocks.blocks.encoder import Pooler, TransformerEncoder
from vlblocks.blocks.geometry import RegionGeometryEmbedding
from vlblocks.blocks.region_features import PrecomputedRegionFeatures
from vlblocks.blocks.task_heads import AnswerHead
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
    ln3 = math.log(3)
    logits = torch.tensor([[0.0, ln3, -ln3], [ln3, 0.0, -ln3]], dtype=torch.float64)
    scores = torch.tensor([[0.3, 1.0, 0.0], [0.0, 0.6, 0.3]], dtype=torch.float64)
    # sigmoid(0) = 1/2, sigmoid(ln 3) = 3/4, sigmoid(-ln 3) = 1/4, so the six BCE terms are
    # ln 2, ln 4/3, ln 4/3 | ln 4, ln 2, 0.3 ln 4 + 0.7 ln 4/3: sum 4.6 ln 2 + 2.7 ln 4/3.
    # VL-BERT: mean over the 6 entries x 3 answers = sum / 2 = 2.3 ln 2 + 1.35 ln 4/3 = 1.98260931...
    assert math.isclose(vqa_loss(logits, scores).item(), 1.9826093130977782, rel_tol=1e-6)  # computed in float32
    # argmax answers 1 and 0: their soft scores 1.0 and 0.0
    assert vqa_score(logits, scores).tolist() == [1.0, 0.0]


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
    # the loss from the test's own BCE reference: mean over the 2 x 4 entries, times 4 answers
    reference = sum(bce(expected[b, a].item(), data.answer_scores[b, a].item()) for b in range(2) for a in range(4)) / 8 * 4
    assert math.isclose(output.loss.item(), reference, rel_tol=1e-6)
    # rows of equal scores: whatever answer wins, the accuracies are 0.6 and 0.3, mean 0.45
    uniform = batch(answer_positions=torch.tensor([3, 1]), answer_scores=torch.tensor([[0.6] * 4, [0.3] * 4], dtype=torch.float64))
    assert math.isclose(task(uniform).metrics["vqa/accuracy"].item(), 0.45, rel_tol=1e-9)


class FixedRegionScores(torch.nn.Module):
    """Stands in for the region head: the same [2, 3] scores whatever the states."""

    def forward(self, hidden):
        return torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.5, 9.0]], dtype=torch.float64)


def test_grounding_task_accuracy_reads_the_label_of_the_best_region():
    # Official RefAccuracy: label[argmax logit] > 0.5, with padded regions at -10000. Row 0 picks
    # region 1 (2.0), label 0; row 1 picks region 0 (3.0), label 1, because region 2 (9.0) is
    # padding: accuracy 1 / 2 (0 / 2 if padding could win).
    task = ReferringExpressionTask(tiny_vlbert(), FixedRegionScores()).eval()
    data = batch(region_labels=torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64))
    data.region_mask[1, 2] = False
    output = task(data)
    assert output.metrics["refcoco/accuracy"] == 0.5
    assert output.metrics["refcoco/count"] == 2.0
    # BCE = softplus(x) - t x over the 5 valid regions: softplus(0.1) = 0.7443967,
    # softplus(2.0) = 2.1269280, softplus(-1.0) + 1 = 1.3132617, softplus(3.0) - 3 = 0.0485874,
    # softplus(0.5) = 0.9740770; mean 5.2072507 / 5 = 1.0414501.
    assert math.isclose(output.loss.item(), 1.0414501, rel_tol=1e-6)


class FixedChoiceScores(torch.nn.Module):
    """Stands in for the choice head: fixed logits for 8 rows (2 questions x 4 choices)."""

    def forward(self, pooled):
        return torch.tensor([0.0, 2.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)


class ZeroRegionClassScores(torch.nn.Module):
    """Stands in for the region class head: 5 equal class logits for every region."""

    def forward(self, states):
        return torch.zeros(*states.shape[:2], 5, dtype=torch.float64)


def test_vcr_task_groups_rows_by_question_and_adds_the_region_loss():
    task = VCRTask(tiny_vlbert(pooler=True), FixedChoiceScores(), ZeroRegionClassScores()).eval()
    labels = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    data = batch(rows=8, rows_per_image=4, choice_labels=labels, region_classes=torch.tensor([[0, 1, 3]] * 8))
    output = task(data)
    assert output.model_output.shape == (2, 4)
    # Question 0 picks choice 1 (2.0), right; question 1 picks choice 0 (1.0), label 3: 1 / 2.
    assert output.metrics["vcr/accuracy"] == 0.5 and output.metrics["vcr/count"] == 2.0
    # Choice BCE, softplus(x) - t x: six rows at x = 0 give ln 2 = 0.6931472 each (t = 1 too),
    # row 1 softplus(2) - 2 = 0.1269280, row 4 softplus(1) = 1.3132617: 5.5990728 / 8 = 0.6998841.
    assert math.isclose(output.metrics["vcr/loss"].item(), 0.6998841, rel_tol=1e-6)
    # Region cross-entropy over 5 equal logits: ln 5 = 1.6094379 per valid region; weight 1.
    assert math.isclose(output.metrics["vcr_regions/loss"].item(), 1.6094379, rel_tol=1e-6)
    assert math.isclose(output.loss.item(), 0.6998841 + 1.6094379, rel_tol=1e-6)
