"""The protocol every trainable task follows (pre-training and each fine-tuning task), written as
the base class `Task`, and `TaskData`, what a task may ask of its data.

A task is an `nn.Module` that the trainer calls on batches and the run code fits to its data and
starts from a pre-trained checkpoint. `PretrainingTask` (in `vlblocks.objectives`), `VQATask`,
`VCRTask` and `ReferringExpressionTask` follow it; a new task subclasses `Task` and the trainer,
evaluation and `vlblocks train` / `eval` run it unchanged.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple, Optional, Protocol, Sequence

from torch import Tensor, nn

from vlblocks.batch import VLBatch
from vlblocks.contracts import Echo, Tokenizer


class LossTerm(NamedTuple):
    """One term of a task's loss: its `mean` over the elements `Task.loss_counts` counts for the
    batch (masked tokens, scored regions, rows), and its `weight` in the total."""

    mean: Tensor
    weight: float = 1.0


class TaskOutput(NamedTuple):
    """What a task returns for one batch.

    Attributes:
        loss: scalar tensor to minimise (0 with no targets in the batch).
        metrics: keyed by '<name>/<metric>' (loss, accuracy, count) plus 'loss': detached
            0-d tensors on the device, or floats known on the host (counts), so nothing waits
            for the device; empty when the batch has no targets.
        model_output: the task's predictions (e.g. `PretrainingOutput`, VQA's [B, A] logits).
        terms: `loss` term by term, named as in `Task.loss_counts` (None for a task without).
    """

    loss: Tensor
    metrics: dict[str, Tensor | float]
    model_output: Any
    terms: Optional[dict[str, LossTerm]] = None


class TaskData(Protocol):
    """What a task may read from its data when fitting to it (the data column's `RunData`)."""

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def answers(self) -> Optional[Sequence[str]]: ...

    def fit_region_classes(self, columns: int, echo: Echo) -> None:
        """Widen the detector's class distributions to a region head of `columns` classes where
        the data allows it (the demo's); otherwise leave them as they are."""
        ...


class Task(nn.Module):
    """Base of every task: a model, its heads and its loss, trained by `vlblocks.train.Trainer`.

    Subclasses define `forward` and, when they need to, `fit_to_data` and `pretrained_prefixes`.

    Attributes:
        pretrained_prefixes: how `experiment.pretrained` (a vlblocks pre-training checkpoint)
            maps onto this task: checkpoint key prefix → this task's prefix, e.g.
            {"model.vlbert.": "vlbert."}; keys under no prefix are left out on purpose.

    `prepare(batch, text_batch)` runs first, on the host (CPU tensors, before the batches go
    to the model's device): a task decides there what depends on data (pre-training's
    masking), so the forward pass on the device never waits for it.

    Inputs:
        batch: `VLBatch` from `prepare` (with the task's targets for a loss).
        text_batch: a text-only `VLBatch` for tasks with a text-only stream, else ignored.

    Returns:
        `TaskOutput`.
    """

    pretrained_prefixes: ClassVar[dict[str, str]] = {}

    @property
    def reads_text_only(self) -> bool:
        """Whether the task takes a text-only batch beside each image-text batch (pre-training's
        text corpus stream); the trainer feeds one only then."""
        return False

    def prepare(self, batch: VLBatch, text_batch: Optional[VLBatch] = None) -> tuple[VLBatch, Optional[VLBatch]]:
        """The batches as the forward pass takes them; by default unchanged."""
        return batch, text_batch

    def forward(self, batch: VLBatch, text_batch: Optional[VLBatch] = None) -> TaskOutput:
        raise NotImplementedError

    def loss_counts(self, batch: VLBatch, text_batch: Optional[VLBatch] = None) -> Optional[dict[str, float]]:
        """How many elements each term of the loss averages over in these (host) batches, by
        term name. With them the trainer averages every term over a whole optimiser step (all
        its micro-batches and processes), so a step's gradient does not depend on how the step
        is split. None (the default): each batch's loss is a mean of its own."""
        return None

    def fit_to_data(self, data: TaskData, echo: Echo = print) -> None:
        """Adapt the task to its data before training (vocabulary, answer list), reporting what
        it did to `echo`; by default there is nothing to fit. A task that cannot fit its data
        raises ValueError saying which binding to change."""
