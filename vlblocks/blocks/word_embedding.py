"""The word table, and one gradient tensor for it when a tied MLM decoder shares it.

BERT's masked-LM decoder multiplies by the word table ([V, H]) that the input lookup reads rows
from. Left to autograd, the two uses of the one parameter each get a dense [V, H] gradient, and
the engine adds them out of place: three [V, H] tensors are alive at the end of every backward
pass, the step's memory peak (268 MiB for BERT-base's 30,522 words in float32). Inside
`WordEmbedding.one_gradient()`, the lookup takes a sparse gradient (only the rows it read) and
the decoder's dense gradient absorbs those rows in place, so one [V, H] tensor reaches the
parameter: the same sum, in one buffer. Nothing changes for data-parallel wrappers, the
optimiser or the state dict: the parameter's `.grad` is dense as before.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SPARSE_DEVICES = ("cpu", "cuda")  # where the lookup's sparse gradient can live


class _LookupAndDecoderViews(torch.autograd.Function):
    """[V, H] table → two views of it, one for the lookup and one for the decoder, whose
    gradients (the lookup's sparse, the decoder's dense; either may be absent) return as one
    dense [V, H] gradient."""

    @staticmethod
    def forward(ctx, weight: Tensor) -> tuple[Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        return weight.view_as(weight), weight.view_as(weight)

    @staticmethod
    def backward(ctx, lookup_grad: Optional[Tensor], decoder_grad: Optional[Tensor]) -> Optional[Tensor]:
        if decoder_grad is None:
            return lookup_grad.to_dense() if lookup_grad is not None and lookup_grad.is_sparse else lookup_grad
        if lookup_grad is None:
            return decoder_grad
        if _whole_buffer(decoder_grad):
            # The decoder's matmul made this gradient for the decoder's view alone, and nothing
            # else reads it: adding the lookup's rows in place saves a [V, H] buffer.
            return decoder_grad.add_(lookup_grad)
        return decoder_grad + lookup_grad


def _whole_buffer(tensor: Tensor) -> bool:
    """Whether `tensor` spans its whole storage densely (not an expanded or partial view)."""
    return tensor.is_contiguous() and (tensor._base is None or tensor._base.numel() == tensor.numel())


class WordEmbedding(nn.Embedding):
    """`nn.Embedding` for the word table (same parameter, same state dict), which a tied MLM
    decoder can share with one gradient tensor for both uses (`one_gradient`).

    Inputs: ids [*] (long). Returns: [*, H].
    """

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__(num_embeddings, embedding_dim)
        self._views: Optional[tuple[Tensor, Tensor]] = None

    @contextlib.contextmanager
    def one_gradient(self) -> Iterator[None]:
        """Within the block, every lookup reads through one view of the table and every tied
        decoder (`decoder_weight`) multiplies by another, so the backward pass gives the table
        one dense gradient buffer instead of two and their sum. A no-op where no gradient is
        taken, inside another block, and on devices other than CPU and CUDA (the lookup's sparse
        gradient needs sparse tensors, which MPS lacks); lookups and decoders that
        `torch.compile` captures in a graph take the plain path."""
        taken = torch.is_grad_enabled() and self.weight.requires_grad and self.weight.device.type in SPARSE_DEVICES
        if self._views is not None or not taken or torch.compiler.is_compiling():
            yield
            return
        self._views = _LookupAndDecoderViews.apply(self.weight)
        try:
            yield
        finally:
            self._views = None

    def decoder_weight(self) -> Tensor:
        """[V, H]: what a decoder tied to this table multiplies by (the decoder's view inside
        `one_gradient`, the table itself outside it)."""
        return self._views[1] if self._views is not None and not torch.compiler.is_compiling() else self.weight

    def forward(self, ids: Tensor) -> Tensor:
        if self._views is None or torch.compiler.is_compiling():  # a captured graph takes the plain path
            return super().forward(ids)
        return F.embedding(ids, self._views[0], self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, sparse=True)
