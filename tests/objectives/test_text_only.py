"""`TextOnlyMaskedLM` against the official text-only ("aux") stream of
pretrain/modules/resnet_vlbert_for_pretraining_multitask.py and common/visual_linguistic_bert.py."""

import math
import os

import numpy as np
import torch
from torch import nn

from vlblocks.app.recipes import model_from_recipe
from vlblocks.batch import VLBatch
from vlblocks.data.pipeline.collate import collate_text
from vlblocks.data.pipeline.sample import TextChunk
from vlblocks.objectives.masked_lm import MaskedLanguageModeling
from vlblocks.objectives.pretraining_task import PretrainingTask
from vlblocks.objectives.text_only import TextOnlyMaskedLM

RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "models", "vlbert_tiny.gin")
VOCAB = 1000  # vlbert_tiny's vocabulary
HIDDEN = 64


def tiny_model():
    torch.manual_seed(0)
    model = model_from_recipe(RECIPE)
    model.eval()  # no dropout: the checks below compare exact tensors
    return model


def text_batch() -> VLBatch:
    """Two corpus samples of 3 and 2 pieces (as `TextCorpusChunks` gives them: no [CLS]/[SEP])."""
    chunks = [TextChunk(np.array([21, 22, 23]), np.array([0, 1, 1]), 0), TextChunk(np.array([31, 32]), np.array([0, 1]), 1)]
    return collate_text(chunks).replace(sample_seeds=torch.tensor([5, 6]))


def masked(batch: VLBatch) -> VLBatch:
    """Masked by hand: row 0 piece 1 (label 22), row 1 pieces 0 and 1 (labels 31, 32)."""
    labels = torch.full_like(batch.text_ids, -1)
    labels[0, 1], labels[1, 0], labels[1, 1] = 22, 31, 32
    ids = batch.text_ids.clone()
    ids[labels >= 0] = 4
    return batch.replace(text_ids=ids, mlm_labels=labels, mlm_positions=(labels >= 0).nonzero())


def test_text_rows_use_the_aux_visual_embedding_segment_0_and_end_after_the_text():
    model = tiny_model()
    objective = TextOnlyMaskedLM(MaskedLanguageModeling(VOCAB, 4, name="mlm_text"), visual_size=HIDDEN)
    seen = {}

    def record(module, inputs, output):
        seen["inputs"], seen["output"] = inputs, output

    model.vlbert.embedding.register_forward_hook(record)
    objective(model, masked(text_batch()))
    text_ids, segment_ids, text_mask, text_visual, region_visual, region_mask = seen["inputs"][:6]
    # official line 177: every text-only token's visual input is aux_text_visual_embedding.weight[0]
    aux = objective.aux_text_visual_embedding.weight[0]
    assert text_visual.shape == (2, 3, HIDDEN) and torch.equal(text_visual[0, 2], aux) and torch.equal(text_visual[1, 0], aux)
    # official lines 168-181: token type 0, no regions (box_mask all False)
    assert segment_ids.tolist() == [[0, 0, 0], [0, 0, 0]]
    assert region_visual.shape == (2, 0, HIDDEN) and region_mask.shape == (2, 0)
    # visual_linguistic_bert.embedding with 0 objects: text at 0..n-1, [END] at slot n with
    # position n + 1 and token type 2; row 0 (n=3): positions 0 1 2 4; row 1 (n=2): 0 1 3, pad slot 3
    output = seen["output"]
    assert output.position_ids[0].tolist() == [0, 1, 2, 4] and output.position_ids[1, :3].tolist() == [0, 1, 3]
    assert output.segment_ids[0].tolist() == [0, 0, 0, 2] and output.segment_ids[1, :3].tolist() == [0, 0, 2]
    assert output.attention_mask.tolist() == [[True] * 4, [True, True, True, False]]


class FixedLogits(nn.Module):
    """An MLM head whose logit for the label of masked piece k is ln(m_k), 0 elsewhere."""

    def __init__(self, labels, m):
        super().__init__()
        self.labels, self.m = labels, m
        self.calls = []

    def forward(self, states, positions):
        self.calls.append((states.shape, positions.tolist()))
        logits = torch.zeros(len(self.labels), VOCAB)
        logits[torch.arange(len(self.labels)), torch.tensor(self.labels)] = torch.log(torch.tensor(self.m))
        return logits + 0 * states.sum()


