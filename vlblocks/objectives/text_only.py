"""The text-only corpus stream: masked LM on plain text, with a learned stand-in visual feature."""

from __future__ import annotations

from torch import Tensor, nn

from vlblocks.batch import VLBatch
from vlblocks.models.interface import ScoredPositions
from vlblocks.models.pretraining import VLBertForPretraining
from vlblocks.objectives.masked_lm import MaskedLanguageModeling
from vlblocks.objectives.objective import PretrainingObjective
from vlblocks.objectives.output import ObjectiveOutput


class TextOnlyMaskedLM(PretrainingObjective):
    """VL-BERT's `mlm_loss_aux`: whole-word masked LM on 64-piece corpus samples (no [CLS]/[SEP],
    no regions, so each row packs as `text [END]`: segment 0, [END] at position length + 1,
    segment 2). Every token's visual term is the learned `aux_text_visual_embedding`, which
    passes through the model's text visual LayerNorm. The loss is the mean over the batch's
    masked pieces, added to the total with weight 1 (official MLM_LOSS_NORM_IN_BATCH_FIRST
    false; pretrain/modules/resnet_vlbert_for_pretraining_multitask.py).

    Args:
        masked_lm: the masking and loss (use its own `name`, e.g. "mlm_text").
        visual_size: size of the visual vectors the model's embedding takes.
        weight: factor of this loss in the total.

    `mask(batch, seeds)` masks a text-only `VLBatch` on the host (see `MaskedLanguageModeling`);
    `PretrainingTask` gives it the text-only batch (`stream = "text_only"`), which it encodes
    itself through the model interface (`encode`).

    Inputs: model, a masked text-only `VLBatch` (zero regions).
    Returns: `ObjectiveOutput`.
    """

    head = "mlm_head"
    stream = "text_only"

    def __init__(self, masked_lm: MaskedLanguageModeling, visual_size: int, weight: float = 1.0) -> None:
        super().__init__()
        self.masked_lm = masked_lm
        self.aux_text_visual_embedding = nn.Embedding(1, visual_size)
        nn.init.normal_(self.aux_text_visual_embedding.weight, std=0.02)
        self.weight = weight
        self.name = masked_lm.name

    def positions(self, batch: VLBatch) -> Tensor:
        return batch.mlm_positions

    def mask(self, batch: VLBatch, seeds: Tensor) -> VLBatch:
        return self.masked_lm.mask(batch, seeds)

    def forward(self, model: VLBertForPretraining, batch: VLBatch) -> ObjectiveOutput:
        visual = self.aux_text_visual_embedding.weight[0]
        text_visual = visual.expand(*batch.text_ids.shape, -1)
        no_regions = visual.new_zeros(batch.batch_size, 0, visual.shape[0])
        text_batch = batch.replace(region_mask=batch.region_mask[:, :0])
        if self.training and batch.scored_length is not None:  # counted by `PretrainingTask.prepare`, kept in training
            scored = ScoredPositions(text=batch.mlm_positions, regions=None, pooled=False, per_row=batch.scored_length)
            core = model.vlbert.encode(text_batch, no_regions, text_visual, scored=scored)
        else:
            core = model.vlbert.encode(text_batch, no_regions, text_visual)
        logits = model.mlm_head(core.text_states, batch.mlm_positions)
        return self.masked_lm.loss(logits, batch)
