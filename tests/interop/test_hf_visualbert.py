"""VisualBERT: vlblocks' blocks against transformers' `VisualBertForPreTraining` / `VisualBertModel`.

The reference models are built by transformers itself from small random configs, every tensor
drawn at random (so a swapped table or a missed bias shows), saved with `save_pretrained` and
read back from the folder. Both models then run on the same padded batch: uneven text lengths,
uneven region counts, a segment B, and compared at every position, padded slots included
(the recipe binds `VisualFeatureEmbedding.zero_padding = False`: a padded region is projected
as transformers projects it, W·f + b, and masked out of attention in both).
"""

from pathlib import Path

import pytest
import torch
from transformers import VisualBertConfig, VisualBertForPreTraining, VisualBertModel

from vlblocks.batch import VLBatch
from vlblocks.blocks import MaskedLMHead, Pooler, PrecomputedRegionFeatures, RelationHead, TransformerEncoder, VisualFeatureEmbedding, VLEmbedding
from vlblocks.interop.hf_directory import read_hf_directory
from vlblocks.interop.hf_visualbert import check_config, from_hf, hf_config, to_hf
from vlblocks.models import VLBert, VLBertForPretraining
from vlblocks.train.checkpoint import CheckpointError

VOCAB, HIDDEN, LAYERS, HEADS, FFN, FEATURES, POSITIONS = 50, 32, 2, 4, 64, 12, 64
RECIPES = Path(__file__).resolve().parents[2] / "recipes"
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-5}


def tiny_config(**overrides):
    fields = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
        visual_embedding_dim=FEATURES, max_position_embeddings=POSITIONS, type_vocab_size=2,
    )
    return VisualBertConfig(**{**fields, **overrides})


def model_from_config(config, heads=True):
    """The vlblocks VisualBERT a `VisualBertConfig` describes, from the blocks (as
    recipes/variants/visualbert.gin binds them); `heads=False`: the core alone."""
    check_config(config)
    hidden, eps = config.hidden_size, config.layer_norm_eps
    core = VLBert(
        region_features=PrecomputedRegionFeatures(config.visual_embedding_dim),
        visual_embedding=VisualFeatureEmbedding(config.visual_embedding_dim, hidden, geometry=None, dropout=0.0, activation=None, zero_padding=False),
        embedding=VLEmbedding(
            config.vocab_size, hidden, visual_size=hidden, max_position_embeddings=config.max_position_embeddings,
            type_vocab_size=config.type_vocab_size, layer_norm_eps=eps, dropout=config.hidden_dropout_prob, layout="concatenated",
            end_token=False, text_visual_term=False, region_token=False, region_visual_term=False, region_positions="zero",
            separate_region_tables=True, region_segment=1,
        ),
        encoder=TransformerEncoder(
            config.num_hidden_layers, hidden, config.num_attention_heads, config.intermediate_size,
            dropout=config.hidden_dropout_prob, attention_dropout=config.attention_probs_dropout_prob, layer_norm_eps=eps,
        ),
        pooler=Pooler(hidden),
    )
    if not heads:
        return VLBertForPretraining(core)
    return VLBertForPretraining(core, mlm_head=MaskedLMHead(hidden, config.vocab_size, eps), relation_head=RelationHead(hidden))


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, randomised):
    """A random VisualBertForPreTraining saved by transformers, and the model itself."""
    folder = tmp_path_factory.mktemp("visualbert")
    model = randomised(VisualBertForPreTraining(tiny_config()))
    model.save_pretrained(folder)
    return folder, model


