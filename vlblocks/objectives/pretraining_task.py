"""A pre-training recipe: the model plus a list of weighted objectives."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from vlblocks.batch import VLBatch
from vlblocks.contracts import Echo
from vlblocks.models.pretraining import VLBertForPretraining
from vlblocks.models.task import LossTerm, Task, TaskData, TaskOutput
from vlblocks.objectives.masked_lm import MaskedLanguageModeling
from vlblocks.objectives.masked_region import MaskedRegionClassification
from vlblocks.objectives.relation import CaptionImageRelation
from vlblocks.objectives.text_only import TextOnlyMaskedLM


class PretrainingTask(Task):
    """VL-BERT pre-training: masked LM with visual clues + masked RoI classification with
    linguistic clues (+ the text-only stream, + caption-image relation for ablations).

    Args:
        model: `VLBertForPretraining`.
        masked_lm, masked_region, relation, text_only: the objectives; None turns one off.

    Inputs:
        batch: image-text `VLBatch` masked by `prepare` (word_index, region_class_scores and
            sample_seeds filled before).
        text_batch: text-only `VLBatch` for `text_only` (masked by `prepare`), or None.

    Returns:
        `TaskOutput` whose `model_output` is the image-text forward's `PretrainingOutput`;
        `metrics` holds every objective's metrics plus 'loss', the weighted sum.
    """

    pretrained_prefixes = {"": ""}  # `experiment.pretrained` continues from every tensor of a pre-training checkpoint

    def __init__(
        self,
        model: VLBertForPretraining,
        masked_lm: Optional[MaskedLanguageModeling] = None,
        masked_region: Optional[MaskedRegionClassification] = None,
        relation: Optional[CaptionImageRelation] = None,
        text_only: Optional[TextOnlyMaskedLM] = None,
    ) -> None:
        super().__init__()
        if relation is not None and model.relation_head is None:
            raise ValueError("the relation objective needs a model with a relation head (and a pooler)")
        self.model = model
        self.masked_lm = masked_lm
        self.masked_region = masked_region
        self.relation = relation
        self.text_only = text_only

    def prepare(self, batch: VLBatch, text_batch: Optional[VLBatch] = None) -> tuple[VLBatch, Optional[VLBatch]]:
        """Each objective's masking, on the host (CPU tensors, before the batches go to their
        device), relation first (it swaps captions).

        Every row draws from its own seed (`batch.sample_seeds`: run seed, epoch and sample
        index), each objective from its own stream of it, so a sample's masking depends on
        nothing but the sample: not on its batch, its process, or the other objectives'
        decisions (a dropped caption leaves its region masking as it was)."""
        if batch.sample_seeds is None:
            raise ValueError("pre-training masks each sample from its seed: the batch needs sample_seeds (BatchStream and evaluation set them)")
        for objective in (self.relation, self.masked_lm, self.masked_region):
            if objective is not None:
                batch = objective.mask(batch, batch.sample_seeds)
        if self.text_only is not None and text_batch is not None:
            if text_batch.sample_seeds is None:
                raise ValueError("the text-only batch needs sample_seeds")
            text_batch = self.text_only.mask(text_batch, text_batch.sample_seeds)
        return batch, text_batch

    def forward(self, batch: VLBatch, text_batch: Optional[VLBatch] = None) -> TaskOutput:
        if self.masked_region is not None:
            batch = self.masked_region.conceal(batch)
        output = self.model(batch)
        total = output.core.text_states.new_zeros(())
        metrics: dict[str, Tensor | float] = {}
        terms: dict[str, LossTerm] = {}
        for objective, logits in (
            (self.masked_lm, output.mlm_logits),
            (self.masked_region, output.region_logits),
            (self.relation, output.relation_logits),
        ):
            if objective is not None:
                result = objective.loss(logits, batch)
                total = total + objective.weight * result.loss
                metrics.update(result.metrics)
                terms[objective.name] = LossTerm(result.loss, objective.weight)
        if self.text_only is not None and text_batch is not None:
            result = self.text_only(self.model, text_batch)
            total = total + self.text_only.weight * result.loss
            metrics.update(result.metrics)
            terms[self.text_only.masked_lm.name] = LossTerm(result.loss, self.text_only.weight)
        metrics["loss"] = total.detach()
        return TaskOutput(total, metrics, output, terms)

    def loss_counts(self, batch: VLBatch, text_batch: Optional[VLBatch] = None) -> dict[str, float]:
        """Masked tokens, scored regions and rows (relation) of these prepared batches."""
        counts = {}
        if self.masked_lm is not None:
            counts[self.masked_lm.name] = float(batch.mlm_positions.shape[0])
        if self.masked_region is not None:
            counts[self.masked_region.name] = float(batch.region_positions.shape[0])
        if self.relation is not None:
            counts[self.relation.name] = float(batch.batch_size)
        if self.text_only is not None and text_batch is not None:
            counts[self.text_only.masked_lm.name] = float(text_batch.mlm_positions.shape[0])
        return counts

    def fit_to_data(self, data: TaskData, echo: Echo = print) -> None:
        """Give the masking objectives the tokenizer's vocabulary size and [MASK] id, and let the
        data fit its detector's classes to the region head's width (the demo's few classes fill
        the first columns of a wider head)."""
        tokenizer = data.tokenizer
        model_vocab = self.model.vlbert.word_embeddings.num_embeddings
        if tokenizer.vocab_size > model_vocab:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} word pieces but the model's vocabulary holds {model_vocab}")
        for objective in (self.masked_lm, self.text_only.masked_lm if self.text_only is not None else None):
            if objective is not None:
                objective.use_vocabulary(tokenizer.vocab_size, tokenizer.mask_id)
        if self.model.region_head is not None:
            data.fit_region_classes(self.model.region_head.region_cls_pred.out_features, echo)
