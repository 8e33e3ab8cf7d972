"""The blocks the variants add: stand-alone text and region embeddings, VLEmbedding's options,
region feature embeddings without geometry or with LXMERT's averaging, and cross-attention."""

import torch
import torch.nn.functional as F

from vlblocks.blocks import (
    AveragedRegionFeatureEmbedding,
    BoxCoordinates,
    MultiHeadAttention,
    RegionEmbedding,
    TextEmbedding,
    VisualFeatureEmbedding,
    VLEmbedding,
)

H = 8


def layer_norm(x):
    return F.layer_norm(x, (x.shape[-1],), eps=1e-12)


def test_text_embedding_is_bert_embeddings():
    embedding = TextEmbedding(20, H, 16, 2, dropout=0.0).double()
    ids, segments = torch.tensor([[3, 4, 5]]), torch.tensor([[0, 0, 1]])
    expected = embedding.word_embeddings.weight[ids[0]] + embedding.position_embeddings.weight[:3] + embedding.token_type_embeddings.weight[segments[0]]
    torch.testing.assert_close(embedding(ids, segments)[0], layer_norm(expected), atol=1e-12, rtol=0)
    assert embedding.visual_text is None


def test_region_embedding_tokens_tables_and_pass_through():
    regions = torch.randn(2, 3, H, dtype=torch.float64)
    assert torch.equal(RegionEmbedding(H, H).double()(regions), regions), "no token, no table, no norm: the features as they are"
    embedding = RegionEmbedding(H, H, region_token=True, max_position_embeddings=4, type_vocab_size=2, segment=1, dropout=0.0).double()
    masked = torch.tensor([[False, True, False], [False, False, False]])
    out = embedding(regions, masked)
    word = torch.where(masked[..., None], embedding.masked_region_token.weight[0], embedding.image_token.weight[0])
    extra = embedding.position_embeddings.weight[0] + embedding.token_type_embeddings.weight[1]
    torch.testing.assert_close(out, word + regions + extra, atol=1e-12, rtol=0)


def visualbert_style_embedding():
    return VLEmbedding(
        20, H, H, 16, 2, dropout=0.0, layout="concatenated", end_token=False, text_visual_term=False, region_token=False,
        region_visual_term=False, region_positions="zero", separate_region_tables=True, region_segment=1,
    ).double()


def test_concatenated_layout_keeps_padding_in_place():
    embedding = visualbert_style_embedding()
    text_mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    region_mask = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)
    ids = torch.tensor([[2, 3, 0], [4, 5, 6]])
    regions = torch.randn(2, 2, H, dtype=torch.float64)
    out = embedding(ids, torch.zeros_like(ids), text_mask, None, regions, region_mask)
    assert out.attention_mask.tolist() == [[True, True, False, True, False], [True] * 5]
    assert out.text_slots.tolist() == [[0, 1, -1], [0, 1, 2]]
    assert out.region_slots.tolist() == [[3, -1], [3, 4]]
    assert out.position_ids.tolist() == [[0, 1, 2, 0, 0], [0, 1, 2, 0, 0]]
    assert out.segment_ids.tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 1]]
    assert not hasattr(embedding, "end_embedding") or embedding.end_embedding is None
    region = regions[1, 1] + embedding.visual_position_embeddings.weight[0] + embedding.visual_token_type_embeddings.weight[1]
    torch.testing.assert_close(out.embeddings[1, 4], layer_norm(region), atol=1e-12, rtol=0)
    padded_text = embedding.word_embeddings.weight[0] + embedding.position_embeddings.weight[2] + embedding.token_type_embeddings.weight[0]
    torch.testing.assert_close(out.embeddings[0, 2], layer_norm(padded_text), atol=1e-12, rtol=0)


