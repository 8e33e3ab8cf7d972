import contextlib

import numpy as np
import torch

from vlblocks.batch import VLBatch
from vlblocks.data.pipeline.collate import collate_text
from vlblocks.data.pipeline.sample import TextChunk
from vlblocks.models.pretraining import VLBertForPretraining
from vlblocks.objectives.masked_lm import MaskedLanguageModeling
from vlblocks.objectives.relation import CaptionImageRelation
from vlblocks.objectives.text_only import TextOnlyMaskedLM


def test_relation_swaps_captions_and_labels_them():
    ids = torch.arange(8 * 3).view(8, 3)
    batch = VLBatch(
        text_ids=ids, segment_ids=torch.zeros_like(ids), text_mask=torch.ones(8, 3, dtype=torch.bool),
        boxes=torch.zeros(8, 1, 4), region_mask=torch.ones(8, 1, dtype=torch.bool), image_sizes=torch.ones(8, 2),
        word_index=ids.clone(),
    )
    out = CaptionImageRelation(probability=0.5).mask(batch, torch.arange(8))
    matched = out.relation_labels == 1
    assert 0 < matched.sum() < 8
    assert torch.equal(out.text_ids[matched], ids[matched])
    assert torch.equal(out.text_ids[~matched], ids.roll(-1, 0)[~matched])
    assert torch.equal(out.word_index, out.text_ids)


def image_text_batch(rows=6, length=8, regions=4):
    torch.manual_seed(0)
    word_index = torch.arange(length).repeat(rows, 1) - 1
    word_index[:, -1] = -1
    scores = torch.softmax(torch.randn(rows, regions, 16), -1)
    scores[:, 0] = 0
    corners = torch.rand(rows, regions, 2) * 30
    return VLBatch(
        text_ids=torch.randint(5, 100, (rows, length)), segment_ids=torch.zeros(rows, length, dtype=torch.long),
        text_mask=torch.ones(rows, length, dtype=torch.bool), boxes=torch.cat([corners, corners + 20], -1),
        region_mask=torch.ones(rows, regions, dtype=torch.bool), image_sizes=torch.full((rows, 2), 64.0),
        images=torch.randn(rows, 3, 64, 64), word_index=word_index, region_class_scores=scores,
        sample_seeds=torch.arange(rows) + 100,
    )


def tiny_task():
    import os

    from vlblocks.app.recipes import model_from_recipe
    from vlblocks.objectives.masked_region import MaskedRegionClassification
    from vlblocks.objectives.pretraining_task import PretrainingTask

    recipe = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "models", "vlbert_tiny.gin")
    return PretrainingTask(model_from_recipe(recipe), [MaskedLanguageModeling(100, 3, probability=0.5), MaskedRegionClassification(probability=0.5)])


def test_task_sums_weighted_losses_and_backpropagates():
    task = tiny_task()
    batch, _ = task.prepare(image_text_batch())
    output = task(batch)
    assert {"mlm/loss", "mvrc/loss", "loss"} <= set(output.metrics)
    assert abs(output.metrics["loss"] - output.metrics["mlm/loss"] - output.metrics["mvrc/loss"]) < 1e-4
    output.loss.backward()
    assert task.model.vlbert.region_features.backbone.layers[0].weight.grad is not None


def test_each_objective_draws_from_its_own_generator():
    task = tiny_task()
    batch = image_text_batch()
    no_caption = batch.replace(word_index=torch.full_like(batch.word_index, -1))
    first, _ = task.prepare(batch)
    second, _ = task.prepare(no_caption)
    assert (first.mlm_labels >= 0).any() and not (second.mlm_labels >= 0).any()
    assert torch.equal(first.masked_regions, second.masked_regions), "region masking must not shift with the caption"


def test_relation_objective_runs_through_the_pooler_for_ablations():
    import os

    from vlblocks.app.recipes import model_from_recipe
    from vlblocks.objectives.pretraining_task import PretrainingTask

    recipe = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "models", "vlbert_tiny.gin")
    model = model_from_recipe(recipe, ["VLBert.pooler = @Pooler()", "VLBertForPretraining.relation_head = @RelationHead()"])
    task = PretrainingTask(model, [CaptionImageRelation()])
    output = task(task.prepare(image_text_batch())[0])
    assert set(output.metrics) == {"relation/loss", "relation/accuracy", "loss"}
    output.loss.backward()
    assert model.relation_head.classifier.weight.grad is not None



def to_double(batch):
    return batch.map_tensors(lambda tensor: tensor.double() if tensor.is_floating_point() else tensor)


def test_both_streams_give_the_word_table_the_gradient_autograd_gives_it(monkeypatch):
    """The task's forward shares one word-table gradient between the image-text and text-only
    lookups and the tied decoder (`WordEmbedding.one_gradient`); in float64 every gradient is
    the one plain autograd gives, to rounding."""
    chunks = [TextChunk(np.arange(10, 10 + n), np.zeros(n, dtype=np.int64), row) for row, n in enumerate((7, 5, 6))]
    text = collate_text(chunks).replace(sample_seeds=torch.tensor([7, 8, 9]))

    def gradients() -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        task = tiny_task()
        task.objectives["mlm_text"] = TextOnlyMaskedLM(MaskedLanguageModeling(100, 3, probability=0.5, name="mlm_text"), visual_size=64)
        task.double().eval()  # no dropout: both passes run the same network
        batch, text_batch = task.prepare(image_text_batch(), text)
        output = task(to_double(batch), to_double(text_batch))
        assert {"mlm/loss", "mvrc/loss", "mlm_text/loss"} <= set(output.metrics)
        output.loss.backward()
        return {name: parameter.grad for name, parameter in task.named_parameters() if parameter.grad is not None}

    shared = gradients()
    monkeypatch.setattr(VLBertForPretraining, "one_word_gradient", lambda self: contextlib.nullcontext())
    plain = gradients()
    assert shared.keys() == plain.keys() and "model.vlbert.embedding.word_embeddings.weight" in shared
    for name, gradient in plain.items():
        torch.testing.assert_close(shared[name], gradient, rtol=1e-12, atol=1e-14, msg=name)


