"""VLBert against an independent per-sample float64 computation of the VL-BERT equations.

The reference below follows the official model's definition (embedding math, packing, encoder)
one sample at a time with plain tensor ops and the model's own weights read from its state_dict;
it imports nothing from vlblocks but the model under test.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from vlblocks.batch import VLBatch
from vlblocks.blocks.embeddings import VLEmbedding
from vlblocks.blocks.encoder import Pooler, TransformerEncoder
from vlblocks.blocks.geometry import RegionGeometryEmbedding
from vlblocks.blocks.region_features import PrecomputedRegionFeatures
from vlblocks.blocks.visual import VisualFeatureEmbedding
from vlblocks.models.vlbert import VLBert

HIDDEN, LAYERS, HEADS, FFN, VOCAB, APPEARANCE = 32, 2, 4, 64, 50, 24
EPS = 1e-12


def layer_norm(x, w, prefix):
    return F.layer_norm(x, x.shape[-1:], w[prefix + ".weight"], w[prefix + ".bias"], EPS)


def linear(x, w, prefix):
    return x @ w[prefix + ".weight"].T + w[prefix + ".bias"]


def box_geometry(box, width, height):
    """2048-style sin/cos feature of one box, with dim=8 frequencies per coordinate here."""
    x1, y1, x2, y2 = box.tolist()
    coordinates = [(x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height]
    values = []
    for c in coordinates:
        phases = [c * 100.0 / 1000.0 ** (i / 8) for i in range(8)]
        values += [math.sin(p) for p in phases] + [math.cos(p) for p in phases]
    return torch.tensor(values, dtype=torch.float64)


def visual_term(v, w, prefix, visual_ln, projected):
    if projected:
        v = linear(v, w, prefix + ".projection")
    return layer_norm(v, w, prefix + ".LayerNorm") if visual_ln else v * w[prefix + ".scale"]


def reference_sample(w, batch, b, visual_ln, projected):
    """Text states, region states and pooled output of sample b, computed from the equations."""
    text_ids = batch.text_ids[b][batch.text_mask[b]]
    segments = batch.segment_ids[b][batch.text_mask[b]]
    regions = torch.nonzero(batch.region_mask[b]).flatten().tolist()
    width, height = batch.image_sizes[b].tolist()
    obj_reps = {}
    for r in regions:
        fused = torch.cat([box_geometry(batch.boxes[b, r], width, height), batch.region_features[b, r]])
        obj_reps[r] = torch.relu(linear(fused, w, "visual_embedding.projection"))
    tags = batch.token_region_index[b][batch.text_mask[b]] if batch.token_region_index is not None else torch.zeros_like(text_ids)
    rows, positions, segment_rows = [], [], []
    for i, (token, segment, tag) in enumerate(zip(text_ids.tolist(), segments.tolist(), tags.tolist())):
        visual = visual_term(obj_reps[tag], w, "embedding.visual_text", visual_ln, projected)
        rows.append(w["embedding.word_embeddings.weight"][token] + visual)
        positions.append(i)
        segment_rows.append(segment)
    n_text = len(rows)
    for r in regions:
        masked = batch.masked_regions is not None and bool(batch.masked_regions[b, r])
        word = w["embedding.masked_region_token.weight" if masked else "embedding.image_token.weight"][0]
        rows.append(word + visual_term(obj_reps[r], w, "embedding.visual_region", visual_ln, projected))
        positions.append(n_text)
        segment_rows.append(2)
    rows.append(w["embedding.end_embedding.weight"][0])
    positions.append(n_text + 1)
    segment_rows.append(2)
    x = torch.stack(rows) + w["embedding.position_embeddings.weight"][positions] + w["embedding.token_type_embeddings.weight"][segment_rows]
    x = layer_norm(x, w, "embedding.LayerNorm")
    head_dim = HIDDEN // HEADS
    for layer in range(LAYERS):
        p = f"encoder.layer.{layer}"
        q, k, v = (linear(x, w, f"{p}.attention.self.{name}").view(-1, HEADS, head_dim).transpose(0, 1) for name in ("query", "key", "value"))
        probabilities = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(head_dim), dim=-1)
        context = (probabilities @ v).transpose(0, 1).reshape(-1, HIDDEN)
        attended = layer_norm(x + linear(context, w, f"{p}.attention.output.dense"), w, f"{p}.attention.output.LayerNorm")
        inner = linear(attended, w, f"{p}.intermediate.dense")
        inner = 0.5 * inner * (1 + torch.erf(inner / math.sqrt(2)))
        x = layer_norm(attended + linear(inner, w, f"{p}.output.dense"), w, f"{p}.output.LayerNorm")
    pooled = torch.tanh(linear(x[0], w, "pooler.dense"))
    return x[:n_text], x[n_text : n_text + len(regions)], regions, pooled


def make_model(visual_ln=True, visual_size=HIDDEN):
    model = VLBert(
        region_features=PrecomputedRegionFeatures(APPEARANCE),
        visual_embedding=VisualFeatureEmbedding(APPEARANCE, visual_size, RegionGeometryEmbedding(dim=8), dropout=0.1),
        embedding=VLEmbedding(VOCAB, HIDDEN, visual_size, 64, 3, visual_layer_norm=visual_ln, visual_scale_init=0.0),
        encoder=TransformerEncoder(LAYERS, HIDDEN, HEADS, FFN),
        pooler=Pooler(HIDDEN),
    ).double()
    with torch.no_grad():  # the visual terms start at zero; give them weights so they are tested
        for name, parameter in model.named_parameters():
            if "visual_text" in name or "visual_region" in name:
                parameter.normal_(0.0, 0.5)
    return model.eval()


def make_batch(grounded=False, masked=False):
    torch.manual_seed(3)
    text_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    region_mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    boxes = torch.zeros(3, 5, 4, dtype=torch.float64)
    sizes = torch.tensor([[64.0, 48.0], [100.0, 80.0], [30.0, 40.0]], dtype=torch.float64)
    for b in range(3):
        boxes[b, 0] = torch.tensor([0, 0, sizes[b, 0] - 1, sizes[b, 1] - 1])
        corner = torch.rand(4, 2, dtype=torch.float64) * sizes[b] * 0.5
        boxes[b, 1:, :2], boxes[b, 1:, 2:] = corner, corner + torch.rand(4, 2, dtype=torch.float64) * sizes[b] * 0.5
    segments = torch.tensor([[0, 0, 0, 0, 1, 1, 1], [0] * 7, [0, 0, 1, 1, 1, 0, 0]])
    grounding = None
    if grounded:
        grounding = torch.tensor([[0, 1, 0, 1, 1, 0, 0], [0, 4, 3, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]])
    return VLBatch(
        text_ids=torch.randint(1, VOCAB, (3, 7)) * text_mask,
        segment_ids=segments * text_mask,
        text_mask=text_mask,
        boxes=boxes,
        region_mask=region_mask,
        image_sizes=sizes,
        region_features=torch.randn(3, 5, APPEARANCE, dtype=torch.float64) * region_mask[..., None],
        token_region_index=grounding,
        masked_regions=torch.tensor([[0, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.bool) if masked else None,
    )


@pytest.mark.parametrize(
    "visual_ln, visual_size, grounded, masked",
    [(True, HIDDEN, False, False), (False, HIDDEN, False, True), (True, 20, True, True), (False, 20, True, False)],
)
def test_vlbert_matches_reference_equations(visual_ln, visual_size, grounded, masked):
    model = make_model(visual_ln, visual_size)
    batch = make_batch(grounded, masked)
    weights = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    with torch.no_grad():
        output = model(batch)
    for b in range(3):
        text, regions, region_ids, pooled = reference_sample(weights, batch, b, visual_ln, visual_size != HIDDEN)
        n_text = int(batch.text_mask[b].sum())
        torch.testing.assert_close(output.text_states[b, :n_text], text, atol=1e-10, rtol=0)
        torch.testing.assert_close(output.region_states[b, region_ids], regions, atol=1e-10, rtol=0)
        torch.testing.assert_close(output.pooled[b], pooled, atol=1e-10, rtol=0)
    assert torch.all(output.text_states[~batch.text_mask] == 0)
    assert torch.all(output.region_states[~batch.region_mask] == 0)


def test_reference_is_sensitive_to_the_visual_input():
    """Guards the test above: changing one region's feature changes the text states."""
    model = make_model()
    batch = make_batch()
    changed = batch.replace(region_features=batch.region_features.clone())
    changed.region_features[0, 0] += 1.0
    with torch.no_grad():
        assert not torch.allclose(model(batch).text_states[0], model(changed).text_states[0])


def test_attention_probabilities_sum_to_one_over_valid_keys():
    model = make_model()
    batch = make_batch()
    with torch.no_grad():
        output = model(batch, output_attentions=True)
        plain = model(batch)
    torch.testing.assert_close(output.sequence_states, plain.sequence_states, atol=1e-12, rtol=0)
    assert len(output.attentions) == LAYERS
    probabilities = output.attentions[0]
    mask = output.sequence_mask
    torch.testing.assert_close(probabilities.sum(-1), torch.ones_like(probabilities.sum(-1)))
    assert torch.all(probabilities.masked_select(~mask[:, None, None, :].expand_as(probabilities)) == 0)
