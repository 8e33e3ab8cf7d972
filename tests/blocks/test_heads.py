import torch
from transformers import BertConfig, BertForPreTraining

from vlblocks.blocks.heads import MaskedLMHead, MaskedRegionHead, RelationHead


def test_mlm_head_matches_hf_and_scores_selected_positions():
    torch.manual_seed(0)
    hf = BertForPreTraining(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=40))
    hf = hf.double().eval()
    head = MaskedLMHead(32, 40).double().eval()
    head.tie_to(hf.bert.embeddings.word_embeddings)
    state = {k[len("cls.predictions.") :]: v for k, v in hf.state_dict().items() if k.startswith("cls.predictions.")}
    state.pop("decoder.bias", None)
    head.load_state_dict(state, strict=True)
    hidden = torch.randn(2, 5, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = hf.cls.predictions(hidden)
        torch.testing.assert_close(head(hidden), expected, atol=1e-10, rtol=0)
        select = torch.tensor([[0, 1, 0, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
        torch.testing.assert_close(head(hidden, select), expected[select], atol=1e-10, rtol=0)
    assert head.decoder.weight is hf.bert.embeddings.word_embeddings.weight


def test_tying_shares_the_gradient():
    embedding = torch.nn.Embedding(10, 8)
    head = MaskedLMHead(8, 10)
    head.tie_to(embedding)
    head(torch.randn(1, 3, 8)).sum().backward()
    assert embedding.weight.grad is not None and embedding.weight.grad.abs().sum() > 0


def test_region_head_has_no_layernorm_and_selects():
    head = MaskedRegionHead(16, 1601)
    assert head.transform.LayerNorm is None
    assert set(head.state_dict()) == {"transform.dense.weight", "transform.dense.bias", "region_cls_pred.weight", "region_cls_pred.bias"}
    hidden = torch.randn(2, 4, 16)
    select = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0]], dtype=torch.bool)
    logits = head(hidden, select)
    assert logits.shape == (3, 1601)
    torch.testing.assert_close(logits, head(hidden)[select])
    expected = head.region_cls_pred(torch.nn.functional.gelu(head.transform.dense(hidden)))
    torch.testing.assert_close(head(hidden), expected)


def test_relation_head_shape():
    assert RelationHead(16)(torch.randn(3, 16)).shape == (3, 2)
