"""The encoder and pooler against HF transformers' BertModel in float64."""

import pytest
import torch
from transformers import BertConfig, BertModel

from vlblocks.blocks.encoder import MultiHeadAttention, Pooler, TransformerEncoder, sdpa_computes_in_float32

CONFIG = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, vocab_size=60)


@pytest.fixture(scope="module")
def hf_bert():
    torch.manual_seed(0)
    config = BertConfig(**CONFIG, attn_implementation="eager")
    return BertModel(config).double().eval()


def ours_from(hf):
    encoder = TransformerEncoder(2, 48, 4, 96).double().eval()
    pooler = Pooler(48).double().eval()
    state = hf.state_dict()
    encoder.load_state_dict({k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}, strict=True)
    pooler.load_state_dict({k[len("pooler.") :]: v for k, v in state.items() if k.startswith("pooler.")}, strict=True)
    return encoder, pooler


def test_bert_encoder_parity_with_padding_and_attentions(hf_bert):
    encoder, pooler = ours_from(hf_bert)
    torch.manual_seed(1)
    ids = torch.randint(1, 60, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    with torch.no_grad():
        expected = hf_bert(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
        embedded = expected.hidden_states[0]
        ours = encoder(embedded, mask.bool(), output_hidden_states=True, output_attentions=True)
        fast = encoder(embedded, mask.bool())
    valid = mask.bool()
    torch.testing.assert_close(ours.last_hidden_state[valid], expected.last_hidden_state[valid], atol=1e-6, rtol=0)
    torch.testing.assert_close(fast.last_hidden_state[valid], expected.last_hidden_state[valid], atol=1e-6, rtol=0)
    torch.testing.assert_close(pooler(ours.last_hidden_state), expected.pooler_output, atol=1e-6, rtol=0)
    for ours_layer, hf_layer in zip(ours.hidden_states, expected.hidden_states):
        torch.testing.assert_close(ours_layer[valid], hf_layer[valid], atol=1e-6, rtol=0)
    for ours_probs, hf_probs in zip(ours.attentions, expected.attentions):
        queries = valid[:, None, :, None].expand_as(hf_probs)
        torch.testing.assert_close(ours_probs[queries], hf_probs[queries], atol=1e-6, rtol=0)


def test_parameter_names_equal_hf_bert_encoder(hf_bert):
    encoder = TransformerEncoder(2, 48, 4, 96)
    hf_names = {k[len("encoder.") :] for k in hf_bert.state_dict() if k.startswith("encoder.")}
    assert set(encoder.state_dict()) == hf_names


def test_dropout_is_active_only_in_training():
    torch.manual_seed(0)
    encoder = TransformerEncoder(1, 16, 2, 32, dropout=0.5, attention_dropout=0.5)
    hidden, mask = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool)
    encoder.train()
    assert not torch.allclose(encoder(hidden, mask).last_hidden_state, encoder(hidden, mask).last_hidden_state)
    encoder.eval()
    torch.testing.assert_close(encoder(hidden, mask).last_hidden_state, encoder(hidden, mask).last_hidden_state)


def test_reduced_precision_attention_with_dropout_on_the_cpu_is_written_out():
    """Where SDPA would upcast to float32 (bf16/fp16 on a CPU, dropping probabilities), the
    attention takes the written-out path that attention maps use (exact to HF in float64
    above): the same draws give the same output, and its matmuls stay in bf16."""
    bf16 = torch.zeros(1, dtype=torch.bfloat16)
    assert sdpa_computes_in_float32(bf16, 0.1) and sdpa_computes_in_float32(bf16.half(), 0.1)
    assert not sdpa_computes_in_float32(bf16, 0.0) and not sdpa_computes_in_float32(bf16.float(), 0.1)
    assert not sdpa_computes_in_float32(torch.zeros(1, dtype=torch.bfloat16, device="meta"), 0.1)

    torch.manual_seed(0)
    attention = MultiHeadAttention(16, 2, dropout=0.5).train()
    hidden, mask = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool)
    outputs = []
    for maps in (False, True):
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            attended, _ = attention(hidden, mask, output_attentions=maps)
        outputs.append(attended)
    assert outputs[0].dtype == torch.bfloat16
    assert torch.equal(outputs[0], outputs[1])
    attention.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not torch.equal(attention(hidden, mask)[0], outputs[0]), "training dropped probabilities"


def test_hidden_size_must_divide_into_heads():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        TransformerEncoder(1, 30, 4, 32)


def test_the_last_layer_at_some_rows_gives_the_full_encoders_states_and_gradients_there():
    """`last_layer_rows`: the last layer's queries at a few slots, keys and values from every
    position. At those slots the states equal the full encoder's, 0 elsewhere; a loss that reads
    only those slots has the same gradients (training mode, dropout 0, float64)."""
    torch.manual_seed(0)
    encoder = TransformerEncoder(num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64, dropout=0.0, attention_dropout=0.0)
    encoder = encoder.double().train()
    hidden = torch.randn(2, 9, 32, dtype=torch.float64)
    key_mask = torch.ones(2, 9, dtype=torch.bool)
    key_mask[1, 6:] = False
    rows = torch.tensor([[5, 0, 3], [0, 1, 4]])
    weights = torch.randn(2, 3, 32, dtype=torch.float64)

    def states_and_gradients(last_layer_rows):
        encoder.zero_grad(set_to_none=True)
        inputs = hidden.clone().requires_grad_()
        output = encoder(inputs, key_mask, last_layer_rows=last_layer_rows, output_hidden_states=True)
        picked = torch.gather(output.last_hidden_state, 1, rows[..., None].expand(-1, -1, 32))
        (picked * weights).sum().backward()
        return output, picked, [inputs.grad] + [parameter.grad for parameter in encoder.parameters()]

    full, full_picked, full_gradients = states_and_gradients(None)
    fast, fast_picked, fast_gradients = states_and_gradients(rows)
    torch.testing.assert_close(fast_picked, full_picked, rtol=0, atol=1e-12)
    elsewhere = torch.ones(2, 9, dtype=torch.bool).scatter(1, rows, False)
    assert fast.last_hidden_state[elsewhere].abs().max() == 0
    assert fast.hidden_states[-1] is fast.last_hidden_state
    torch.testing.assert_close(fast.hidden_states[1], full.hidden_states[1], rtol=0, atol=0)
    assert len(fast_gradients) == len(full_gradients)
    for fast_gradient, full_gradient in zip(fast_gradients, full_gradients):
        torch.testing.assert_close(fast_gradient, full_gradient, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="ask for attentions without it"):
        encoder(hidden, key_mask, output_attentions=True, last_layer_rows=rows)