def padded_inputs(dtype, region_counts=(4, 2, 3), seed=1):
    """transformers keyword arguments and the equal `VLBatch`: text of 5, 3 and 6 tokens padded
    to 6 (pad id 0), segment B in two rows, `region_counts` regions padded to the largest."""
    generator = torch.Generator().manual_seed(seed)
    text_mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    text_ids = torch.randint(2, VOCAB, text_mask.shape, generator=generator).masked_fill(~text_mask, 0)
    segment_ids = torch.zeros_like(text_ids)
    segment_ids[0, 3:5] = 1
    segment_ids[2, 4:] = 1
    regions = max(region_counts)
    region_mask = torch.arange(regions)[None, :] < torch.tensor(region_counts)[:, None]
    features = torch.randn(len(region_counts), regions, FEATURES, generator=generator, dtype=dtype).masked_fill(~region_mask[..., None], 0.0)
    hf_inputs = dict(
        input_ids=text_ids, attention_mask=text_mask.long(), token_type_ids=segment_ids,
        visual_embeds=features, visual_attention_mask=region_mask.long(),
    )
    boxes = torch.tensor([0.0, 0.0, 10.0, 10.0], dtype=dtype).expand(len(region_counts), regions, 4)
    batch = VLBatch(text_ids, segment_ids, text_mask, boxes, region_mask, torch.full((len(region_counts), 2), 10.0, dtype=dtype), region_features=features)
    return hf_inputs, batch


def converted_model(folder, dtype):
    config, state = read_hf_directory(folder)
    model = model_from_config(config)
    model.load_state_dict(from_hf(state, config), strict=True)
    return model.to(dtype).eval()


def compared_slots(batch):
    """[B, L + N] bool: every slot, padded text and padded regions included."""
    return torch.ones_like(torch.cat([batch.text_mask, batch.region_mask], dim=1))


def assert_close(ours, theirs, tolerance, what):
    assert ours.shape == theirs.shape, what
    difference = (ours - theirs).abs().max().item() if ours.numel() else 0.0
    assert difference <= tolerance, f"{what}: max difference {difference:.3g} > {tolerance}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_output_equals_transformers_on_a_padded_batch(hf_folder, dtype):
    folder, _ = hf_folder
    tolerance = TOLERANCES[dtype]
    reference = VisualBertForPreTraining.from_pretrained(folder).to(dtype).eval()
    model = converted_model(folder, dtype)
    hf_inputs, batch = padded_inputs(dtype)
    slots = compared_slots(batch)
    with torch.no_grad():
        theirs = reference(**hf_inputs, output_hidden_states=True, output_attentions=True)
        theirs_core = reference.visual_bert(**hf_inputs)
        ours = model.vlbert(batch, output_hidden_states=True, output_attentions=True)
        ours_fast = model.vlbert(batch)  # without probabilities: the scaled_dot_product_attention path
        prediction_logits = model.mlm_head(ours.sequence_states)
        relation_logits = model.relation_head(ours.pooled)

    assert len(ours.hidden_states) == len(theirs.hidden_states) == LAYERS + 1
    for index, (mine, reference_states) in enumerate(zip(ours.hidden_states, theirs.hidden_states)):
        assert_close(mine[slots], reference_states[slots], tolerance, f"hidden_states[{index}]")
    assert len(ours.attentions) == len(theirs.attentions) == LAYERS
    for index, (mine, reference_probabilities) in enumerate(zip(ours.attentions, theirs.attentions)):
        rows = slots[:, None, :, None].expand_as(mine)  # every query, every key
        assert_close(mine[rows], reference_probabilities[rows], tolerance, f"attentions[{index}]")
        padded_keys = ~ours.sequence_mask[:, None, None, :].expand_as(mine)
        assert mine[padded_keys].abs().max() == 0 and reference_probabilities[padded_keys].abs().max() == 0
    assert_close(ours.sequence_states[slots], theirs_core.last_hidden_state[slots], tolerance, "last_hidden_state")
    assert_close(ours_fast.sequence_states[slots], theirs_core.last_hidden_state[slots], tolerance, "last_hidden_state (SDPA)")
    assert_close(ours.pooled, theirs_core.pooler_output, tolerance, "pooler_output")
    assert_close(prediction_logits[slots], theirs.prediction_logits[slots], tolerance, "prediction_logits")
    assert_close(relation_logits, theirs.seq_relationship_logits, tolerance, "seq_relationship_logits")
    # The text states in input order are the sequence's first L slots, zeroed at padding.
    assert torch.equal(ours.text_states, ours.sequence_states[:, : batch.text_ids.shape[1]] * batch.text_mask[..., None])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_without_padded_regions_every_position_equals_transformers(hf_folder, dtype):
    folder, _ = hf_folder
    tolerance = TOLERANCES[dtype]
    reference = VisualBertForPreTraining.from_pretrained(folder).to(dtype).eval()
    model = converted_model(folder, dtype)
    hf_inputs, batch = padded_inputs(dtype, region_counts=(3, 3, 3))
    with torch.no_grad():
        theirs = reference(**hf_inputs, output_hidden_states=True, output_attentions=True)
        ours = model.vlbert(batch, output_hidden_states=True, output_attentions=True)
        prediction_logits = model.mlm_head(ours.sequence_states)
    for index, (mine, reference_states) in enumerate(zip(ours.hidden_states, theirs.hidden_states)):
        assert_close(mine, reference_states, tolerance, f"hidden_states[{index}]")
    for index, (mine, reference_probabilities) in enumerate(zip(ours.attentions, theirs.attentions)):
        assert_close(mine, reference_probabilities, tolerance, f"attentions[{index}]")
    assert_close(prediction_logits, theirs.prediction_logits, tolerance, "prediction_logits")
    assert_close(model.relation_head(ours.pooled), theirs.seq_relationship_logits, tolerance, "seq_relationship_logits")


