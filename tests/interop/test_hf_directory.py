"""Reading transformers model folders: config.json plus single, sharded or PyTorch weights."""

import json

import pytest
import torch
from transformers import VisualBertConfig, VisualBertModel

from vlblocks.interop.hf_directory import read_hf_directory
from vlblocks.train.checkpoint import CheckpointError


def tiny_model():
    torch.manual_seed(0)
    config = VisualBertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, visual_embedding_dim=8)
    return VisualBertModel(config)


def assert_same_tensors(state, model):
    expected = model.state_dict()
    assert set(state) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(state[key], tensor), key


def test_a_save_pretrained_folder_reads_as_its_config_class_and_tensors(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    config, state = read_hf_directory(tmp_path)
    assert type(config).__name__ == "VisualBertConfig" and config.model_type == "visual_bert"
    assert config.hidden_size == 16 and config.visual_embedding_dim == 8
    assert_same_tensors(state, model)


def test_sharded_safetensors_are_read_through_their_index(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    _, state = read_hf_directory(tmp_path)
    assert_same_tensors(state, model)


def test_pytorch_model_bin_is_read_weights_only(tmp_path):
    model = tiny_model()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    _, state = read_hf_directory(tmp_path)
    assert_same_tensors(state, model)
    # Anything but tensors and plain data is refused, not unpickled.
    torch.save({"weights": model.state_dict(), "object": VisualBertConfig()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: not a readable PyTorch weights file"):
        read_hf_directory(tmp_path)


def test_unreadable_folders_raise_a_checkpoint_error_naming_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        read_hf_directory(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: cannot be read as JSON"):
        read_hf_directory(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(CheckpointError, match="no 'model_type' field"):
        read_hf_directory(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_model"}))
    with pytest.raises(CheckpointError, match="model_type 'no_such_model'"):
        read_hf_directory(tmp_path)
    tiny_model().config.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no weights"):
        read_hf_directory(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        read_hf_directory(tmp_path)