def test_training_computes_only_the_scored_final_states_with_the_same_losses_and_gradients():
    """`PretrainingTask.scored_states_only`: in training, the last layer computes the masked
    words, masked regions and [CLS] (the relation head's pooled output) of each row, and the
    text-only stream its masked words; losses and every gradient equal those of computing every
    state (float64, dropout 0, so both passes run the same network)."""
    import os

    from vlblocks.app.recipes import model_from_recipe
    from vlblocks.objectives.masked_region import MaskedRegionClassification
    from vlblocks.objectives.pretraining_task import PretrainingTask

    recipe = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "models", "vlbert_tiny.gin")
    chunks = [TextChunk(np.arange(10, 10 + n), np.zeros(n, dtype=np.int64), row) for row, n in enumerate((7, 5, 6))]
    text = collate_text(chunks).replace(sample_seeds=torch.tensor([7, 8, 9]))

    def run(scored_states_only: bool):
        torch.manual_seed(0)
        model = model_from_recipe(recipe, ["VLBert.pooler = @Pooler()", "VLBertForPretraining.relation_head = @RelationHead()"])
        objectives = [
            CaptionImageRelation(),
            MaskedLanguageModeling(100, 3, probability=0.3),
            MaskedRegionClassification(probability=0.3),
            TextOnlyMaskedLM(MaskedLanguageModeling(100, 3, probability=0.5, name="mlm_text"), visual_size=64),
        ]
        task = PretrainingTask(model, objectives, scored_states_only=scored_states_only).double().train()
        for module in task.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            if hasattr(module, "dropout_p"):
                module.dropout_p = 0.0
        batch, text_batch = task.prepare(image_text_batch(), text)
        output = task(to_double(batch), to_double(text_batch))
        output.loss.backward()
        gradients = {name: parameter.grad for name, parameter in task.named_parameters() if parameter.grad is not None}
        return batch, text_batch, output, gradients

    batch, text_batch, fast, fast_gradients = run(True)
    _, _, full, full_gradients = run(False)
    per_row = torch.bincount(batch.mlm_positions[:, 0], minlength=6) + torch.bincount(batch.region_positions[:, 0], minlength=6) + 1
    assert batch.scored_length == int(per_row.max()) < batch.packed_length()
    assert text_batch.scored_length == int(torch.bincount(text_batch.mlm_positions[:, 0]).max())
    computed = (fast.model_output.core.sequence_states != 0).any(-1)
    assert computed.sum(1).max() <= batch.scored_length, "the last layer computed more rows than the objectives read"
    assert computed[:, 0].all(), "[CLS], read by the pooler, must be computed"
    assert {"relation/loss", "mlm/loss", "mvrc/loss", "mlm_text/loss"} <= set(fast.metrics)
    for name, value in full.metrics.items():
        torch.testing.assert_close(fast.metrics[name], value, rtol=1e-12, atol=1e-14, msg=name)
    assert fast_gradients.keys() == full_gradients.keys()
    for name, gradient in full_gradients.items():
        torch.testing.assert_close(fast_gradients[name], gradient, rtol=1e-10, atol=1e-13, msg=name)


def test_the_count_is_off_when_an_objective_reads_every_token_and_a_batch_with_nothing_scored_computes_one_row():
    from vlblocks.models.interface import ScoredPositions
    from vlblocks.models.vlbert import scored_slots
    from vlblocks.objectives.objective import PretrainingObjective
    from vlblocks.objectives.pretraining_task import scored_length, scored_positions

    class EveryToken(PretrainingObjective):
        head = "mlm_head"

    batch = image_text_batch()
    assert scored_length(batch, [EveryToken()]) is None
    assert scored_positions(batch.replace(scored_length=3), [EveryToken()]) is None
    masked = MaskedLanguageModeling(100, 3, probability=0.5)
    assert scored_length(batch, [masked, EveryToken()]) is None

    text_slots = torch.tensor([[0, 1, 2], [0, 1, -1]])
    region_slots = torch.tensor([[3, 4], [2, 3]])
    nothing = ScoredPositions(text=torch.zeros(0, 2, dtype=torch.long), regions=None, pooled=False, per_row=0)
    assert scored_slots(nothing, text_slots, region_slots, 6).shape == (2, 1), "attention kernels may refuse empty queries"
    some = ScoredPositions(text=torch.tensor([[0, 2], [1, 1]]), regions=torch.tensor([[0, 0], [1, 1]]), pooled=True, per_row=3)
    assert scored_slots(some, text_slots, region_slots, 6).tolist() == [[0, 2, 3], [0, 1, 3]]
