"""LXMERT from vlblocks' blocks equals HF transformers' LxmertForPreTraining, weights convert both
ways, and the two-stream blocks give rows without regions a defined meaning."""

import os

import pytest
import torch
from transformers import LxmertConfig, LxmertForPreTraining, LxmertModel

from vlblocks.app.recipes import model_from_recipe
from vlblocks.batch import VLBatch
from vlblocks.blocks import CoAttentionEncoder
from vlblocks.interop.hf_directory import read_hf_directory
from vlblocks.interop.hf_lxmert import from_hf, hf_config, to_hf
from vlblocks.train.checkpoint import CheckpointError

RECIPES = os.path.join(os.path.dirname(__file__), "..", "..", "recipes")
LXMERT_RECIPE = os.path.join(RECIPES, "variants", "lxmert.gin")
TINY = dict(
    vocab_size=50, hidden_size=32, num_attention_heads=4, intermediate_size=48, l_layers=2, r_layers=1, x_layers=2,
    visual_feat_dim=12, visual_pos_dim=4, num_object_labels=7, num_attr_labels=5, max_position_embeddings=24, type_vocab_size=2,
    task_qa=False,
)
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def tiny_bindings(config: LxmertConfig, outputs: dict | None = None) -> list[str]:
    """The `--bind` lines that size recipes/variants/lxmert.gin like `config`."""
    bindings = [
        f"HIDDEN_SIZE = {config.hidden_size}", f"TEXT_LAYERS = {config.l_layers}", f"REGION_LAYERS = {config.r_layers}",
        f"CROSS_LAYERS = {config.x_layers}", f"NUM_HEADS = {config.num_attention_heads}",
        f"INTERMEDIATE_SIZE = {config.intermediate_size}", f"VOCAB_SIZE = {config.vocab_size}",
        f"MAX_POSITIONS = {config.max_position_embeddings}", f"APPEARANCE_SIZE = {config.visual_feat_dim}",
        f"NUM_OBJECT_LABELS = {config.num_object_labels}", f"NUM_ATTRIBUTE_LABELS = {config.num_attr_labels}",
    ]
    if outputs is not None:
        bindings.append(f"RegionPredictionHead.outputs = {outputs!r}")
    return bindings


def save_random_lxmert(directory, seed: int = 0, **overrides) -> None:
    """A random `LxmertForPreTraining` with every tensor perturbed (LayerNorms and biases too,
    which the initialisation leaves at 1 / 0), saved by transformers."""
    torch.manual_seed(seed)
    model = LxmertForPreTraining(LxmertConfig(**{**TINY, **overrides}))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    model.save_pretrained(directory)


def read_directory(directory) -> tuple[dict, LxmertConfig]:
    """(tensors as saved, config) of a transformers folder, read as `vlblocks convert hf` reads it."""
    config, state = read_hf_directory(directory)
    assert isinstance(config, LxmertConfig)
    return state, config


