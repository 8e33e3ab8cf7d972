import torch

from vlblocks.blocks.embeddings import VLEmbedding

HIDDEN = 16


def inputs():
    text_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    region_mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    segments = torch.tensor([[0, 0, 0, 0, 0], [0, 0, 0, 1, 1]])
    return dict(
        text_ids=torch.tensor([[2, 3, 4, 0, 0], [5, 6, 7, 8, 9]]),
        segment_ids=segments,
        text_mask=text_mask,
        text_visual=torch.randn(2, 5, HIDDEN),
        region_visual=torch.randn(2, 3, HIDDEN),
        region_mask=region_mask,
    )


def test_packing_positions_segments_and_mask_for_uneven_rows():
    embedding = VLEmbedding(vocab_size=20, hidden_size=HIDDEN, visual_size=HIDDEN, max_position_embeddings=16).eval()
    out = embedding(**inputs())
    # row 0: 3 text + 2 regions + END = 6 slots; row 1: 5 text + 1 region + END = 7 slots
    assert out.embeddings.shape == (2, 7, HIDDEN)
    assert out.position_ids.tolist() == [[0, 1, 2, 3, 3, 4, 6], [0, 1, 2, 3, 4, 5, 6]]
    assert out.segment_ids.tolist() == [[0, 0, 0, 2, 2, 2, 0], [0, 0, 0, 1, 1, 2, 2]]
    assert out.attention_mask.tolist() == [[True] * 6 + [False], [True] * 7]
    assert out.text_slots.tolist() == [[0, 1, 2, -1, -1], [0, 1, 2, 3, 4]]
    assert out.region_slots.tolist() == [[3, 4, -1], [5, -1, -1]]


def test_text_holes_are_squeezed_out():
    embedding = VLEmbedding(vocab_size=20, hidden_size=HIDDEN, visual_size=HIDDEN).eval()
    args = inputs()
    args["text_mask"] = torch.tensor([[1, 0, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = embedding(**args)
    assert out.text_slots[0].tolist() == [0, -1, 1, 2, -1]
    assert out.region_slots[0].tolist() == [3, 4, -1]


def test_embedding_values_at_initialisation_and_end_token():
    embedding = VLEmbedding(vocab_size=20, hidden_size=HIDDEN, visual_size=HIDDEN).eval()
    args = inputs()
    out = embedding(**args)
    layer_norm = embedding.LayerNorm
    # visual LayerNorm weights start at 0, so a text token's embedding is BERT's
    token = embedding.word_embeddings.weight[3] + embedding.position_embeddings.weight[1] + embedding.token_type_embeddings.weight[0]
    torch.testing.assert_close(out.embeddings[0, 1], layer_norm(token))
    end = embedding.end_embedding.weight[0] + embedding.position_embeddings.weight[4] + embedding.token_type_embeddings.weight[2]
    torch.testing.assert_close(out.embeddings[0, 5], layer_norm(end))
    region = embedding.image_token.weight[0] + embedding.position_embeddings.weight[3] + embedding.token_type_embeddings.weight[2]
    torch.testing.assert_close(out.embeddings[0, 3], layer_norm(region))
    assert torch.all(embedding.visual_text.LayerNorm.weight == 0)


def test_masked_regions_use_the_mask_token():
    embedding = VLEmbedding(vocab_size=20, hidden_size=HIDDEN, visual_size=HIDDEN).eval()
    args = inputs()
    plain = embedding(**args).embeddings
    masked = embedding(**args, masked_regions=torch.tensor([[0, 1, 0], [0, 0, 0]], dtype=torch.bool)).embeddings
    torch.testing.assert_close(masked[0, 3], plain[0, 3])
    expected = embedding.masked_region_token.weight[0] + embedding.position_embeddings.weight[3] + embedding.token_type_embeddings.weight[2]
    torch.testing.assert_close(masked[0, 4], embedding.LayerNorm(expected))


def test_scalar_scale_and_projection_options():
    embedding = VLEmbedding(vocab_size=20, hidden_size=HIDDEN, visual_size=10, visual_layer_norm=False, visual_scale_init=0.5)
    assert embedding.visual_text.projection.weight.shape == (HIDDEN, 10)
    assert embedding.visual_text.LayerNorm is None and embedding.visual_text.scale.item() == 0.5
    features = torch.randn(3, 10)
    torch.testing.assert_close(embedding.visual_text(features), embedding.visual_text.projection(features) * 0.5)
    args = inputs()
    args["text_visual"], args["region_visual"] = torch.randn(2, 5, 10), torch.randn(2, 3, 10)
    assert embedding(**args).embeddings.shape == (2, 7, HIDDEN)


def test_rows_without_regions_pack_text_then_end():
    embedding = VLEmbedding(vocab_size=20, hidden_size=HIDDEN, visual_size=HIDDEN).eval()
    args = inputs()
    args["region_visual"], args["region_mask"] = torch.zeros(2, 0, HIDDEN), torch.zeros(2, 0, dtype=torch.bool)
    out = embedding(**args)
    assert out.position_ids.tolist() == [[0, 1, 2, 4, 4, 5], [0, 1, 2, 3, 4, 6]]
    assert out.attention_mask.sum(1).tolist() == [4, 6]


def test_region_visual_scale_can_start_apart_from_the_text_one():
    embedding = VLEmbedding(vocab_size=20, hidden_size=HIDDEN, visual_size=HIDDEN, visual_scale_init=0.0, region_visual_scale_init=1.0)
    assert torch.all(embedding.visual_text.LayerNorm.weight == 0)
    assert torch.all(embedding.visual_region.LayerNorm.weight == 1)
