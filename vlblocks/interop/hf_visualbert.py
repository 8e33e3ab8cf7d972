"""VisualBERT weights in both directions between transformers (`VisualBertModel`,
`VisualBertForPreTraining`) and vlblocks (`VLBertForPretraining` over a `VLBert` with
VisualBERT's blocks, as `recipes/variants/visualbert.gin` binds them).

| transformers (`VisualBertForPreTraining`) | vlblocks (`VLBertForPretraining`) |
|---|---|
| `visual_bert.embeddings.visual_projection` | `vlbert.visual_embedding.projection` |
| `visual_bert.embeddings.*` (word, position, token type, visual token type, visual position, LayerNorm) | `vlbert.embedding.*` (same names) |
| `visual_bert.encoder.*` | `vlbert.encoder.*` (same names) |
| `visual_bert.pooler.dense` | `vlbert.pooler.dense` |
| `cls.predictions.transform.*` | `mlm_head.transform.*` |
| `cls.predictions.bias` | `mlm_head.bias` |
| `cls.seq_relationship` | `relation_head.classifier` |
| `cls.predictions.decoder.weight` (tied) | `mlm_head.decoder.weight` (tied to the word embeddings) |
| `cls.predictions.decoder.bias` (tied to `cls.predictions.bias`) | (none: the head adds `mlm_head.bias`) |

A `VisualBertModel`'s keys (no prefix, or `visual_bert.`) convert to the core alone (`vlbert.*`);
its pooler may be missing (`add_pooling_layer=False`). The tied copies may be present or not; when
present they must equal the tensor they are tied to. An old file's `embeddings.position_ids`
buffer (0, 1, 2, ...) is dropped. Every other key must have its place and its shape, and every
place must be filled, or a `CheckpointError` names the keys.

What vlblocks does not reproduce is refused: `bypass_transformer=True` (the text-only encoder
plus one extra joint layer), a `hidden_act` other than "gelu" (the blocks' exact erf GELU),
untied word embeddings, and a model_type other than "visual_bert".

`hf_config` describes a vlblocks VisualBERT as a `VisualBertConfig`; it refuses a model that is
not VisualBERT-shaped, naming the first difference (the block classes are recognised by name:
interop does not import the blocks).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from vlblocks.models.pretraining import VLBertForPretraining
from vlblocks.models.vlbert import VLBert
from vlblocks.train.checkpoint import CheckpointError, listed_names

MODEL_TYPE = "visual_bert"
CORE = "visual_bert."
HEADS = "cls."
# (transformers prefix, vlblocks prefix): one ending with '.' renames the keys under it, one
# without renames that key. Longest first, so the visual projection wins over `embeddings.`.
RULES: tuple[tuple[str, str], ...] = (
    ("visual_bert.embeddings.visual_projection.", "vlbert.visual_embedding.projection."),
    ("visual_bert.embeddings.", "vlbert.embedding."),
    ("visual_bert.encoder.", "vlbert.encoder."),
    ("visual_bert.pooler.", "vlbert.pooler."),
    ("cls.predictions.transform.", "mlm_head.transform."),
    ("cls.predictions.bias", "mlm_head.bias"),
    ("cls.seq_relationship.", "relation_head.classifier."),
)
WORDS = "visual_bert.embeddings.word_embeddings.weight"
# transformers' tied copies → the key each is tied to.
HF_TIED = {"cls.predictions.decoder.weight": WORDS, "cls.predictions.decoder.bias": "cls.predictions.bias"}
OUR_TIED = {"mlm_head.decoder.weight": "vlbert.embedding.word_embeddings.weight"}
POOLER = "visual_bert.pooler."
OLD_BUFFERS = ("visual_bert.embeddings.position_ids",)
SHOWN = 6  # key names an error lists


def check_config(config: Any) -> None:
    """Refuse a transformers config that vlblocks' VisualBERT does not compute.

    Raises:
        CheckpointError: another model type, `bypass_transformer`, an activation other than
            the exact GELU, or untied word embeddings.
    """
    model_type = getattr(config, "model_type", None)
    if model_type != MODEL_TYPE:
        raise CheckpointError(f"config model_type is {model_type!r}, not {MODEL_TYPE!r}: this converter reads VisualBERT only")
    if getattr(config, "bypass_transformer", False):
        raise CheckpointError(
            "config has bypass_transformer=True (text-only encoder, then one extra joint layer over text and regions), "
            "which vlblocks' VisualBERT does not implement"
        )
    if config.hidden_act != "gelu":
        raise CheckpointError(f"config hidden_act is {config.hidden_act!r}: vlblocks' encoder and MLM head use the exact (erf) GELU, 'gelu'")
    if not getattr(config, "tie_word_embeddings", True):
        raise CheckpointError("config has tie_word_embeddings=False: vlblocks ties the MLM decoder to the word embeddings")


def hf_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Key → shape of every tensor a `VisualBertForPreTraining` of `config` loads (built on the
    meta device, so nothing is allocated; non-persistent buffers excluded, tied copies included)."""
    from transformers import VisualBertForPreTraining  # heavy: imported only when converting

    with torch.device("meta"):
        model = VisualBertForPreTraining(config)
    return {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}


