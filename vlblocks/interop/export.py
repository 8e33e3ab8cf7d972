"""Weights out: a VL-BERT's text Transformer as a `transformers.BertModel` directory.

The names come from `hf_bert.target_name` read backwards: for every key of a `BertModel` of the
same size, the VL-BERT tensor it would load into is the one written under that key. The visual
parts (region front end, visual terms, [IMG] and [END] rows) have no BERT counterpart and stay
out; the 3 segment rows (A, B, visual) all go, so the config says `type_vocab_size = 3`.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from vlblocks.interop.hf_bert import HF_BUFFERS, target_name
from vlblocks.models.vlbert import VLBert
from vlblocks.train.checkpoint import CheckpointError


def bert_config(vlbert: VLBert) -> dict:
    """The `BertConfig` fields of `vlbert`'s text side: sizes read from its modules."""
    embedding, layers = vlbert.embedding, vlbert.encoder.layer
    first = layers[0]
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": embedding.word_embeddings.num_embeddings,
        "hidden_size": embedding.hidden_size,
        "num_hidden_layers": len(layers),
        "num_attention_heads": first.attention.self.num_heads,
        "intermediate_size": first.intermediate.dense.out_features,
        "hidden_act": "gelu",  # the encoder's exact (erf) GELU
        "max_position_embeddings": embedding.position_embeddings.num_embeddings,
        "type_vocab_size": embedding.token_type_embeddings.num_embeddings,
        "layer_norm_eps": embedding.LayerNorm.eps,
        "hidden_dropout_prob": first.output.dropout.p,
        "attention_probs_dropout_prob": first.attention.self.dropout_p,
        "pad_token_id": 0,
    }


def bert_model_keys(config: dict, with_pooler: bool) -> list[str]:
    """The state-dict keys of a `transformers.BertModel` built from `config` (on the meta device,
    so nothing is allocated), its non-persistent buffers excepted."""
    import torch
    from transformers import BertConfig, BertModel  # heavy: imported only when exporting

    with torch.device("meta"):
        model = BertModel(BertConfig(**config), add_pooling_layer=with_pooler)
    return [key for key in model.state_dict() if key not in HF_BUFFERS]


def export_bert(vlbert: nn.Module, directory: str | Path) -> Path:
    """Write `config.json` and `model.safetensors` of `vlbert`'s text Transformer to `directory`
    (created), loadable with `BertModel.from_pretrained(directory)`; a VLBert without a pooler
    loads with `add_pooling_layer=False`.

    Raises:
        CheckpointError: `vlbert` is not a `VLBert`, or a BERT key finds no tensor in it.
    """
    if not isinstance(vlbert, VLBert):
        raise CheckpointError(f"only a VLBert's text Transformer exports as a BertModel, not a {type(vlbert).__name__}")
    config = bert_config(vlbert)
    ours = vlbert.state_dict()
    tensors = {}
    for key in bert_model_keys(config, with_pooler=vlbert.pooler is not None):
        name = target_name(key, "")
        if name is None or name not in ours:
            raise CheckpointError(f"BertModel key '{key}' has no tensor in the VLBert (looked for '{name}')")
        tensors[key] = ours[name].detach().cpu().contiguous().clone()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory
