"""The encoder and pooler against HF transformers' BertModel in float64."""

import pytest
import torch
from transformers import BertConfig, BertModel

from vlblocks.blocks.encoder import Pooler, TransformerEncoder

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


def test_hidden_size_must_divide_into_heads():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        TransformerEncoder(1, 30, 4, 32)


def test_a_layer_at_some_query_rows_over_every_key_gives_the_full_layer_at_those_rows():
    """What `bench/step_leads.py`'s last-layer lead times: queries at a subset of rows, keys and
    values from every position (the attention's context input), then the feed-forward block."""
    torch.manual_seed(0)
    layer = TransformerEncoder(num_layers=1, hidden_size=32, num_heads=4, intermediate_size=64).layer[0].double().eval()
    hidden = torch.randn(2, 9, 32, dtype=torch.float64)
    key_mask = torch.ones(2, 9, dtype=torch.bool)
    key_mask[1, 6:] = False
    full, _ = layer(hidden, key_mask)
    rows = torch.tensor([[0, 3, 5], [0, 1, 4]])
    queries = torch.gather(hidden, 1, rows[..., None].expand(-1, -1, 32))
    attended, _ = layer.attention(queries, key_mask, context=hidden)
    at_rows = layer.output(layer.intermediate(attended), attended)
    torch.testing.assert_close(at_rows, torch.gather(full, 1, rows[..., None].expand(-1, -1, 32)), rtol=0, atol=1e-12)