def test_packed_layout_without_end_token_and_with_zero_region_positions():
    embedding = VLEmbedding(20, H, H, 16, 3, dropout=0.0, end_token=False, region_positions="zero", visual_scale_init=1.0).double()
    text_mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    region_mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    ids = torch.tensor([[2, 3, 0], [4, 5, 6]])
    out = embedding(ids, torch.zeros_like(ids), text_mask, torch.zeros(2, 3, H, dtype=torch.float64), torch.zeros(2, 2, H, dtype=torch.float64), region_mask)
    assert out.embeddings.shape[1] == 4, "no [END] slot: 3 + 1 or 2 + 2"
    assert out.attention_mask.tolist() == [[True] * 4, [True] * 4]
    assert out.position_ids.tolist() == [[0, 1, 0, 0], [0, 1, 2, 0]]
    assert out.segment_ids.tolist() == [[0, 0, 2, 2], [0, 0, 0, 2]]


def test_visual_feature_embedding_without_geometry_is_a_projection():
    embedding = VisualFeatureEmbedding(6, 4, geometry=None, dropout=0.0, activation=None).double()
    features = torch.randn(2, 3, 6, dtype=torch.float64)
    boxes = torch.rand(2, 3, 4, dtype=torch.float64)
    out = embedding(features, boxes, torch.ones(2, 2, dtype=torch.float64))
    torch.testing.assert_close(out, features @ embedding.projection.weight.T + embedding.projection.bias, atol=1e-12, rtol=0)
    assert embedding.projection.weight.shape == (4, 6)


def test_averaged_region_feature_embedding_is_lxmerts():
    embedding = AveragedRegionFeatureEmbedding(6, H, dropout=0.0).double()
    features = torch.randn(1, 2, 6, dtype=torch.float64)
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 20.0], [5.0, 5.0, 15.0, 10.0]]], dtype=torch.float64)
    sizes = torch.tensor([[20.0, 40.0]], dtype=torch.float64)
    normalised = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.25, 0.125, 0.75, 0.25]]], dtype=torch.float64)
    torch.testing.assert_close(BoxCoordinates()(boxes, sizes), normalised)
    appearance = layer_norm(features @ embedding.appearance_projection.weight.T + embedding.appearance_projection.bias)
    box = layer_norm(normalised @ embedding.box_projection.weight.T + embedding.box_projection.bias)
    torch.testing.assert_close(embedding(features, boxes, sizes), (appearance + box) / 2, atol=1e-12, rtol=0)
    masked = embedding(features, boxes, sizes, torch.tensor([[True, False]]))
    assert torch.all(masked[0, 1] == 0)


def test_cross_attention_reads_keys_and_values_from_the_context_stream():
    torch.manual_seed(0)
    attention = MultiHeadAttention(H, 2, 0.0, context_size=6).double().eval()
    queries = torch.randn(1, 3, H, dtype=torch.float64)
    context = torch.randn(1, 4, 6, dtype=torch.float64)
    mask = torch.tensor([[True, True, False, True]])
    out, probabilities = attention(queries, mask, True, context=context)
    q = (queries @ attention.query.weight.T + attention.query.bias).view(1, 3, 2, 4).transpose(1, 2)
    k = (context @ attention.key.weight.T + attention.key.bias).view(1, 4, 2, 4).transpose(1, 2)
    v = (context @ attention.value.weight.T + attention.value.bias).view(1, 4, 2, 4).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2) / 2.0).masked_fill(~mask[:, None, None], float("-inf"))
    expected = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 3, H)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    assert probabilities.shape == (1, 2, 3, 4) and torch.all(probabilities[..., 2] == 0)
    sdpa, _ = attention(queries, mask, False, context=context)
    torch.testing.assert_close(sdpa, expected, atol=1e-12, rtol=0)


def test_attention_over_an_empty_stream_gives_zero_not_nan():
    attention = MultiHeadAttention(H, 2, 0.0).double().eval()
    hidden = torch.randn(2, 3, H, dtype=torch.float64)
    context = torch.randn(2, 2, H, dtype=torch.float64)
    mask = torch.tensor([[True, False], [False, False]])
    for output_attentions in (False, True):
        out, probabilities = attention(hidden, mask, output_attentions, context=context, allow_empty=True)
        assert torch.isfinite(out).all() and torch.all(out[1] == 0)
        if output_attentions:
            assert torch.all(probabilities[1] == 0)
        full, _ = attention(hidden[:1], mask[:1], output_attentions, context=context[:1])
        torch.testing.assert_close(out[:1], full, atol=1e-12, rtol=0)