def test_loss_is_the_mean_over_all_masked_pieces_of_the_batch():
    # MLM_LOSS_NORM_IN_BATCH_FIRST false (all configs): cross-entropy averaged over every masked
    # piece of the text-only batch. With logit ln(m) at the label and 0 at the other 999 ids,
    # CE = ln((m + 999) / m): m = 1 -> ln 1000 = 6.907755, m = 999 -> ln 2 = 0.693147,
    # m = 2997 -> ln(3996 / 2997) = 0.287682; mean = 7.888584 / 3 = 2.629528
    # (normalised per row first it would be (6.907755 + 0.490415) / 2 = 3.699085).
    model = tiny_model()
    model.mlm_head = FixedLogits([22, 31, 32], [1.0, 999.0, 2997.0])
    objective = TextOnlyMaskedLM(MaskedLanguageModeling(VOCAB, 4, name="mlm_text"), visual_size=HIDDEN)
    result = objective(model, masked(text_batch()))
    assert math.isclose(result.loss.item(), 2.629528, abs_tol=2e-6)
    assert result.metrics["mlm_text/count"] == 3.0
    # the head sees the text states [B, L, H] and the masked pieces' positions
    assert model.mlm_head.calls == [(torch.Size([2, 3, HIDDEN]), [[0, 1], [1, 0], [1, 1]])]


def image_text_batch(rows=2, length=5, regions=3):
    torch.manual_seed(1)
    corners = torch.rand(rows, regions, 2) * 30
    scores = torch.softmax(torch.randn(rows, regions, 16), -1)
    return VLBatch(
        text_ids=torch.randint(5, 100, (rows, length)), segment_ids=torch.zeros(rows, length, dtype=torch.long),
        text_mask=torch.ones(rows, length, dtype=torch.bool), boxes=torch.cat([corners, corners + 20], -1),
        region_mask=torch.ones(rows, regions, dtype=torch.bool), image_sizes=torch.full((rows, 2), 64.0),
        images=torch.randn(rows, 3, 64, 64), word_index=torch.tensor([[-1, 0, 1, 2, -1]] * rows), region_class_scores=scores,
        sample_seeds=torch.arange(rows),
    )


def test_task_adds_the_text_only_loss_with_weight_one_and_trains_the_aux_embedding():
    # official line 288: loss = relationship + mlm_wvc + mlm_aux + mvrc, every weight 1
    model = tiny_model()
    text_only = TextOnlyMaskedLM(MaskedLanguageModeling(VOCAB, 4, probability=0.9, name="mlm_text"), visual_size=HIDDEN)
    task = PretrainingTask(model, [MaskedLanguageModeling(VOCAB, 4, probability=0.9), text_only])
    assert text_only.weight == 1.0
    batch, texts = task.prepare(image_text_batch(), text_batch())
    assert (texts.mlm_labels >= 0).any() and texts.mlm_positions.shape[0] == int((texts.mlm_labels >= 0).sum())
    output = task(batch, texts)
    assert math.isclose(float(output.metrics["loss"]), float(output.metrics["mlm/loss"]) + float(output.metrics["mlm_text/loss"]), rel_tol=1e-6)
    output.loss.backward()
    # the aux vector reaches the loss through the text visual LayerNorm (visual_ln_text), whose
    # weight starts at VISUAL_SCALE_TEXT_INIT = 0: that weight gets a gradient from the text-only
    # rows, the aux vector none until the weight moves off 0 (as in the official model)
    visual_ln = model.vlbert.embedding.visual_text.LayerNorm
    assert visual_ln.weight.abs().sum() == 0 and visual_ln.weight.grad.abs().sum() > 0
    assert text_only.aux_text_visual_embedding.weight.grad.abs().sum() == 0
    with torch.no_grad():
        visual_ln.weight.fill_(1.0)
    task.zero_grad()
    task(batch, texts).loss.backward()
    assert text_only.aux_text_visual_embedding.weight.grad.abs().sum() > 0
