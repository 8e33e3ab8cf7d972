"""A pre-training recipe: the model plus a list of weighted objectives."""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from vlblocks.batch import VLBatch
from vlblocks.contracts import Echo
from vlblocks.models.interface import ScoredPositions, VLOutput
from vlblocks.models.pretraining import VLBertForPretraining
from vlblocks.models.task import LossTerm, Task, TaskData, TaskOutput
from vlblocks.objectives.masked_lm import MaskedLanguageModeling
from vlblocks.objectives.objective import PretrainingObjective
from vlblocks.objectives.output import ObjectiveOutput
from vlblocks.objectives.text_only import TextOnlyMaskedLM


class PretrainingTaskOutput(NamedTuple):
    """`core`: the image-text forward's `VLOutput`; `logits`: objective name → what its head
    scored (at the positions it chose; [B, 2] for matching)."""

    core: VLOutput
    logits: dict[str, Tensor]


class PretrainingTask(Task):
    """Pre-training as a list of objectives over one model. VL-BERT's: masked LM with visual
    clues, masked RoI classification with linguistic clues and masked LM on a text-only corpus;
    VisualBERT's: masked LM and image-text matching; LXMERT's: masked LM, matching, region
    masking with object, attribute and feature prediction.

    Each objective (`PretrainingObjective`) owns its masking, names the model's head it scores
    with and computes its loss; the positions it scores are decided when it masks and handed to
    the head and (through the batch) to the loss. Objectives mask in list order (list caption
    swapping first, so masked LM sees the caption a row ends up with), and their weighted losses
    add up.

    Args:
        model: `VLBertForPretraining` (any core model with its heads).
        objectives: the objectives; names must differ (they key the metrics and the state dict:
            `objectives.<name>.*`).
        scored_states_only: in training, the core model's last layer computes only the final
            states the objectives read (`VLBatch.scored_length` rows a sample, counted by
            `prepare`), the same values there as every state's computation, with less work (a
            single-stream model; a two-stream one computes every state). Evaluation, and an
            objective that reads every token or region, compute every state either way.

    Inputs:
        batch: image-text `VLBatch` masked by `prepare` (word_index, region_class_scores and
            sample_seeds filled before).
        text_batch: text-only `VLBatch` for a `TextOnlyMaskedLM` (masked by `prepare`), or None.

    Returns:
        `TaskOutput` whose `model_output` is a `PretrainingTaskOutput`; `metrics` holds every
        objective's metrics plus 'loss', the weighted sum.
    """

    pretrained_prefixes = {"": ""}  # `experiment.pretrained` continues from every tensor of a pre-training checkpoint

    def __init__(self, model: VLBertForPretraining, objectives: Sequence[PretrainingObjective] = (), scored_states_only: bool = True) -> None:
        super().__init__()
        names = [objective.name for objective in objectives]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"two objectives are named {repeated}: give each its own name")
        for objective in objectives:
            if objective.head is not None and getattr(model, objective.head, None) is None:
                raise ValueError(f"the objective {objective.name!r} scores with the model's {objective.head}, which the model does not have")
            if objective.states == "pooled" and objective.head is not None and getattr(model.vlbert, "pooler", None) is None:
                raise ValueError(f"the objective {objective.name!r} reads the pooled output, but the core model has no pooler")
        self.model = model
        self.objectives = nn.ModuleDict({objective.name: objective for objective in objectives})
        self.scored_states_only = scored_states_only

    @property
    def reads_text_only(self) -> bool:
        return bool(self._streams("text_only"))

    def find(self, kind: type) -> Optional[PretrainingObjective]:
        """The first image-text objective of class `kind` (or a subclass), or None."""
        return next((o for o in self.objectives.values() if isinstance(o, kind) and o.stream == "image_text"), None)

    def _streams(self, stream: str) -> list[PretrainingObjective]:
        return [objective for objective in self.objectives.values() if objective.stream == stream]

    def prepare(self, batch: VLBatch, text_batch: Optional[VLBatch] = None) -> tuple[VLBatch, Optional[VLBatch]]:
        """Each objective's masking, on the host (CPU tensors, before the batches go to their
        device), in list order.

        Every row draws from its own seed (`batch.sample_seeds`: run seed, epoch and sample
        index), each objective from its own stream of it, so a sample's masking depends on
        nothing but the sample: not on its batch, its process, or the other objectives'
        decisions (a dropped caption leaves its region masking as it was)."""
        if batch.sample_seeds is None:
            raise ValueError("pre-training masks each sample from its seed: the batch needs sample_seeds (BatchStream and evaluation set them)")
        for objective in self._streams("image_text"):
            batch = objective.mask(batch, batch.sample_seeds)
        if text_batch is not None:
            for objective in self._streams("text_only"):
                if text_batch.sample_seeds is None:
                    raise ValueError("the text-only batch needs sample_seeds")
                text_batch = objective.mask(text_batch, text_batch.sample_seeds)
        if self.scored_states_only:
            batch = batch.replace(scored_length=scored_length(batch, self._streams("image_text")))
            if text_batch is not None:
                text_batch = text_batch.replace(scored_length=scored_length(text_batch, self._streams("text_only")))
        return batch, text_batch

    def forward(self, batch: VLBatch, text_batch: Optional[VLBatch] = None) -> TaskOutput:
        with self.model.one_word_gradient():  # both streams' lookups and decoders: one word-table gradient
            return self._forward(batch, text_batch)

    def _forward(self, batch: VLBatch, text_batch: Optional[VLBatch]) -> TaskOutput:
        for objective in self._streams("image_text"):
            batch = objective.conceal(batch)
        if not (self.training and self.scored_states_only):  # every final state
            batch = batch.replace(scored_length=None)
            text_batch = text_batch.replace(scored_length=None) if text_batch is not None else None
        read = scored_positions(batch, self._streams("image_text"))
        core = self.model.vlbert(batch, scored=read) if read is not None else self.model.vlbert(batch)
        scored: dict[tuple[str, int], Tensor | dict[str, Tensor]] = {}  # one head pass per (head, positions)
        logits: dict[str, Tensor] = {}
        results: list[tuple[PretrainingObjective, ObjectiveOutput]] = []
        for objective in self._streams("image_text"):
            if objective.head is None:
                continue
            positions = objective.positions(batch)
            key = (objective.head, id(positions))
            if key not in scored:
                head = getattr(self.model, objective.head)
                states = objective.read_states(core)
                scored[key] = head(states, positions) if objective.states != "pooled" else head(states)
            output = scored[key]
            logits[objective.name] = output[objective.output] if isinstance(output, dict) else output
            results.append((objective, objective.loss(logits[objective.name], batch)))
        if text_batch is not None:
            results += [(objective, objective(self.model, text_batch)) for objective in self._streams("text_only")]
        total = core.text_states.new_zeros(())
        metrics: dict[str, Tensor | float] = {}
        terms: dict[str, LossTerm] = {}
        for objective, result in results:
            total = total + objective.weight * result.loss
            metrics.update(result.metrics)
            terms[objective.name] = LossTerm(result.loss, objective.weight)
        metrics["loss"] = total.detach()
        return TaskOutput(total, metrics, PretrainingTaskOutput(core, logits), terms)

    def loss_counts(self, batch: VLBatch, text_batch: Optional[VLBatch] = None) -> dict[str, float]:
        """What each objective with a loss scores in these prepared batches (tokens, regions, rows)."""
        counts = {}
        for objective in self.objectives.values():
            if objective.head is None:
                continue
            if objective.stream == "image_text":
                counts[objective.name] = objective.count(batch)
            elif text_batch is not None:
                counts[objective.name] = objective.count(text_batch)
        return counts

    def fit_to_data(self, data: TaskData, echo: Echo = print) -> None:
        """Give the masking objectives the tokenizer's vocabulary size and [MASK] id, and let the
        data fit its detector's classes to the region head's width (the demo's few classes fill
        the first columns of a wider head)."""
        tokenizer = data.tokenizer
        model_vocab = self.model.vlbert.word_embeddings.num_embeddings
        if tokenizer.vocab_size > model_vocab:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} word pieces but the model's vocabulary holds {model_vocab}")
        for objective in self.objectives.values():
            masked_lm = objective.masked_lm if isinstance(objective, TextOnlyMaskedLM) else objective
            if isinstance(masked_lm, MaskedLanguageModeling):
                masked_lm.use_vocabulary(tokenizer.vocab_size, tokenizer.mask_id)
        classes = self._detector_classes()
        if classes is not None:
            data.fit_region_classes(classes, echo)

    def _detector_classes(self) -> Optional[int]:
        """How many detector classes the model's region heads predict (the region head's, else
        the visual head's "object" output), or None without one."""
        if self.model.region_head is not None:
            return self.model.region_head.region_cls_pred.out_features
        visual_head = self.model.visual_head
        if visual_head is not None and "object" in visual_head.decoders:
            return visual_head.decoders["object"].out_features
        return None