def _rename(key: str, rules: Sequence[tuple[str, str]]) -> Optional[str]:
    for source, target in rules:
        if source.endswith(".") and key.startswith(source):
            return target + key[len(source) :]
        if key == source:
            return target
    return None


def _prefixed(hf_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The state under `VisualBertForPreTraining` names: a bare `VisualBertModel`'s keys get
    `visual_bert.`; two keys that name one tensor are an error."""
    prefixed: dict[str, Tensor] = {}
    for key, value in hf_state.items():
        name = key if key.startswith((CORE, HEADS)) else CORE + key
        if name in prefixed:
            raise CheckpointError(f"VisualBERT weights hold '{key}' twice (with and without the '{CORE}' prefix)")
        prefixed[name] = value
    return prefixed


def _check_shapes(state: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
    wrong = [f"{key} {tuple(value.shape)} (the config says {expected[key]})" for key, value in state.items() if tuple(value.shape) != expected[key]]
    if wrong:
        raise CheckpointError(f"{what} of another shape than the config's: {listed_names(wrong, SHOWN)}")


def _drop_tied_copies(state: dict[str, Tensor]) -> None:
    """Remove transformers' tied copies after checking each equals the tensor it is tied to."""
    for copy, kept in HF_TIED.items():
        if copy not in state:
            continue
        if kept not in state:
            raise CheckpointError(f"VisualBERT weights hold '{copy}' but not '{kept}', which it is tied to")
        if not torch.equal(state[copy], state[kept]):
            raise CheckpointError(f"VisualBERT weights: '{copy}' differs from '{kept}', but the model ties them")
        del state[copy]


def from_hf(hf_state: Mapping[str, Tensor], config: Any) -> dict[str, Tensor]:
    """transformers VisualBERT tensors → `VLBertForPretraining` state-dict keys (see the module docstring).

    Args:
        hf_state: a `VisualBertForPreTraining` or `VisualBertModel` state dict (`VisualBertModel`
            keys bare or under `visual_bert.`), tied copies present or not.
        config: its `VisualBertConfig`.

    Returns:
        `vlbert.*` (+ `mlm_head.*`, `relation_head.*` when the heads are there, the tied
        `mlm_head.decoder.weight` included): what `load_state_dict(strict=True)` of a
        `VLBertForPretraining` with (or without) both heads takes. The tensors are not copied.

    Raises:
        CheckpointError: a refused config, unknown keys, missing keys, or shapes that differ
            from the config's, naming the keys.
    """
    check_config(config)
    expected = hf_shapes(config)
    state = {key: value for key, value in _prefixed(hf_state).items() if key not in OLD_BUFFERS}
    unknown = [key for key in state if key not in expected]
    if unknown:
        raise CheckpointError(f"VisualBERT weights hold keys that VisualBertForPreTraining does not have: {listed_names(unknown, SHOWN)}")
    _check_shapes(state, expected, "VisualBERT weights hold tensors")
    _drop_tied_copies(state)
    heads = any(key.startswith(HEADS) for key in state)
    pooler = heads or any(key.startswith(POOLER) for key in state)
    required = [
        key
        for key in expected
        if key not in HF_TIED and (heads or not key.startswith(HEADS)) and (pooler or not key.startswith(POOLER))
    ]
    missing = [key for key in required if key not in state]
    if missing:
        kind = "VisualBertForPreTraining" if heads else "VisualBertModel"
        raise CheckpointError(f"VisualBERT weights ({kind}) lack {listed_names(missing, SHOWN)}")
    converted = {_rename(key, RULES): value for key, value in state.items()}
    if heads:
        converted["mlm_head.decoder.weight"] = converted[OUR_TIED["mlm_head.decoder.weight"]]
    return converted


def to_hf(state: Mapping[str, Tensor], config: Any) -> dict[str, Tensor]:
    """`VLBertForPretraining` tensors (both heads) → `VisualBertForPreTraining` keys, the tied
    copies included: what its `load_state_dict(strict=True)` takes.

    Raises:
        CheckpointError: a refused config, a tensor with no place in VisualBERT (e.g. a masked
            region head), a missing one (e.g. no heads), a tied copy that differs, or a shape
            other than the config's.
    """
    check_config(config)
    expected = hf_shapes(config)
    state = dict(state)
    for copy, kept in OUR_TIED.items():
        if copy in state:
            if kept not in state or not torch.equal(state[copy], state[kept]):
                raise CheckpointError(f"'{copy}' differs from '{kept}', but VisualBERT ties them")
            del state[copy]
    reverse = sorted(((ours, theirs) for theirs, ours in RULES), key=lambda rule: -len(rule[0]))
    converted: dict[str, Tensor] = {}
    unknown = []
    for key, value in state.items():
        name = _rename(key, reverse)
        if name is None or name not in expected:
            unknown.append(key)
        else:
            converted[name] = value
    if unknown:
        raise CheckpointError(f"tensors with no place in VisualBertForPreTraining: {listed_names(unknown, SHOWN)}")
    missing = [key for key in expected if key not in HF_TIED and key not in converted]
    if missing:
        raise CheckpointError(f"VisualBertForPreTraining needs tensors the model does not have: {listed_names(missing, SHOWN)}")
    _check_shapes(converted, expected, "tensors")
    for copy, kept in HF_TIED.items():
        converted[copy] = converted[kept]
    return converted


def _refuse(reason: str) -> CheckpointError:
    return CheckpointError(f"the model is not VisualBERT-shaped: {reason}")


def _is(module: Optional[nn.Module], kind: str) -> bool:
    """Whether `module` is a `kind` block (by class name: interop does not import the blocks)."""
    return module is not None and any(cls.__name__ == kind for cls in type(module).__mro__)


def _core_fields(core: nn.Module) -> dict[str, Any]:
    """The `VisualBertConfig` fields of a `VLBert` with VisualBERT's blocks, or a refusal naming the first difference."""
    if not isinstance(core, VLBert):
        raise _refuse(f"its core is {type(core).__name__}, not VLBert")
    features, visual, embedding, encoder = core.region_features, core.visual_embedding, core.embedding, core.encoder
    if not _is(features, "PrecomputedRegionFeatures"):
        raise _refuse(f"VLBert.region_features is {type(features).__name__}; VisualBERT reads precomputed features (PrecomputedRegionFeatures)")
    if not _is(visual, "VisualFeatureEmbedding") or visual.geometry is not None or visual.activation is not None or visual.dropout.p:
        raise _refuse("VLBert.visual_embedding must be VisualFeatureEmbedding(geometry=None, activation=None, dropout=0.0), a plain projection")
    if not _is(embedding, "VLEmbedding"):
        raise _refuse(f"VLBert.embedding is {type(embedding).__name__}, not VLEmbedding")
    options = {
        "layout": (embedding.layout, "concatenated"),
        "end_token": (embedding.end_embedding is not None, False),
        "text_visual_term": (embedding.visual_text is not None, False),
        "region_token": (embedding.image_token is not None, False),
        "region_visual_term": (embedding.visual_region is not None, False),
        "region_positions": (embedding.region_positions, "zero"),
        "separate_region_tables": (embedding.separate_region_tables, True),
        "region_segment": (embedding.region_segment, 1),
    }
    for name, (value, wanted) in options.items():
        if value != wanted:
            raise _refuse(f"VLEmbedding.{name} is {value!r}; VisualBERT's is {wanted!r}")
    if not _is(encoder, "TransformerEncoder"):
        raise _refuse(f"VLBert.encoder is {type(encoder).__name__}, not TransformerEncoder")
    if core.pooler is not None and not _is(core.pooler, "Pooler"):
        raise _refuse(f"VLBert.pooler is {type(core.pooler).__name__}, not Pooler")
    layers = encoder.layer
    first = layers[0]
    norms = [embedding.LayerNorm.eps, *(layer.attention.output.LayerNorm.eps for layer in layers), *(layer.output.LayerNorm.eps for layer in layers)]
    if len(set(norms)) > 1:
        raise _refuse(f"its LayerNorms use several epsilons {sorted(set(norms))}; VisualBERT has one layer_norm_eps")
    if embedding.dropout.p != first.output.dropout.p:
        raise _refuse(f"VLEmbedding.dropout ({embedding.dropout.p}) differs from TransformerEncoder.dropout ({first.output.dropout.p}); VisualBERT has one hidden_dropout_prob")
    return {
        "vocab_size": embedding.word_embeddings.num_embeddings,
        "hidden_size": embedding.hidden_size,
        "visual_embedding_dim": visual.appearance_size,
        "num_hidden_layers": len(layers),
        "num_attention_heads": first.attention.self.num_heads,
        "intermediate_size": first.intermediate.dense.out_features,
        "hidden_act": "gelu",
        "hidden_dropout_prob": first.output.dropout.p,
        "attention_probs_dropout_prob": first.attention.self.dropout_p,
        "max_position_embeddings": embedding.position_embeddings.num_embeddings,
        "type_vocab_size": embedding.token_type_embeddings.num_embeddings,
        "layer_norm_eps": norms[0],
        "bypass_transformer": False,
        "tie_word_embeddings": True,
        "pad_token_id": 0,  # BERT's [PAD], what vlblocks pads with (it only sets HF's padding_idx)
    }


def hf_config(model: nn.Module) -> Any:
    """The `VisualBertConfig` of a vlblocks VisualBERT, sizes read from its modules.

    Args:
        model: a `VLBertForPretraining` over a VisualBERT-shaped `VLBert` with both the masked
            LM and the relation head (architectures `VisualBertForPreTraining`) or neither
            (`VisualBertModel`); a bare `VLBert` counts as the latter.

    Raises:
        CheckpointError: the model is not VisualBERT-shaped (e.g. VL-BERT's packed layout,
            geometry in the region feature, a masked-region head, one head of the two, or
            LayerNorm epsilons that differ), naming the first difference.
    """
    from transformers import VisualBertConfig  # heavy: imported only when converting

    if isinstance(model, VLBertForPretraining):
        core = model.vlbert
        fields = _core_fields(core)
        others = [name for name in ("region_head", "visual_head") if getattr(model, name) is not None]
        if others:
            raise _refuse(f"VLBertForPretraining.{others[0]} is set; VisualBERT has the masked LM and relation heads only")
        heads = (model.mlm_head is not None, model.relation_head is not None)
        if heads[0] != heads[1]:
            raise _refuse("VisualBertForPreTraining has both the masked LM and the relation head; the model has one of them")
        with_heads = heads[0]
        if with_heads and not (_is(model.mlm_head, "MaskedLMHead") and _is(model.relation_head, "RelationHead")):
            raise _refuse("the heads must be a MaskedLMHead and a RelationHead")
    elif isinstance(model, VLBert):
        core, with_heads, fields = model, False, _core_fields(model)
    else:
        raise _refuse(f"{type(model).__name__} is neither VLBertForPretraining nor VLBert")
    if with_heads and core.pooler is None:
        raise _refuse("the relation head reads the pooler, but VLBert.pooler is None")
    if with_heads and model.mlm_head.transform.LayerNorm.eps != fields["layer_norm_eps"]:
        raise _refuse(f"the MLM head's LayerNorm epsilon {model.mlm_head.transform.LayerNorm.eps} differs from the encoder's {fields['layer_norm_eps']}")
    architecture = "VisualBertForPreTraining" if with_heads else "VisualBertModel"
    return VisualBertConfig(architectures=[architecture], **fields)

