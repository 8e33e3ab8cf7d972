"""What every pre-training objective is: its masking, the head it scores with, its positions and its loss."""

from __future__ import annotations

from typing import Literal, Optional

from torch import Tensor, nn

from vlblocks.batch import VLBatch
from vlblocks.models.interface import VLOutput
from vlblocks.objectives.output import ObjectiveOutput

States = Literal["text", "regions", "pooled"]


class PretrainingObjective(nn.Module):
    """One term of pre-training, as `PretrainingTask(model, objectives=[...])` runs it.

    - `mask(batch, seeds)` on the host, before the batch goes to its device: the objective's
      own draws (each row from its seed) and the positions it will score, stored in the batch.
      Objectives mask in list order.
    - `conceal(batch)` on the device: what the model must not see (default: nothing).
    - `positions(batch)`: the [K, 2] (row, position) it scores, or None (every row: pooled);
      the task hands the same positions to the head and, through the batch, to the loss.
    - `head`: the attribute of the pre-training model (`VLBertForPretraining`) it scores with,
      e.g. "mlm_head"; None for an objective without a loss of its own (region masking).
      `states` says which states that head reads, `output` picks one output of a head that
      returns several (`RegionPredictionHead`).
    - `loss(logits, batch)` → `ObjectiveOutput`; `count(batch)` the number of scored elements
      (the trainer's loss normalisation).

    Attributes set by subclasses: `name` (metric prefix and key in the task), `weight`.
    """

    head: Optional[str] = None
    states: States = "text"
    output: Optional[str] = None
    stream: Literal["image_text", "text_only"] = "image_text"

    def mask(self, batch: VLBatch, seeds: Tensor) -> VLBatch:
        return batch

    def conceal(self, batch: VLBatch) -> VLBatch:
        return batch

    def positions(self, batch: VLBatch) -> Optional[Tensor]:
        return None

    def read_states(self, core: VLOutput) -> Tensor:
        """The states `head` reads: [B, L, H] text, [B, N, H] regions or [B, H] pooled."""
        return {"text": core.text_states, "regions": core.region_states, "pooled": core.pooled}[self.states]

    def loss(self, logits: Tensor, batch: VLBatch) -> ObjectiveOutput:
        raise NotImplementedError(f"{type(self).__name__} has no loss")

    def count(self, batch: VLBatch) -> float:
        positions = self.positions(batch)
        return float(positions.shape[0] if positions is not None else batch.batch_size)