@pytest.fixture(scope="module")
def hf_directory(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lxmert")
    save_random_lxmert(directory)
    return directory


def converted_pair(directory, dtype: torch.dtype):
    """(HF model, vlblocks model built by the recipe with the converted weights), eval, `dtype`."""
    state, config = read_directory(directory)
    hf = LxmertForPreTraining.from_pretrained(directory).eval().to(dtype)
    ours = model_from_recipe(LXMERT_RECIPE, tiny_bindings(config)).eval()
    ours.load_state_dict(from_hf(state, config), strict=True)
    return hf, ours.to(dtype), config


def padded_inputs(config: LxmertConfig, dtype: torch.dtype, seed: int = 1):
    """Uneven text (7, 4, 2 tokens; row 0 with a segment B) and regions (5, 3, 1), garbage at
    every padded region. Returns (VLBatch, HF keyword arguments)."""
    generator = torch.Generator().manual_seed(seed)
    lengths, counts, (batch, length, regions) = [7, 4, 2], [5, 3, 1], (3, 7, 5)
    text_mask = torch.arange(length)[None] < torch.tensor(lengths)[:, None]
    region_mask = torch.arange(regions)[None] < torch.tensor(counts)[:, None]
    text_ids = torch.randint(1, config.vocab_size, (batch, length), generator=generator).masked_fill(~text_mask, 0)
    segment_ids = torch.zeros(batch, length, dtype=torch.long)
    segment_ids[0, 4:] = 1
    image_sizes = torch.tensor([[640.0, 480.0], [500.0, 375.0], [300.0, 400.0]], dtype=dtype)
    corners = torch.rand(batch, regions, 2, generator=generator, dtype=dtype) * image_sizes[:, None] / 2
    sizes = torch.rand(batch, regions, 2, generator=generator, dtype=dtype) * image_sizes[:, None] / 2
    boxes = torch.cat([corners, corners + sizes], -1)
    features = torch.randn(batch, regions, config.visual_feat_dim, generator=generator, dtype=dtype)
    ours = VLBatch(
        text_ids=text_ids, segment_ids=segment_ids, text_mask=text_mask, boxes=boxes, region_mask=region_mask,
        image_sizes=image_sizes, region_features=features,
    )
    hf = dict(
        input_ids=text_ids, token_type_ids=segment_ids, attention_mask=text_mask.to(dtype), visual_feats=features,
        visual_pos=boxes / image_sizes.repeat(1, 2)[:, None], visual_attention_mask=region_mask.to(dtype),
    )
    return ours, hf


def assert_equal_at(ours, expected, atol, where=None):
    """Equal within `atol` (rtol 0), at all positions or at the `where` [B, N] positions."""
    assert ours.shape == expected.shape
    if where is not None:
        ours, expected = ours[where], expected[where]
    torch.testing.assert_close(ours, expected, atol=atol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_every_output_equals_hf_lxmert_with_padding(hf_directory, dtype):
    """Per-layer streams, the three attention families, the stream outputs, pooled output, MLM
    logits, matching score and region predictions equal HF's. The region stream is compared at
    valid regions: vlblocks' region embedding is 0 at padded regions, HF's embeds the padding's
    features (neither reaches a valid position; the next test aligns them)."""
    atol = TOLERANCE[dtype]
    hf, ours, config = converted_pair(hf_directory, dtype)
    batch, hf_inputs = padded_inputs(config, dtype)
    text_valid, region_valid = batch.text_mask, batch.region_mask
    with torch.no_grad():
        expected = hf(**hf_inputs, output_attentions=True, output_hidden_states=True)
        expected_model = hf.lxmert(**hf_inputs)
        core = ours.vlbert(batch, output_attentions=True, output_hidden_states=True)
        streams = core.streams
        assert len(streams.text_hidden_states) == len(expected.language_hidden_states) == config.l_layers + config.x_layers
        assert len(streams.region_hidden_states) == len(expected.vision_hidden_states) == config.r_layers + config.x_layers
        for mine, theirs in zip(streams.text_hidden_states, expected.language_hidden_states):
            assert_equal_at(mine, theirs, atol)
        for mine, theirs in zip(streams.region_hidden_states, expected.vision_hidden_states):
            assert_equal_at(mine, theirs, atol, region_valid)
        for family, (mine, theirs) in {
            "language": (streams.text_attentions, expected.language_attentions),
            "cross": (streams.cross_attentions, expected.cross_encoder_attentions),
        }.items():
            assert len(mine) == len(theirs), family
            for layer_mine, layer_theirs in zip(mine, theirs):
                assert_equal_at(layer_mine, layer_theirs, atol)
        assert len(streams.region_attentions) == len(expected.vision_attentions) == config.r_layers
        for mine, theirs in zip(streams.region_attentions, expected.vision_attentions):  # queries at valid regions
            assert_equal_at(mine.transpose(1, 2), theirs.transpose(1, 2), atol, region_valid)

        assert_equal_at(streams.text, expected_model.language_output, atol)
        assert_equal_at(core.text_states, expected_model.language_output, atol, text_valid)
        assert not core.text_states[~text_valid].any()
        assert_equal_at(streams.regions, expected_model.vision_output, atol, region_valid)
        assert_equal_at(core.region_states, expected_model.vision_output, atol, region_valid)
        assert not core.region_states[~region_valid].any()
        assert_equal_at(core.pooled, expected_model.pooled_output, atol)

        assert_equal_at(ours.mlm_head(streams.text), expected.prediction_logits, atol)
        assert_equal_at(ours.relation_head(core.pooled), expected.cross_relationship_score, atol)
        theirs = hf.obj_predict_head(expected_model.vision_output)
        mine = ours.visual_head(streams.regions)
        assert set(mine) == {"object", "attribute", "feature"}
        for name, hf_name in (("object", "obj"), ("attribute", "attr"), ("feature", "feat")):
            assert_equal_at(mine[name], theirs[hf_name], atol, region_valid)

        # The default path (scaled_dot_product_attention, no probabilities) and the model's own
        # forward, which scores only selected tokens and regions.
        plain = ours.vlbert(batch)
        assert_equal_at(plain.streams.text, expected_model.language_output, atol)
        assert_equal_at(plain.streams.regions, expected_model.vision_output, atol, region_valid)
        assert_equal_at(plain.pooled, expected_model.pooled_output, atol)
        tokens, regions = torch.tensor([[0, 1], [1, 3], [2, 0]]), torch.tensor([[0, 4], [1, 2], [2, 0]])
        output = ours(batch, token_select=tokens, region_select=regions)
        assert_equal_at(output.mlm_logits, expected.prediction_logits[tokens[:, 0], tokens[:, 1]], atol)
        assert_equal_at(output.relation_logits, expected.cross_relationship_score, atol)
        assert_equal_at(output.visual_predictions["object"], theirs["obj"][regions[:, 0], regions[:, 1]], atol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_region_stream_equals_hf_everywhere_padding_included(hf_directory, dtype):
    """The recipe embeds padded regions as transformers does (`zero_padding = False`), so the
    region stream, its attentions and the region predictions equal HF's at every position."""
    atol = TOLERANCE[dtype]
    hf, ours, config = converted_pair(hf_directory, dtype)
    batch, hf_inputs = padded_inputs(config, dtype, seed=2)
    with torch.no_grad():
        expected = hf(**hf_inputs, output_attentions=True, output_hidden_states=True)
        vision_output = expected.vision_hidden_states[-1]
        core = ours.vlbert(batch, output_attentions=True, output_hidden_states=True)
    for mine, theirs in zip(core.streams.region_hidden_states, expected.vision_hidden_states):
        assert_equal_at(mine, theirs, atol)
    for mine, theirs in zip(core.streams.region_attentions, expected.vision_attentions):
        assert_equal_at(mine, theirs, atol)
    with torch.no_grad():
        theirs = hf.obj_predict_head(vision_output)
        mine = ours.visual_head(core.streams.regions)
    for name, hf_name in (("object", "obj"), ("attribute", "attr"), ("feature", "feat")):
        assert_equal_at(mine[name], theirs[hf_name], atol)


def test_round_trip_is_identical_and_loads_strictly_into_transformers(hf_directory):
    state, config = read_directory(hf_directory)
    ours_state = from_hf(state, config)
    model = model_from_recipe(LXMERT_RECIPE, tiny_bindings(config))
    model.load_state_dict(ours_state, strict=True)
    assert set(ours_state) == set(model.state_dict())
    assert ours_state["mlm_head.decoder.weight"] is ours_state["vlbert.text_embedding.word_embeddings.weight"]

    exported_config = hf_config(model)
    assert exported_config.architectures == ["LxmertForPreTraining"]
    for field in (*TINY, "hidden_act", "task_obj_predict", "visual_obj_loss", "visual_attr_loss", "visual_feat_loss"):
        assert getattr(exported_config, field) == getattr(config, field), field
    back = to_hf(model.state_dict(), exported_config)
    hf = LxmertForPreTraining(exported_config)
    assert set(back) == set(hf.state_dict())
    assert set(back) == set(state) | {"cls.predictions.decoder.weight"}
    for key, value in state.items():
        assert torch.equal(back[key], value), key
    assert torch.equal(back["cls.predictions.decoder.weight"], state["lxmert.embeddings.word_embeddings.weight"])
    hf.load_state_dict(back, strict=True)
    # A vlblocks checkpoint stores the tied pair once (under the decoder's name): the same export.
    stored_once = {key: value for key, value in model.state_dict().items() if key != "vlbert.text_embedding.word_embeddings.weight"}
    assert all(torch.equal(back[key], value) for key, value in to_hf(stored_once, exported_config).items())


def test_core_keys_with_or_without_prefix_give_the_core(hf_directory):
    state, config = read_directory(hf_directory)
    full = from_hf(state, config)
    core_state = LxmertModel.from_pretrained(hf_directory).state_dict()
    assert not any(key.startswith("lxmert.") for key in core_state)
    for given in (core_state, {f"lxmert.{key}": value for key, value in core_state.items()}):
        converted = from_hf(given, config)
        assert set(converted) == {key for key in full if key.startswith("vlbert.")}
        assert all(torch.equal(value, full[key]) for key, value in converted.items())
    core = model_from_recipe(LXMERT_RECIPE, tiny_bindings(config)).vlbert
    core.load_state_dict({key[len("vlbert.") :]: value for key, value in converted.items()}, strict=True)
    core_config = hf_config(core)
    assert core_config.architectures == ["LxmertModel"]
    for field in ("hidden_size", "l_layers", "r_layers", "x_layers", "visual_feat_dim", "vocab_size", "intermediate_size"):
        assert getattr(core_config, field) == getattr(config, field), field


@pytest.mark.parametrize(
    "overrides, outputs",
    [
        (dict(visual_attr_loss=False), {"object": 7, "feature": 12}),
        (dict(visual_obj_loss=False, visual_feat_loss=False), {"attribute": 5}),
        (dict(task_obj_predict=False), None),
    ],
    ids=["no-attributes", "attributes-only", "no-visual-head"],
)
def test_visual_losses_follow_the_visual_head(tmp_path, overrides, outputs):
    save_random_lxmert(tmp_path, seed=3, **overrides)
    state, config = read_directory(tmp_path)
    bindings = tiny_bindings(config, outputs) if outputs is not None else [*tiny_bindings(config), "VLBertForPretraining.visual_head = None"]
    model = model_from_recipe(LXMERT_RECIPE, bindings)
    model.load_state_dict(from_hf(state, config), strict=True)
    exported = hf_config(model)
    for field in ("task_obj_predict", "visual_obj_loss", "visual_attr_loss", "visual_feat_loss"):
        if exported.task_obj_predict or field == "task_obj_predict":
            assert getattr(exported, field) == getattr(config, field), field
    LxmertForPreTraining(exported).load_state_dict(to_hf(model.state_dict(), exported), strict=True)


def test_unknown_missing_and_misshapen_keys_fail_by_name(hf_directory):
    state, config = read_directory(hf_directory)
    with pytest.raises(CheckpointError, match=r"unknown keys cls\.extra\.weight"):
        from_hf({**state, "cls.extra.weight": torch.zeros(1)}, config)
    missing = dict(state)
    del missing["lxmert.encoder.x_layers.1.visn_output.dense.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys lxmert\.encoder\.x_layers\.1\.visn_output\.dense\.bias"):
        from_hf(missing, config)
    headless = {key: value for key, value in state.items() if not key.startswith("obj_predict_head.")}
    with pytest.raises(CheckpointError, match=r"missing keys obj_predict_head\.decoder_dict\.attr\.bias"):
        from_hf(headless, config)
    with pytest.raises(CheckpointError, match=r"'lxmert\.pooler\.dense\.bias' \(31,\) \(config: \(32,\)\)"):
        from_hf({**state, "lxmert.pooler.dense.bias": torch.zeros(31)}, config)
    untied = {**state, "cls.predictions.decoder.weight": state["lxmert.embeddings.word_embeddings.weight"] + 1}
    with pytest.raises(CheckpointError, match="differs from 'lxmert.embeddings.word_embeddings.weight'"):
        from_hf(untied, config)
    with pytest.raises(CheckpointError, match="both with and without"):
        from_hf({**state, "pooler.dense.bias": state["lxmert.pooler.dense.bias"]}, config)


def test_configs_and_heads_vlblocks_does_not_reproduce_are_refused(hf_directory, tmp_path):
    state, config = read_directory(hf_directory)
    relu = LxmertConfig(**{**TINY, "hidden_act": "relu"})
    with pytest.raises(CheckpointError, match="hidden_act is 'relu'"):
        from_hf(state, relu)
    save_random_lxmert(tmp_path, seed=4, task_qa=True, num_qa_labels=6)
    qa_state, qa_config = read_directory(tmp_path)
    with pytest.raises(CheckpointError, match=r"answer_head\.logit_fc\.0\.bias.*no vlblocks counterpart"):
        from_hf(qa_state, qa_config)
    core_only = {key: value for key, value in qa_state.items() if key.startswith("lxmert.")}
    assert set(from_hf(core_only, qa_config)) == {key for key in from_hf(state, config) if key.startswith("vlbert.")}
    model = model_from_recipe(LXMERT_RECIPE, tiny_bindings(config))
    with pytest.raises(CheckpointError, match="task_qa=True"):
        to_hf(model.state_dict(), qa_config)


def test_models_that_are_not_lxmert_shaped_are_refused(hf_directory):
    config = read_directory(hf_directory)[1]
    bindings = tiny_bindings(config)
    with pytest.raises(CheckpointError, match="the core is a VLBert, not a TwoStreamModel"):
        hf_config(model_from_recipe(os.path.join(RECIPES, "models", "vlbert_tiny.gin")))
    with_region_head = model_from_recipe(LXMERT_RECIPE, [*bindings, "VLBertForPretraining.region_head = @MaskedRegionHead()"])
    with pytest.raises(CheckpointError, match="masked-region head"):
        hf_config(with_region_head)
    with pytest.raises(CheckpointError, match=r"keys with no place in an HF LxmertForPreTraining: region_head\."):
        to_hf(with_region_head.state_dict(), config)
    with pytest.raises(CheckpointError, match="visual_embedding.box_norm"):
        hf_config(model_from_recipe(LXMERT_RECIPE, [*bindings, "AveragedRegionFeatureEmbedding.layer_norm_eps = 1e-6"]))
    with pytest.raises(CheckpointError, match="relation head"):
        hf_config(model_from_recipe(LXMERT_RECIPE, [*bindings, "VLBertForPretraining.relation_head = None"]))
    with pytest.raises(CheckpointError, match=r"decoders \['box'\]"):
        hf_config(model_from_recipe(LXMERT_RECIPE, [*bindings, "RegionPredictionHead.outputs = {'object': 7, 'box': 4}"]))


def random_streams(generator, batch=3, length=6, regions=4, hidden=32):
    return (torch.randn(batch, length, hidden, generator=generator, dtype=torch.float64),
            torch.randn(batch, regions, hidden, generator=generator, dtype=torch.float64))


def test_a_row_without_regions_reads_no_region_and_stays_finite():
    """vlblocks' semantic (HF has none: its softmax over an all-masked row averages the padding):
    a row with no valid region gets zero context from the regions, so its text stream equals the
    text-only computation (no region tensor at all) and ignores whatever the padding holds; the
    other rows are unaffected; values and gradients are finite."""
    torch.manual_seed(0)
    encoder = CoAttentionEncoder(2, 1, 2, 32, 4, 48, dropout=0.0, attention_dropout=0.0).double().eval()
    generator = torch.Generator().manual_seed(5)
    text, regions = random_streams(generator)
    text.requires_grad_(True)
    text_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    region_mask = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    for attentions in (False, True):
        out = encoder(text, text_mask, regions, region_mask, output_hidden_states=True, output_attentions=attentions)
        for tensor in (out.text, out.regions, *out.text_hidden_states, *out.region_hidden_states):
            assert torch.isfinite(tensor).all()
        alone = encoder(text[1:2], text_mask[1:2], regions[1:2, :0], region_mask[1:2, :0])
        torch.testing.assert_close(out.text[1], alone.text[0], atol=1e-12, rtol=0)
        other_padding = encoder(text, text_mask, torch.where(region_mask[..., None], regions, 7.0), region_mask)
        torch.testing.assert_close(other_padding.text, out.text, atol=1e-12, rtol=0)
        for row in (0, 2):
            single = encoder(text[row : row + 1], text_mask[row : row + 1], regions[row : row + 1], region_mask[row : row + 1])
            torch.testing.assert_close(out.text[row], single.text[0], atol=1e-12, rtol=0)
        if attentions:
            assert all(not probabilities[1].any() for probabilities in out.cross_attentions)
            assert all(torch.isfinite(probabilities).all() for probabilities in (*out.region_attentions, *out.cross_attentions))
        (gradient,) = torch.autograd.grad(out.text[text_mask].sum() + out.regions[region_mask].sum(), text)
        assert torch.isfinite(gradient).all()


def test_two_stream_model_zeroes_empty_rows_and_runs_text_only(hf_directory):
    """Through `TwoStreamModel`: the region states of a row without regions are 0; and the
    text-only path (`encode` with zero regions, as the text-only objective calls it) gives that
    row's text states, finite, with a [B, 0, H] region stream."""
    config = read_directory(hf_directory)[1]
    model = model_from_recipe(LXMERT_RECIPE, [*tiny_bindings(config), "DROPOUT = 0.0"]).double().eval()
    batch, _ = padded_inputs(config, torch.float64, seed=6)
    batch = batch.replace(region_mask=batch.region_mask.clone())
    batch.region_mask[1] = False
    with torch.no_grad():
        core = model.vlbert(batch)
        assert torch.isfinite(core.text_states).all() and torch.isfinite(core.region_states).all()
        assert not core.region_states[1].any()
        no_regions = torch.zeros(batch.batch_size, 0, model.vlbert.visual_size, dtype=torch.float64)
        text_batch = batch.replace(boxes=batch.boxes[:, :0], region_mask=batch.region_mask[:, :0], region_features=batch.region_features[:, :0])
        text_only = model.vlbert.encode(text_batch, no_regions, no_regions[:, :1])
    assert text_only.region_states.shape == (batch.batch_size, 0, config.hidden_size)
    assert torch.isfinite(text_only.text_states).all() and torch.isfinite(text_only.pooled).all()
    torch.testing.assert_close(text_only.text_states[1], core.text_states[1], atol=1e-12, rtol=0)
    assert not text_only.text_states[~batch.text_mask].any()
