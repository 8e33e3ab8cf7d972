"""LXMERT weights both ways between HF transformers (`LxmertModel`, `LxmertForPreTraining`) and a
`VLBertForPretraining` around a `TwoStreamModel` (LXMERT assembled from vlblocks' blocks).

| HF (`lxmert.` stripped; `{i}` a layer index) | vlblocks `VLBertForPretraining` |
|---|---|
| `embeddings.*` | `vlbert.text_embedding.*` |
| `encoder.visn_fc.visn_fc` / `.visn_layer_norm` | `vlbert.visual_embedding.appearance_projection` / `.appearance_norm` |
| `encoder.visn_fc.box_fc` / `.box_layer_norm` | `vlbert.visual_embedding.box_projection` / `.box_norm` |
| `encoder.layer.{i}.*` / `encoder.r_layers.{i}.*` | `vlbert.encoder.text_layer.{i}.*` / `.region_layer.{i}.*` |
| `encoder.x_layers.{i}.visual_attention.att` / `.output` | `vlbert.encoder.cross_layer.{i}.cross_attention.self` / `.output` |
| `encoder.x_layers.{i}.lang_self_att` / `visn_self_att` | `... .text_attention` / `.region_attention` |
| `encoder.x_layers.{i}.lang_inter` / `lang_output` / `visn_inter` / `visn_output` | `... .text_intermediate` / `.text_output` / `.region_intermediate` / `.region_output` |
| `pooler.dense` | `vlbert.pooler.dense` |
| `cls.predictions.transform` / `.bias` | `mlm_head.transform` / `mlm_head.bias` |
| `cls.predictions.decoder.weight` (tied to the word embeddings) | `mlm_head.decoder.weight` (tied here too) |
| `cls.seq_relationship` | `relation_head.classifier` |
| `obj_predict_head.transform` | `visual_head.transform` |
| `obj_predict_head.decoder_dict.obj` / `.attr` / `.feat` | `visual_head.decoders.object` / `.attribute` / `.feature` |

HF's `answer_head` (`task_qa`: Linear(H, 2H), GELU, LayerNorm(2H), Linear(2H, A)) has no vlblocks
counterpart (`AnswerHead` is VL-BERT's H-wide transform then Linear(H, A)): checkpoints with it are
refused. HF's model reads boxes already divided by the image size (`visual_pos`); vlblocks reads
pixel boxes and the image size (`BoxCoordinates` divides).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional

import torch
from torch import Tensor, nn

from vlblocks.models.pretraining import VLBertForPretraining
from vlblocks.models.two_stream import TwoStreamModel
from vlblocks.train.checkpoint import CheckpointError, listed_names

if TYPE_CHECKING:
    from transformers import LxmertConfig

HF_CORE_PREFIX = "lxmert."
OURS_CORE_PREFIX = "vlbert."
TIED_DECODER = ("cls.predictions.decoder.weight", "lxmert.embeddings.word_embeddings.weight")
OUR_TIED = ("mlm_head.decoder.weight", "vlbert.text_embedding.word_embeddings.weight")
# HF's visual output names and vlblocks' `RegionPredictionHead` output names, with the config switch of each.
VISUAL_OUTPUTS = {"obj": ("object", "visual_obj_loss"), "attr": ("attribute", "visual_attr_loss"), "feat": ("feature", "visual_feat_loss")}
LAYER_NORM_EPS = 1e-12  # fixed in HF's LXMERT modules, whatever the config
SHOWN = 8  # key names listed in an error

# (HF name, vlblocks name) of whole modules; `{i}` stands for a layer index. HF core names are
# given without `lxmert.`, vlblocks core names without `vlbert.`.
CORE_RENAMES = (
    ("embeddings.", "text_embedding."),
    ("encoder.visn_fc.visn_fc.", "visual_embedding.appearance_projection."),
    ("encoder.visn_fc.visn_layer_norm.", "visual_embedding.appearance_norm."),
    ("encoder.visn_fc.box_fc.", "visual_embedding.box_projection."),
    ("encoder.visn_fc.box_layer_norm.", "visual_embedding.box_norm."),
    ("encoder.layer.{i}.", "encoder.text_layer.{i}."),
    ("encoder.r_layers.{i}.", "encoder.region_layer.{i}."),
    ("encoder.x_layers.{i}.visual_attention.att.", "encoder.cross_layer.{i}.cross_attention.self."),
    ("encoder.x_layers.{i}.visual_attention.output.", "encoder.cross_layer.{i}.cross_attention.output."),
    ("encoder.x_layers.{i}.lang_self_att.", "encoder.cross_layer.{i}.text_attention."),
    ("encoder.x_layers.{i}.visn_self_att.", "encoder.cross_layer.{i}.region_attention."),
    ("encoder.x_layers.{i}.lang_inter.", "encoder.cross_layer.{i}.text_intermediate."),
    ("encoder.x_layers.{i}.lang_output.", "encoder.cross_layer.{i}.text_output."),
    ("encoder.x_layers.{i}.visn_inter.", "encoder.cross_layer.{i}.region_intermediate."),
    ("encoder.x_layers.{i}.visn_output.", "encoder.cross_layer.{i}.region_output."),
    ("pooler.", "pooler."),
)
HEAD_RENAMES = (
    ("cls.predictions.transform.", "mlm_head.transform."),
    ("cls.predictions.bias", "mlm_head.bias"),
    ("cls.predictions.decoder.weight", "mlm_head.decoder.weight"),
    ("cls.seq_relationship.", "relation_head.classifier."),
    ("obj_predict_head.transform.", "visual_head.transform."),
    *((f"obj_predict_head.decoder_dict.{hf}.", f"visual_head.decoders.{ours}.") for hf, (ours, _) in VISUAL_OUTPUTS.items()),
)
RENAMES = tuple((HF_CORE_PREFIX + hf, OURS_CORE_PREFIX + ours) for hf, ours in CORE_RENAMES) + HEAD_RENAMES
HEAD_PREFIXES = ("cls.", "obj_predict_head.", "answer_head.")
ANSWER_HEAD_REFUSAL = (
    "HF's answer_head (task_qa: Linear(H, 2H), GELU, LayerNorm(2H), Linear(2H, A)) has no vlblocks counterpart "
    "(vlblocks.blocks.AnswerHead is an H-wide transform then Linear(H, A)); convert a task_qa=False checkpoint, "
    "or drop the answer_head.* keys and set task_qa=False on purpose"
)


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)"))


_TO_OURS = tuple((_pattern(hf), ours) for hf, ours in RENAMES)
_TO_HF = tuple((_pattern(ours), hf) for hf, ours in RENAMES)


def _rename(key: str, rules: tuple[tuple[re.Pattern, str], ...]) -> Optional[str]:
    """`key` with the first matching module prefix replaced, or None when no rule matches."""
    for pattern, replacement in rules:
        found = pattern.match(key)
        if found is not None:
            prefix = replacement.replace("{i}", found.group("i")) if "{i}" in replacement else replacement
            return prefix + key[found.end() :]
    return None


def _field(config: Any, name: str) -> Any:
    """A field of an `LxmertConfig`, or of a config.json dict (LxmertConfig's default when absent)."""
    if isinstance(config, Mapping):
        if name in config:
            return config[name]
        from transformers import LxmertConfig  # heavy: only for a default

        return getattr(LxmertConfig(), name)
    return getattr(config, name)


def check_config(config: Any) -> None:
    """Refuse an HF LXMERT config whose computation vlblocks does not reproduce.

    Raises:
        CheckpointError: not an LXMERT config, or `hidden_act` other than the exact (erf) "gelu".
    """
    model_type = config.get("model_type", "lxmert") if isinstance(config, Mapping) else getattr(config, "model_type", "lxmert")
    if model_type != "lxmert":
        raise CheckpointError(f"config: model_type is {model_type!r}, not 'lxmert'")
    activation = _field(config, "hidden_act")
    if activation != "gelu":
        raise CheckpointError(
            f"config: hidden_act is {activation!r}; vlblocks' encoder and heads use the exact (erf) GELU, HF's 'gelu', only"
        )


def _linear(name: str, out_features: int, in_features: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    yield f"{name}.weight", (out_features, in_features)
    yield f"{name}.bias", (out_features,)


def _layer_norm(name: str, size: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    yield f"{name}.weight", (size,)
    yield f"{name}.bias", (size,)


def _attention(name: str, hidden: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    """An HF `LxmertAttention` (query / key / value) named `name`."""
    for projection in ("query", "key", "value"):
        yield from _linear(f"{name}.{projection}", hidden, hidden)


def _residual(name: str, hidden: int, inner: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    yield from _linear(f"{name}.dense", hidden, inner)
    yield from _layer_norm(f"{name}.LayerNorm", hidden)


def _hf_core_shapes(config: Any) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(key, shape) of every tensor of an HF `LxmertModel` built from `config` (no prefix)."""
    hidden, inner = _field(config, "hidden_size"), _field(config, "intermediate_size")
    yield "embeddings.word_embeddings.weight", (_field(config, "vocab_size"), hidden)
    yield "embeddings.position_embeddings.weight", (_field(config, "max_position_embeddings"), hidden)
    yield "embeddings.token_type_embeddings.weight", (_field(config, "type_vocab_size"), hidden)
    yield from _layer_norm("embeddings.LayerNorm", hidden)
    yield from _linear("encoder.visn_fc.visn_fc", hidden, _field(config, "visual_feat_dim"))
    yield from _layer_norm("encoder.visn_fc.visn_layer_norm", hidden)
    yield from _linear("encoder.visn_fc.box_fc", hidden, _field(config, "visual_pos_dim"))
    yield from _layer_norm("encoder.visn_fc.box_layer_norm", hidden)
    for stack, count in (("layer", _field(config, "l_layers")), ("r_layers", _field(config, "r_layers"))):
        for i in range(count):
            yield from _attention(f"encoder.{stack}.{i}.attention.self", hidden)
            yield from _residual(f"encoder.{stack}.{i}.attention.output", hidden, hidden)
            yield from _linear(f"encoder.{stack}.{i}.intermediate.dense", inner, hidden)
            yield from _residual(f"encoder.{stack}.{i}.output", hidden, inner)
    for i in range(_field(config, "x_layers")):
        layer = f"encoder.x_layers.{i}"
        yield from _attention(f"{layer}.visual_attention.att", hidden)
        yield from _residual(f"{layer}.visual_attention.output", hidden, hidden)
        for stream in ("lang", "visn"):
            yield from _attention(f"{layer}.{stream}_self_att.self", hidden)
            yield from _residual(f"{layer}.{stream}_self_att.output", hidden, hidden)
            yield from _linear(f"{layer}.{stream}_inter.dense", inner, hidden)
            yield from _residual(f"{layer}.{stream}_output", hidden, inner)
    yield from _linear("pooler.dense", hidden, hidden)


def _hf_head_shapes(config: Any) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(key, shape) of the heads of an HF `LxmertForPreTraining` built from `config`, the tied
    decoder and the answer head excepted."""
    hidden = _field(config, "hidden_size")
    yield from _linear("cls.predictions.transform.dense", hidden, hidden)
    yield from _layer_norm("cls.predictions.transform.LayerNorm", hidden)
    yield "cls.predictions.bias", (_field(config, "vocab_size"),)
    yield from _linear("cls.seq_relationship", 2, hidden)
    if _field(config, "task_obj_predict"):
        yield from _linear("obj_predict_head.transform.dense", hidden, hidden)
        yield from _layer_norm("obj_predict_head.transform.LayerNorm", hidden)
        sizes = {"obj": _field(config, "num_object_labels"), "attr": _field(config, "num_attr_labels"), "feat": _field(config, "visual_feat_dim")}
        for name, (_, switch) in VISUAL_OUTPUTS.items():
            if _field(config, switch):
                yield from _linear(f"obj_predict_head.decoder_dict.{name}", sizes[name], hidden)


def from_hf(hf_state: dict[str, Tensor], config: Any) -> dict[str, Tensor]:
    """An HF LXMERT state dict → the state dict of the matching `VLBertForPretraining`.

    Args:
        hf_state: `LxmertModel` keys (with or without `lxmert.`) → the core's keys only
            (`vlbert.*`); or `LxmertForPreTraining` keys → the core, `mlm_head`, `relation_head` and
            (with `task_obj_predict`) `visual_head`. The tied `cls.predictions.decoder.weight` may
            be absent (transformers saves it once, as the word embeddings).
        config: the `LxmertConfig` (or its config.json dict) the state was saved with.

    Returns:
        vlblocks key → tensor (the same tensors; `mlm_head.decoder.weight` is the word embeddings).

    Raises:
        CheckpointError: a config vlblocks does not reproduce (`check_config`), an answer head
            (`task_qa`), keys unknown or missing for `config`, a shape that differs from it, or a
            decoder that differs from the word embeddings.
    """
    check_config(config)
    state: dict[str, Tensor] = {}
    for key, value in hf_state.items():
        normal = key if key.startswith(HEAD_PREFIXES) or key.startswith(HF_CORE_PREFIX) else HF_CORE_PREFIX + key
        if normal in state:
            raise CheckpointError(f"HF state: '{key}' is given both with and without the '{HF_CORE_PREFIX}' prefix")
        state[normal] = value
    with_heads = any(key.startswith(HEAD_PREFIXES) for key in state)
    answer_keys = [key for key in state if key.startswith("answer_head.")]
    if answer_keys or (with_heads and _field(config, "task_qa")):
        named = listed_names(answer_keys, SHOWN) if answer_keys else "answer_head.logit_fc.* (config task_qa=True)"
        raise CheckpointError(f"HF state: {named}: {ANSWER_HEAD_REFUSAL}")

    expected = {HF_CORE_PREFIX + key: shape for key, shape in _hf_core_shapes(config)}
    if with_heads:
        expected.update(_hf_head_shapes(config))
    decoder, word_embeddings = TIED_DECODER
    tied = state.pop(decoder, None) if with_heads else None
    unknown = [key for key in state if key not in expected]
    missing = [key for key in expected if key not in state]
    if unknown or missing:
        layout = "LxmertForPreTraining" if with_heads else "LxmertModel"
        parts = ([f"unknown keys {listed_names(unknown, SHOWN)}"] if unknown else []) + ([f"missing keys {listed_names(missing, SHOWN)}"] if missing else [])
        raise CheckpointError(f"HF state does not fit an {layout} of this config: {'; '.join(parts)}")
    wrong = [f"'{key}' {tuple(value.shape)} (config: {expected[key]})" for key, value in state.items() if tuple(value.shape) != expected[key]]
    if wrong:
        raise CheckpointError(f"HF state: shapes differ from the config: {listed_names(wrong, SHOWN)}")
    if tied is not None and not torch.equal(tied, state[word_embeddings]):
        raise CheckpointError(f"HF state: '{decoder}' differs from '{word_embeddings}'; vlblocks ties the MLM decoder to the word embeddings")

    converted = {_rename(key, _TO_OURS): value for key, value in state.items()}
    if with_heads:
        converted[OUR_TIED[0]] = converted[OUR_TIED[1]]
    return converted


def to_hf(state: dict[str, Tensor], config: Any) -> dict[str, Tensor]:
    """A `VLBertForPretraining` (LXMERT-shaped) state dict → `LxmertForPreTraining` keys, the
    tied `cls.predictions.decoder.weight` included, loadable with `load_state_dict(strict=True)`
    into `LxmertForPreTraining(config)`.

    Args:
        state: vlblocks key → tensor, e.g. `model.state_dict()` or a vlblocks checkpoint (which
            stores the tied decoder / word embeddings under one of their two names).
        config: the `LxmertConfig` (e.g. `hf_config(model)`) the keys are checked against.

    Raises:
        CheckpointError: keys with no HF place (e.g. a masked-region head, a CNN front end),
            keys missing for `config`, shapes that differ, or a config with `task_qa`.
    """
    check_config(config)
    if _field(config, "task_qa"):
        raise CheckpointError(f"config: task_qa=True: {ANSWER_HEAD_REFUSAL}")
    state = dict(state)
    decoder, word_embeddings = OUR_TIED
    if decoder in state and word_embeddings in state and not torch.equal(state[decoder], state[word_embeddings]):
        raise CheckpointError(f"state: '{decoder}' differs from '{word_embeddings}', but both models tie them")
    if word_embeddings not in state and decoder in state:
        state[word_embeddings] = state[decoder]
    state.pop(decoder, None)
    unplaced = [key for key in state if _rename(key, _TO_HF) is None]
    if unplaced:
        raise CheckpointError(f"state: keys with no place in an HF LxmertForPreTraining: {listed_names(unplaced, SHOWN)}")
    converted = {_rename(key, _TO_HF): value.detach().contiguous().clone() for key, value in state.items()}
    expected = {HF_CORE_PREFIX + key: shape for key, shape in _hf_core_shapes(config)}
    expected.update(_hf_head_shapes(config))
    unknown = [_inverse(key) for key in converted if key not in expected]
    missing = [_inverse(key) for key in expected if key not in converted]
    if unknown or missing:
        parts = ([f"not in this config's model: {listed_names(unknown, SHOWN)}"] if unknown else []) + ([f"missing: {listed_names(missing, SHOWN)}"] if missing else [])
        raise CheckpointError(f"state does not fit an HF LxmertForPreTraining of this config: {'; '.join(parts)}")
    wrong = [f"'{_inverse(key)}' {tuple(value.shape)} (config: {expected[key]})" for key, value in converted.items() if tuple(value.shape) != expected[key]]
    if wrong:
        raise CheckpointError(f"state: shapes differ from the config: {listed_names(wrong, SHOWN)}")
    converted[TIED_DECODER[0]] = converted[TIED_DECODER[1]]
    return converted


def _inverse(hf_key: str) -> str:
    """The vlblocks name of an HF key, for messages (the HF key itself when it has none)."""
    return _rename(hf_key, _TO_OURS) or hf_key


def _refuse(reason: str) -> CheckpointError:
    return CheckpointError(f"not an LXMERT-shaped model: {reason}")


def _layer_norms(module: nn.Module) -> Iterator[tuple[str, nn.LayerNorm]]:
    return ((name, child) for name, child in module.named_modules() if isinstance(child, nn.LayerNorm))


def hf_config(model: VLBertForPretraining | TwoStreamModel) -> LxmertConfig:
    """The `LxmertConfig` of an LXMERT-shaped `VLBertForPretraining` (architecture
    `LxmertForPreTraining`), or of a bare `TwoStreamModel` core (`LxmertModel`, the head fields at
    transformers' defaults but `task_qa` off), sizes read from the modules.

    LXMERT-shaped: a `TwoStreamModel` core over `PrecomputedRegionFeatures` with an
    `AveragedRegionFeatureEmbedding` (`BoxCoordinates` geometry), a `TextEmbedding` without a
    visual term, no region embedding, a `CoAttentionEncoder`, a pooler; an MLM head and a relation
    head; no masked-region head; an optional `RegionPredictionHead` whose decoders are among
    object / attribute / feature (the feature decoder `visual_feat_dim` wide); every LayerNorm's
    epsilon 1e-12 (HF's LXMERT fixes it). The visual losses are on exactly for the decoders
    present, `task_obj_predict` when the visual head is; `task_qa` is off. Dropout rates are read
    from the encoder (HF has one hidden and one attention rate).

    Raises:
        CheckpointError: naming the first part that is not LXMERT-shaped.
    """
    from transformers import LxmertConfig  # heavy: only when exporting

    heads = not isinstance(model, TwoStreamModel)
    core = model.vlbert if heads else model
    if not isinstance(core, TwoStreamModel):
        raise _refuse(f"the core is a {type(core).__name__}, not a TwoStreamModel")
    parts = {
        "region_features": ("PrecomputedRegionFeatures", core.region_features),
        "visual_embedding": ("AveragedRegionFeatureEmbedding", core.visual_embedding),
        "text_embedding": ("TextEmbedding", core.text_embedding),
        "encoder": ("CoAttentionEncoder", core.encoder),
        "pooler": ("Pooler", core.pooler),
    }
    for name, (kind, module) in parts.items():
        if type(module).__name__ != kind:
            raise _refuse(f"the core's {name} is a {type(module).__name__}, LXMERT needs a {kind}")
    geometry = core.visual_embedding.geometry
    if type(geometry).__name__ != "BoxCoordinates":
        raise _refuse(f"the visual embedding's geometry is a {type(geometry).__name__}, LXMERT's is BoxCoordinates (boxes / image size)")
    if core.text_embedding.visual_text is not None:
        raise _refuse("the text embedding adds a visual term (visual_text), LXMERT's has none")
    if core.region_embedding is not None:
        raise _refuse("the core has a region_embedding, LXMERT embeds regions by the visual embedding alone")
    if len(core.encoder.text_layer) + len(core.encoder.region_layer) + len(core.encoder.cross_layer) == 0:
        raise _refuse("the co-attention encoder has no layer")
    odd_eps = [f"{name} ({norm.eps})" for name, norm in _layer_norms(model) if norm.eps != LAYER_NORM_EPS]
    if odd_eps:
        raise _refuse(f"LayerNorm epsilon must be {LAYER_NORM_EPS} (fixed in HF's LXMERT): {listed_names(odd_eps, SHOWN)}")
    if not heads:
        return LxmertConfig(architectures=["LxmertModel"], task_qa=False, **_core_fields(core))
    if model.mlm_head is None or model.relation_head is None:
        raise _refuse("HF's LxmertForPreTraining always has the MLM head (cls.predictions) and the relation head (cls.seq_relationship)")
    if model.region_head is not None:
        raise _refuse("the masked-region head (region_head) has no place in HF's LXMERT; its visual head is RegionPredictionHead")
    if getattr(model, "answer_head", None) is not None:
        raise _refuse(f"the answer head: {ANSWER_HEAD_REFUSAL}")
    if model.mlm_head.transform.LayerNorm is None:
        raise _refuse("the MLM head's transform has no LayerNorm")

    visual_fields: dict[str, Any] = {"task_obj_predict": model.visual_head is not None}
    if model.visual_head is not None:
        decoders = model.visual_head.decoders
        by_ours = {ours: (hf, switch) for hf, (ours, switch) in VISUAL_OUTPUTS.items()}
        strange = [name for name in decoders if name not in by_ours]
        if strange:
            raise _refuse(f"visual_head decoders {strange}: HF's LXMERT predicts only {sorted(by_ours)}")
        if "feature" in decoders and decoders["feature"].out_features != core.visual_embedding.appearance_size:
            raise _refuse(
                f"visual_head.decoders.feature has {decoders['feature'].out_features} outputs, "
                f"HF regresses the {core.visual_embedding.appearance_size}-d input feature"
            )
        for ours, (_, switch) in by_ours.items():
            visual_fields[switch] = ours in decoders
        if "object" in decoders:
            visual_fields["num_object_labels"] = decoders["object"].out_features
        if "attribute" in decoders:
            visual_fields["num_attr_labels"] = decoders["attribute"].out_features
    return LxmertConfig(
        architectures=["LxmertForPreTraining"], task_mask_lm=True, task_matched=True, task_qa=False, **_core_fields(core), **visual_fields
    )


def _core_fields(core: TwoStreamModel) -> dict[str, Any]:
    """The `LxmertConfig` fields of an LXMERT-shaped core's sizes."""
    encoder = core.encoder
    layers = [*encoder.text_layer, *encoder.region_layer]
    first_attention = layers[0].attention if layers else encoder.cross_layer[0].cross_attention
    first_output = layers[0].output if layers else encoder.cross_layer[0].text_output
    text = core.text_embedding
    return dict(
        vocab_size=text.word_embeddings.num_embeddings,
        hidden_size=text.word_embeddings.embedding_dim,
        num_attention_heads=first_attention.self.num_heads,
        intermediate_size=(layers[0].intermediate if layers else encoder.cross_layer[0].text_intermediate).dense.out_features,
        hidden_act="gelu",
        hidden_dropout_prob=first_output.dropout.p,
        attention_probs_dropout_prob=first_attention.self.dropout_p,
        max_position_embeddings=text.position_embeddings.num_embeddings,
        type_vocab_size=text.token_type_embeddings.num_embeddings,
        l_layers=len(encoder.text_layer),
        r_layers=len(encoder.region_layer),
        x_layers=len(encoder.cross_layer),
        visual_feat_dim=core.visual_embedding.appearance_size,
        visual_pos_dim=core.visual_embedding.geometry.out_features,
    )