def test_from_hf_then_to_hf_gives_back_every_tensor(hf_folder):
    folder, reference = hf_folder
    config, saved = read_hf_directory(folder)
    assert "cls.predictions.decoder.weight" not in saved  # save_pretrained leaves the tied copies out
    converted = from_hf(saved, config)
    model = model_from_config(config)
    assert set(converted) == set(model.state_dict())
    back = to_hf(converted, config)
    expected = reference.state_dict()
    assert set(back) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(back[key], tensor), key
    # The tied copies may also be given, and then must equal what they are tied to; an old
    # file's position_ids buffer is dropped.
    assert set(from_hf(expected, config)) == set(converted)
    old_buffer = {"visual_bert.embeddings.position_ids": torch.arange(POSITIONS)[None]}
    assert set(from_hf({**saved, **old_buffer}, config)) == set(converted)


def test_hf_config_describes_the_converted_model(hf_folder):
    folder, reference = hf_folder
    model = converted_model(folder, torch.float32)
    described = hf_config(model).to_dict()
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
                 "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "visual_embedding_dim", "bypass_transformer"):
        assert described[name] == reference.config.to_dict()[name], name
    assert described["architectures"] == ["VisualBertForPreTraining"]
    # A freshly built transformers model from that config takes the converted tensors strictly.
    VisualBertForPreTraining(hf_config(model)).load_state_dict(to_hf(model.state_dict(), hf_config(model)), strict=True)


@pytest.mark.parametrize("prefix", ["", "visual_bert."])
def test_visual_bert_model_keys_convert_to_the_core(tmp_path, prefix, randomised):
    reference = randomised(VisualBertModel(tiny_config()), seed=3)
    reference.save_pretrained(tmp_path)
    config, state = read_hf_directory(tmp_path)
    converted = from_hf({prefix + key: value for key, value in state.items()}, config)
    assert all(key.startswith("vlbert.") for key in converted)
    model = model_from_config(config, heads=False)
    model.load_state_dict(converted, strict=True)
    model.to(torch.float64).eval()
    hf_inputs, batch = padded_inputs(torch.float64)
    slots = compared_slots(batch)
    with torch.no_grad():
        theirs = reference.to(torch.float64)(**hf_inputs)
        ours = model.vlbert(batch)
    assert_close(ours.sequence_states[slots], theirs.last_hidden_state[slots], 1e-10, "last_hidden_state")
    assert_close(ours.pooled, theirs.pooler_output, 1e-10, "pooler_output")
    # The heads are not there: a model with heads cannot take these tensors strictly.
    with pytest.raises(RuntimeError, match="mlm_head"):
        model_from_config(config).load_state_dict(converted, strict=True)
    assert hf_config(model).architectures == ["VisualBertModel"]


def test_a_visual_bert_model_without_pooler_converts(tmp_path, randomised):
    reference = randomised(VisualBertModel(tiny_config(), add_pooling_layer=False), seed=4)
    config = reference.config
    converted = from_hf(reference.state_dict(), config)
    assert not any(key.startswith("vlbert.pooler.") for key in converted)


