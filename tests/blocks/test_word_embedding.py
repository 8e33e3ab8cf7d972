"""`WordEmbedding.one_gradient`: a word table shared by the lookup and a tied MLM decoder gets the
gradient autograd would give it, in one [V, H] buffer (no dense lookup gradient, no out-of-place
sum), dense in `.grad`; outside the block, and without a tie, it is `nn.Embedding`."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from vlblocks.blocks.heads import MaskedLMHead
from vlblocks.blocks.word_embedding import WordEmbedding

V, H = 50, 8


class TableSizedResults(TorchDispatchMode):
    """Names of the operators that return a new [V, H] tensor (in-place operators and views excluded)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        inplace = func._schema.name.endswith("_") or any(a.alias_info is not None for a in func._schema.arguments)
        if isinstance(result, torch.Tensor) and result.shape == (V, H) and result.layout == torch.strided and not inplace:
            self.names.append(func.__name__)
        return result


def tied(dtype=torch.float64):
    torch.manual_seed(0)
    words, head = WordEmbedding(V, H), MaskedLMHead(H, V)
    head.tie_to(words)
    return words.to(dtype), head.to(dtype)


def loss_of(words, head, ids, select, lookups=1, decodes=1):
    """Each use of the table counted with its own weight (1, 2, ...), so that no two coincide."""
    vectors = sum((words(ids) * (k + 1) for k in range(lookups)), torch.linspace(-1, 1, ids.numel() * H).view(*ids.shape, H).to(words.weight.dtype))
    decoded = sum(head(vectors, select).logsumexp(-1).sum() * (k + 1) for k in range(decodes))
    return decoded + vectors.square().sum()


def gradients(shared, lookups=1, decodes=1, dtype=torch.float64, autocast=False):
    words, head = tied(dtype)
    ids = torch.randint(0, V, (4, 6), generator=torch.Generator().manual_seed(1))
    select = ids % 3 == 0
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast), words.one_gradient() if shared else torch.enable_grad():
        loss = loss_of(words, head, ids, select, lookups, decodes)
    recorder = TableSizedResults()
    with recorder:
        loss.backward()
    return words.weight.grad, head.transform.dense.weight.grad, recorder.names


@pytest.mark.parametrize("lookups, decodes", [(1, 1), (2, 1), (1, 2), (1, 0), (0, 1)])
def test_the_same_gradient_as_autograd_gives_the_tied_table(lookups, decodes):
    table, transform, _ = gradients(False, lookups, decodes)
    shared_table, shared_transform, _ = gradients(True, lookups, decodes)
    assert shared_table.layout == torch.strided and shared_table.dtype == torch.float64
    torch.testing.assert_close(shared_table, table, rtol=1e-13, atol=1e-15)
    assert torch.equal(shared_transform, transform) if decodes else shared_transform is transform is None


def test_one_table_sized_buffer_instead_of_three():
    _, _, plain = gradients(False)
    _, _, shared = gradients(True)
    assert sorted(plain) == ["add.Tensor", "embedding_dense_backward.default", "mm.default"], "the path this block replaces"
    assert shared == ["mm.default"], "only the decoder's matmul makes a [V, H] tensor; the lookup's rows are added into it in place"


def test_mixed_precision_keeps_a_float32_gradient_within_rounding():
    table, _, _ = gradients(False, dtype=torch.float32, autocast=True)
    shared, _, _ = gradients(True, dtype=torch.float32, autocast=True)
    assert shared.dtype == torch.float32
    torch.testing.assert_close(shared, table, rtol=1e-6, atol=1e-7)


def test_outside_the_block_and_without_a_gradient_it_is_nn_embedding():
    words, head = tied()
    reference = nn.Embedding(V, H).double()
    reference.load_state_dict(words.state_dict(), strict=True)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(words(ids), reference(ids))
    with torch.no_grad(), words.one_gradient():
        assert words._views is None and head.decoder_weight() is words.weight
    with words.one_gradient():
        views = words._views
        with words.one_gradient():  # a nested block joins the outer one
            assert words._views is views and head.decoder_weight() is views[1]
    assert words._views is None


def test_on_a_device_without_sparse_tensors_the_block_does_nothing():
    words = WordEmbedding(V, H).to("meta")  # neither CPU nor CUDA, as MPS
    with words.one_gradient():
        assert words._views is None and words.decoder_weight() is words.weight


def test_an_error_inside_the_block_leaves_the_table_as_it_was():
    words, head = tied()
    with pytest.raises(RuntimeError, match="inside"):
        with words.one_gradient():
            raise RuntimeError("inside")
    assert words._views is None and head.decoder_weight() is words.weight


def test_a_decoder_untied_or_tied_to_a_plain_embedding_multiplies_by_its_own_weight():
    head = MaskedLMHead(H, V).double()
    assert head.decoder_weight() is head.decoder.weight
    plain = nn.Embedding(V, H).double()
    head.tie_to(plain)
    assert head.decoder_weight() is plain.weight
    words, head = tied()
    head.decoder.weight = nn.Parameter(words.weight.detach().clone())  # untied again by hand
    with words.one_gradient():
        assert head.decoder_weight() is head.decoder.weight


def test_code_that_torch_compile_captures_takes_the_plain_path(monkeypatch):
    """The block opened eagerly, its lookups and decoder traced (as with graph breaks)."""
    plain_table, _, _ = gradients(False)
    words, head = tied()
    ids = torch.randint(0, V, (4, 6), generator=torch.Generator().manual_seed(1))
    with words.one_gradient():
        assert words._views is not None
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert head.decoder_weight() is words.weight
        loss = loss_of(words, head, ids, ids % 3 == 0)
    recorder = TableSizedResults()
    with recorder:
        loss.backward()
    assert "embedding_dense_backward.default" in recorder.names, "inside a captured graph, the lookup's gradient is autograd's"
    torch.testing.assert_close(words.weight.grad, plain_table, rtol=1e-13, atol=1e-15)