def _distinct_positions(batch: VLBatch, objectives: Sequence[PretrainingObjective], states: str) -> Optional[list[Tensor]]:
    """The [K, 2] positions of the objectives with a head that read `states`, each tensor once;
    None when one of them reads every position (its `positions` is None)."""
    found: dict[int, Tensor] = {}
    for objective in objectives:
        if objective.head is not None and objective.states == states:
            positions = objective.positions(batch)
            if positions is None:
                return None
            found.setdefault(id(positions), positions)
    return list(found.values())


def _reads_pooled(objectives: Sequence[PretrainingObjective]) -> bool:
    return any(objective.head is not None and objective.states == "pooled" for objective in objectives)


def scored_length(batch: VLBatch, objectives: Sequence[PretrainingObjective]) -> Optional[int]:
    """On the host: the most final states one row's objectives read (tokens and regions scored,
    +1 for a pooled output), an upper bound where two objectives' positions overlap; None when
    an objective reads every token or region."""
    counts = torch.zeros(batch.batch_size, dtype=torch.long)
    for states in ("text", "regions"):
        found = _distinct_positions(batch, objectives, states)
        if found is None:
            return None
        for positions in found:
            counts += torch.bincount(positions[:, 0].cpu(), minlength=batch.batch_size)
    counts += int(_reads_pooled(objectives))
    return int(counts.max()) if batch.batch_size else 0


def scored_positions(batch: VLBatch, objectives: Sequence[PretrainingObjective]) -> Optional[ScoredPositions]:
    """What the objectives read of the core's final states (None when `prepare` did not count
    `batch.scored_length`)."""
    text, regions = (_distinct_positions(batch, objectives, states) for states in ("text", "regions"))
    if batch.scored_length is None or text is None or regions is None:
        return None
    return ScoredPositions(
        text=torch.cat(text) if text else None,
        regions=torch.cat(regions) if regions else None,
        pooled=_reads_pooled(objectives),
        per_row=batch.scored_length,
    )