def test_from_hf_names_unknown_missing_misshapen_and_untied_keys(hf_folder):
    folder, reference = hf_folder
    config = reference.config
    state = reference.state_dict()
    with pytest.raises(CheckpointError, match="cls.weight"):
        from_hf({**state, "cls.weight": torch.zeros(3, HIDDEN)}, config)  # a VisualBertForQuestionAnswering head
    without = {key: value for key, value in state.items() if key != "visual_bert.encoder.layer.1.output.dense.bias"}
    with pytest.raises(CheckpointError, match=r"lack visual_bert.encoder.layer.1.output.dense.bias"):
        from_hf(without, config)
    no_matching_head = {key: value for key, value in state.items() if not key.startswith("cls.seq_relationship.")}
    with pytest.raises(CheckpointError, match=r"cls.seq_relationship.bias, cls.seq_relationship.weight"):
        from_hf(no_matching_head, config)
    misshapen = {**state, "visual_bert.embeddings.visual_projection.weight": torch.zeros(HIDDEN, FEATURES + 1)}
    with pytest.raises(CheckpointError, match=r"visual_projection.weight \(32, 13\)"):
        from_hf(misshapen, config)
    untied = {**state, "cls.predictions.decoder.weight": state["cls.predictions.decoder.weight"] + 1}
    with pytest.raises(CheckpointError, match="differs from 'visual_bert.embeddings.word_embeddings.weight'"):
        from_hf(untied, config)
    twice = {**state, "embeddings.LayerNorm.bias": state["visual_bert.embeddings.LayerNorm.bias"]}
    with pytest.raises(CheckpointError, match="twice"):
        from_hf(twice, config)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(bypass_transformer=True), "bypass_transformer=True"),
        (dict(hidden_act="relu"), "hidden_act is 'relu'"),
        (dict(tie_word_embeddings=False), "tie_word_embeddings=False"),
    ],
)
def test_configs_vlblocks_does_not_reproduce_are_refused(hf_folder, overrides, message):
    _, reference = hf_folder
    config = tiny_config(**overrides)
    with pytest.raises(CheckpointError, match=message):
        from_hf(reference.state_dict(), config)
    with pytest.raises(CheckpointError, match=message):
        to_hf(converted_model(hf_folder[0], torch.float32).state_dict(), config)


def test_to_hf_refuses_tensors_visualbert_has_no_place_for(hf_folder):
    folder, _ = hf_folder
    model = converted_model(folder, torch.float32)
    state = model.state_dict()
    with pytest.raises(CheckpointError, match="region_head.region_cls_pred.weight"):
        to_hf({**state, "region_head.region_cls_pred.weight": torch.zeros(3, HIDDEN)}, hf_config(model))
    core_only = {key: value for key, value in state.items() if key.startswith("vlbert.")}
    with pytest.raises(CheckpointError, match="cls.predictions.bias"):
        to_hf(core_only, hf_config(model))


def test_hf_config_refuses_models_that_are_not_visualbert_shaped(hf_folder):
    folder, _ = hf_folder
    model = converted_model(folder, torch.float32)
    model.vlbert.embedding.layout = "packed"
    with pytest.raises(CheckpointError, match="not VisualBERT-shaped: VLEmbedding.layout is 'packed'"):
        hf_config(model)
    model.vlbert.embedding.layout = "concatenated"
    one_head = VLBertForPretraining(model.vlbert, mlm_head=model.mlm_head)
    with pytest.raises(CheckpointError, match="one of them"):
        hf_config(one_head)
    model.vlbert.visual_embedding.dropout.p = 0.1
    with pytest.raises(CheckpointError, match="dropout=0.0"):
        hf_config(model)


def test_vlbert_is_refused_by_hf_config():
    from vlblocks.app.recipes import model_from_recipe

    vlbert = model_from_recipe(RECIPES / "models" / "vlbert_tiny.gin", ["VLBertForPretraining.region_head = None"], echo=lambda line: None)
    with pytest.raises(CheckpointError, match="not VisualBERT-shaped: VLBert.region_features is EndToEndRegionFeatures"):
        hf_config(vlbert)
