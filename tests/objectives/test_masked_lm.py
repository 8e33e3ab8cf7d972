import torch
import torch.nn.functional as F

from vlblocks.batch import VLBatch
from vlblocks.objectives.masked_lm import MaskedLanguageModeling

MASK, VOCAB = 4, 50


def text_batch(rows=64, words=40, pieces_per_word=2):
    length = words * pieces_per_word + 2
    word_index = torch.full((rows, length), -1)
    word_index[:, 1:-1] = torch.arange(words).repeat_interleave(pieces_per_word)
    ids = torch.randint(10, VOCAB, (rows, length))
    mask = torch.ones(rows, length, dtype=torch.bool)
    mask[0, -10:] = False
    word_index[0, -10:] = -1
    return VLBatch(
        text_ids=ids, segment_ids=torch.zeros_like(ids), text_mask=mask, boxes=torch.zeros(rows, 1, 4),
        region_mask=torch.ones(rows, 1, dtype=torch.bool), image_sizes=torch.ones(rows, 2), word_index=word_index,
    )


def seeds(rows, first=0):
    return torch.arange(first, first + rows)


def test_whole_word_masking_rates_and_labels():
    batch = text_batch(rows=256)
    objective = MaskedLanguageModeling(VOCAB, MASK)
    masked = objective.mask(batch, seeds(256))
    chosen = masked.mlm_labels >= 0
    assert torch.equal(masked.mlm_positions, chosen.nonzero())
    assert torch.equal(masked.mlm_labels[chosen], batch.text_ids[chosen])
    assert not chosen[batch.word_index < 0].any(), "special tokens and padding are never chosen"
    assert torch.equal(masked.text_ids[~chosen], batch.text_ids[~chosen])
    # whole words: both pieces of a word share the decision
    pairs = chosen[1:, 1:-1].reshape(255, 40, 2)  # row 0 ends in padding that splits a word
    assert torch.equal(pairs[..., 0], pairs[..., 1])
    word_rate = pairs[..., 0].float().mean().item()
    assert abs(word_rate - 0.15) < 0.02
    became_mask = (masked.text_ids == MASK) & chosen
    unchanged = (masked.text_ids == batch.text_ids) & chosen
    total = chosen.sum().item()
    assert abs(became_mask.sum().item() / total - 0.8) < 0.04
    # random replacements can land on the original id (1 in 40 here), so "unchanged" is ~0.1 + 0.1/40
    assert abs(unchanged.sum().item() / total - 0.1025) < 0.03
    assert ((masked.text_ids != MASK) & (masked.text_ids != batch.text_ids) & chosen).sum().item() / total > 0.06


def test_masking_depends_only_on_each_samples_seed():
    batch = text_batch()
    objective = MaskedLanguageModeling(VOCAB, MASK)
    first = objective.mask(batch, seeds(64, 3))
    second = objective.mask(batch, seeds(64, 3))
    other = objective.mask(batch, seeds(64, 4))
    assert torch.equal(first.text_ids, second.text_ids) and torch.equal(first.mlm_labels, second.mlm_labels)
    assert not torch.equal(first.mlm_labels, other.mlm_labels)
    # rows 10..19 alone, with their seeds, are masked as they were inside the whole batch
    part = batch.map_tensors(lambda tensor: tensor[10:20])
    alone = objective.mask(part, seeds(64, 3)[10:20])
    assert torch.equal(alone.mlm_labels, first.mlm_labels[10:20]) and torch.equal(alone.text_ids, first.text_ids[10:20])


def test_loss_is_cross_entropy_over_masked_tokens_and_zero_when_none():
    objective = MaskedLanguageModeling(VOCAB, MASK)
    batch = objective.mask(text_batch(rows=4), seeds(4))
    labels = batch.mlm_labels[batch.mlm_labels >= 0]
    logits = torch.randn(labels.numel(), VOCAB)
    result = objective.loss(logits, batch)
    torch.testing.assert_close(result.loss, F.cross_entropy(logits, labels))
    assert result.metrics["mlm/count"] == labels.numel()
    empty = batch.replace(mlm_labels=torch.full_like(batch.mlm_labels, -1), mlm_positions=torch.zeros(0, 2, dtype=torch.long))
    result = objective.loss(torch.zeros(0, VOCAB, requires_grad=True), empty)
    assert result.loss.item() == 0.0 and result.metrics["mlm/count"] == 0.0
    result.loss.backward()  # still a graph, not NaN
