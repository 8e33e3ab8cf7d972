"""Converting official VL-BERT checkpoints (jackroos/VL-BERT) into vlblocks weights.

The state dicts here are written in the official key layout (names and shapes from
common/visual_linguistic_bert.py, common/fast_rcnn.py, the resnet of common/backbone and the task
modules), at tiny sizes. The equation tests compute the official forward pass from the OFFICIAL
names, independently of vlblocks, and compare it with the converted vlblocks model (float64).
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from typer.testing import CliRunner

from vlblocks.app.recipes import build_from_recipe, parse_recipe
from vlblocks.app.registry import experiment
from vlblocks.batch import VLBatch
from vlblocks.blocks import (
    AnswerHead,
    ChoiceHead,
    DilatedC5RoIHead,
    EndToEndRegionFeatures,
    MaskedLMHead,
    MaskedRegionHead,
    Pooler,
    PrecomputedRegionFeatures,
    RegionGeometryEmbedding,
    RegionScoreHead,
    ResNetC4Backbone,
    TransformerEncoder,
    VisualFeatureEmbedding,
    VLEmbedding,
)
from vlblocks.cli.app import app
from vlblocks.interop.official_vlbert import convert_official_state_dict, load_official_weights, read_official_checkpoint
from vlblocks.models import ReferringExpressionTask, VCRTask, VLBert, VLBertForPretraining, VQATask
from vlblocks.objectives import MaskedLanguageModeling, MaskedRegionClassification, PretrainingTask, TextOnlyMaskedLM
from vlblocks.train.checkpoint import CheckpointError, load_checkpoint

H, LAYERS, HEADS, FFN, VOCAB, POSITIONS, APPEARANCE, GEOMETRY_DIM = 32, 2, 4, 64, 50, 64, 24, 8
ANSWERS, REGION_CLASSES, WIDTH = 5, 7, 4  # WIDTH: the tiny ResNet's stem width
EPS = 1e-12
RECIPES = os.path.join(os.path.dirname(__file__), "..", "..", "recipes")


# --- official state dicts -------------------------------------------------------------------


def randn(generator, *shape):
    return torch.randn(*shape, generator=generator, dtype=torch.float64) * 0.5


def official_vlbert(generator, visual_ln=True, pooler=False):
    """`VisualLinguisticBert.state_dict()` under `vlbert.` (visual_size == hidden_size: no visual_1x1)."""
    w = {
        "word_embeddings.weight": randn(generator, VOCAB, H),
        "end_embedding.weight": randn(generator, 1, H),
        "position_embeddings.weight": randn(generator, POSITIONS, H),
        "token_type_embeddings.weight": randn(generator, 3, H),
        "embedding_LayerNorm.weight": 1 + randn(generator, H),
        "embedding_LayerNorm.bias": randn(generator, H),
    }
    if visual_ln:
        for name in ("visual_ln_text", "visual_ln_object"):
            w[f"{name}.weight"], w[f"{name}.bias"] = randn(generator, H), randn(generator, H)
    else:
        w["visual_scale_text"], w["visual_scale_object"] = torch.tensor(0.25, dtype=torch.float64), torch.tensor(-1.5, dtype=torch.float64)
    for layer in range(LAYERS):
        p = f"encoder.layer.{layer}."
        for name, (rows, cols) in {
            "attention.self.query": (H, H), "attention.self.key": (H, H), "attention.self.value": (H, H),
            "attention.output.dense": (H, H), "intermediate.dense": (FFN, H), "output.dense": (H, FFN),
        }.items():
            w[p + name + ".weight"], w[p + name + ".bias"] = randn(generator, rows, cols), randn(generator, rows)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            w[p + name + ".weight"], w[p + name + ".bias"] = 1 + randn(generator, H), randn(generator, H)
    if pooler:
        w["pooler.dense.weight"], w["pooler.dense.bias"] = randn(generator, H, H), randn(generator, H)
    return {"vlbert." + name: value for name, value in w.items()}


def official_front(generator, appearance=APPEARANCE):
    """`object_linguistic_embeddings` and FastRCNN's `obj_downsample` (Dropout, Linear, ReLU)."""
    return {
        "object_linguistic_embeddings.weight": randn(generator, 1, H),
        "image_feature_extractor.obj_downsample.1.weight": randn(generator, H, 8 * GEOMETRY_DIM + appearance),
        "image_feature_extractor.obj_downsample.1.bias": randn(generator, H),
    }


def batchnorm(generator, name, channels):
    return {
        f"{name}.weight": 1 + randn(generator, channels), f"{name}.bias": randn(generator, channels),
        f"{name}.running_mean": randn(generator, channels), f"{name}.running_var": 1 + randn(generator, channels).abs(),
        f"{name}.num_batches_tracked": torch.tensor(5),
    }


def bottleneck(generator, name, inputs, mid):
    """One torchvision-named bottleneck with a downsample branch (the first block of a stage)."""
    w = {f"{name}.conv1.weight": randn(generator, mid, inputs, 1, 1), f"{name}.conv2.weight": randn(generator, mid, mid, 3, 3)}
    w[f"{name}.conv3.weight"] = randn(generator, 4 * mid, mid, 1, 1)
    w[f"{name}.downsample.0.weight"] = randn(generator, 4 * mid, inputs, 1, 1)
    for bn, channels in (("bn1", mid), ("bn2", mid), ("bn3", 4 * mid), ("downsample.1", 4 * mid)):
        w.update(batchnorm(generator, f"{name}.{bn}", channels))
    return w


def official_resnet(generator):
    """FastRCNN's ResNet at stem width 4, one block per stage: `backbone` (conv1, bn1, layer1-3)
    and layer4 twice, as `roi_head_feature_extractor` and as `head.0` (the same modules)."""
    w = {"image_feature_extractor.backbone.conv1.weight": randn(generator, WIDTH, 3, 7, 7)}
    w.update(batchnorm(generator, "image_feature_extractor.backbone.bn1", WIDTH))
    for stage, (inputs, mid) in enumerate([(WIDTH, WIDTH), (4 * WIDTH, 2 * WIDTH), (8 * WIDTH, 4 * WIDTH)], start=1):
        w.update(bottleneck(generator, f"image_feature_extractor.backbone.layer{stage}.0", inputs, mid))
    layer4 = bottleneck(generator, "0", 16 * WIDTH, 8 * WIDTH)
    for name, value in layer4.items():
        w["image_feature_extractor.roi_head_feature_extractor." + name] = value
        w["image_feature_extractor.head.0." + name] = value.clone()
    return w


def official_pretraining(generator, precomputed=True):
    """ResNetVLBERTForPretrainingMultitask (WITH_MVRC_LOSS, no relation head, no pooler)."""
    w = {**official_vlbert(generator), **official_front(generator, APPEARANCE if precomputed else 32 * WIDTH)}
    w["vlbert.mlm_head.predictions.bias"] = randn(generator, VOCAB)
    w["vlbert.mlm_head.predictions.transform.dense.weight"], w["vlbert.mlm_head.predictions.transform.dense.bias"] = randn(generator, H, H), randn(generator, H)
    w["vlbert.mlm_head.predictions.transform.LayerNorm.weight"], w["vlbert.mlm_head.predictions.transform.LayerNorm.bias"] = 1 + randn(generator, H), randn(generator, H)
    w["vlbert.mlm_head.predictions.decoder.weight"] = w["vlbert.word_embeddings.weight"]
    w["vlbert.mvrc_head.transform.dense.weight"], w["vlbert.mvrc_head.transform.dense.bias"] = randn(generator, H, H), randn(generator, H)
    w["vlbert.mvrc_head.region_cls_pred.weight"], w["vlbert.mvrc_head.region_cls_pred.bias"] = randn(generator, REGION_CLASSES, H), randn(generator, REGION_CLASSES)
    w["object_mask_word_embedding.weight"] = randn(generator, 1, H)
    w["aux_text_visual_embedding.weight"] = randn(generator, 1, H)
    if precomputed:
        w["object_mask_visual_embedding.weight"] = randn(generator, 1, APPEARANCE)
    else:
        w.update(official_resnet(generator))
    return w


def official_vqa(generator, visual_ln=True):
    """vqa ResNetVLBERT, CLASSIFIER_TYPE 'mlm': final_mlp = (transform, Dropout, Linear(H, A))."""
    w = {**official_vlbert(generator, visual_ln), **official_front(generator)}
    w["final_mlp.0.dense.weight"], w["final_mlp.0.dense.bias"] = randn(generator, H, H), randn(generator, H)
    w["final_mlp.0.LayerNorm.weight"], w["final_mlp.0.LayerNorm.bias"] = 1 + randn(generator, H), randn(generator, H)
    w["final_mlp.2.weight"], w["final_mlp.2.bias"] = randn(generator, ANSWERS, H), randn(generator, ANSWERS)
    return w


def official_vcr(generator, precomputed=False):
    """vcr ResNetVLBERT: TimeDistributed(VisualLinguisticBert) with a pooler, final_mlp '1fc'
    (Dropout, Linear(H, 1)), cnn_loss_reg (MVRC transform, Dropout, Linear(H, 81 -> 7 here))."""
    core = official_vlbert(generator, pooler=True)
    w = {"vlbert._module." + key[len("vlbert."):]: value for key, value in core.items()}
    w.update(official_front(generator, APPEARANCE if precomputed else 32 * WIDTH))
    if not precomputed:
        w.update(official_resnet(generator))
    w["final_mlp.1.weight"], w["final_mlp.1.bias"] = randn(generator, 1, H), randn(generator, 1)
    w["cnn_loss_reg.0.dense.weight"], w["cnn_loss_reg.0.dense.bias"] = randn(generator, H, H), randn(generator, H)
    w["cnn_loss_reg.2.weight"], w["cnn_loss_reg.2.bias"] = randn(generator, REGION_CLASSES, H), randn(generator, REGION_CLASSES)
    return w


def official_refcoco(generator, precomputed=False):
    """refcoco ResNetVLBERT: final_mlp = (MVRC transform, Dropout, Linear(H, 1))."""
    w = {**official_vlbert(generator), **official_front(generator, APPEARANCE if precomputed else 32 * WIDTH)}
    if not precomputed:
        w.update(official_resnet(generator))
    w["final_mlp.0.dense.weight"], w["final_mlp.0.dense.bias"] = randn(generator, H, H), randn(generator, H)
    w["final_mlp.2.weight"], w["final_mlp.2.bias"] = randn(generator, 1, H), randn(generator, 1)
    return w


def ddp(state):
    return {"module." + key: value for key, value in state.items()}


# --- vlblocks targets -----------------------------------------------------------------------


def vlbert(precomputed=True, visual_ln=True, pooler=False):
    if precomputed:
        region_features, appearance = PrecomputedRegionFeatures(APPEARANCE), APPEARANCE
    else:
        backbone = ResNetC4Backbone(base_width=WIDTH, stage_blocks=[1, 1, 1])
        region_features, appearance = EndToEndRegionFeatures(backbone, DilatedC5RoIHead(16 * WIDTH, WIDTH, 1)), 32 * WIDTH
    return VLBert(
        region_features,
        VisualFeatureEmbedding(appearance, H, RegionGeometryEmbedding(dim=GEOMETRY_DIM)),
        VLEmbedding(VOCAB, H, H, POSITIONS, 3, visual_layer_norm=visual_ln),
        TransformerEncoder(LAYERS, H, HEADS, FFN),
        Pooler(H) if pooler else None,
    )


def pretraining_task(precomputed=True):
    model = VLBertForPretraining(vlbert(precomputed), MaskedLMHead(H, VOCAB), MaskedRegionHead(H, REGION_CLASSES))
    region = MaskedRegionClassification(precomputed_feature_size=APPEARANCE if precomputed else None)
    return PretrainingTask(model, [MaskedLanguageModeling(), region, TextOnlyMaskedLM(MaskedLanguageModeling(name="mlm_text"), H)])


def vqa_task(visual_ln=True):
    return VQATask(vlbert(visual_ln=visual_ln), AnswerHead(H, ANSWERS))


def vcr_task():
    return VCRTask(vlbert(precomputed=False, pooler=True), ChoiceHead(H), RegionScoreHead(H, REGION_CLASSES, xavier=False))


def refcoco_task(precomputed=False):
    return ReferringExpressionTask(vlbert(precomputed), RegionScoreHead(H, 1))


# --- the official equations, from the official names ----------------------------------------


def linear(x, w, prefix):
    return x @ w[prefix + ".weight"].T + w[prefix + ".bias"]


def layer_norm(x, w, prefix):
    return F.layer_norm(x, x.shape[-1:], w[prefix + ".weight"], w[prefix + ".bias"], EPS)


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def coordinate_embedding(box, width, height):
    """common/utils/bbox.py coordinate_embeddings of one box: (xc, yc, w, h) / image size x 100,
    each / 1000^(i/dim), sines then cosines per coordinate."""
    x1, y1, x2, y2 = box.tolist()
    values = []
    for c in ((x1 + x2) / 2 / width * 100, (y1 + y2) / 2 / height * 100, (x2 - x1) / width * 100, (y2 - y1) / height * 100):
        phases = [c / 1000 ** (i / GEOMETRY_DIM) for i in range(GEOMETRY_DIM)]
        values += [math.sin(p) for p in phases] + [math.cos(p) for p in phases]
    return torch.tensor(values, dtype=torch.float64)


def visual(v, w, which, visual_ln):
    return layer_norm(v, w, f"vlbert.visual_ln_{which}") if visual_ln else v * w[f"vlbert.visual_scale_{which}"]


def official_sample(w, batch, b, visual_ln=True):
    """VisualLinguisticBert.embedding + encoder for sample b: (final states [T, H], text count, region ids)."""
    text_ids = batch.text_ids[b][batch.text_mask[b]].tolist()
    segments = batch.segment_ids[b][batch.text_mask[b]].tolist()
    regions = torch.nonzero(batch.region_mask[b]).flatten().tolist()
    width, height = batch.image_sizes[b].tolist()
    obj_reps = {
        r: torch.relu(linear(torch.cat([coordinate_embedding(batch.boxes[b, r], width, height), batch.region_features[b, r]]), w, "image_feature_extractor.obj_downsample.1"))
        for r in regions
    }
    rows = [w["vlbert.word_embeddings.weight"][t] + visual(obj_reps[regions[0]], w, "text", visual_ln) for t in text_ids]
    masked = batch.masked_regions
    for r in regions:
        word = w["object_mask_word_embedding.weight" if masked is not None and masked[b, r] else "object_linguistic_embeddings.weight"][0]
        rows.append(word + visual(obj_reps[r], w, "object", visual_ln))
    rows.append(w["vlbert.end_embedding.weight"][0])
    n = len(text_ids)
    positions = list(range(n)) + [n] * len(regions) + [n + 1]
    types = segments + [2] * (len(regions) + 1)
    x = torch.stack(rows) + w["vlbert.position_embeddings.weight"][positions] + w["vlbert.token_type_embeddings.weight"][types]
    x = layer_norm(x, w, "vlbert.embedding_LayerNorm")
    size = H // HEADS
    for layer in range(LAYERS):
        p = f"vlbert.encoder.layer.{layer}"
        q, k, v = (linear(x, w, f"{p}.attention.self.{name}").view(-1, HEADS, size).transpose(0, 1) for name in ("query", "key", "value"))
        context = (torch.softmax(q @ k.transpose(1, 2) / math.sqrt(size), -1) @ v).transpose(0, 1).reshape(-1, H)
        attended = layer_norm(x + linear(context, w, f"{p}.attention.output.dense"), w, f"{p}.attention.output.LayerNorm")
        x = layer_norm(attended + linear(gelu(linear(attended, w, f"{p}.intermediate.dense")), w, f"{p}.output.dense"), w, f"{p}.output.LayerNorm")
    return x, n, regions


def make_batch(masked=False):
    generator = torch.Generator().manual_seed(3)
    text_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    region_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    sizes = torch.tensor([[64.0, 48.0], [100.0, 80.0]], dtype=torch.float64)
    boxes = torch.tensor(
        [[[0, 0, 63, 47], [4, 6, 30, 40], [10, 2, 60, 20], [0, 0, 0, 0]], [[0, 0, 99, 79], [20, 10, 70, 75], [0, 0, 0, 0], [0, 0, 0, 0]]],
        dtype=torch.float64,
    )
    return VLBatch(
        text_ids=torch.randint(1, VOCAB, (2, 6), generator=generator) * text_mask,
        segment_ids=torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]]),
        text_mask=text_mask,
        boxes=boxes,
        region_mask=region_mask,
        image_sizes=sizes,
        region_features=torch.randn(2, 4, APPEARANCE, generator=generator, dtype=torch.float64) * region_mask[..., None],
        masked_regions=torch.tensor([[0, 0, 1, 0], [0, 1, 0, 0]], dtype=torch.bool) if masked else None,
        answer_positions=torch.tensor([4, 2]),
    )


# --- tests: where each tensor lands ---------------------------------------------------------


def test_pretraining_prec_tensors_land_where_the_official_model_uses_them():
    state = ddp(official_pretraining(torch.Generator().manual_seed(0)))
    state["module.object_linguistic_embeddings.weight"] = torch.full((1, H), 7.0, dtype=torch.float64)  # the [IMG] word
    state["module.object_mask_word_embedding.weight"] = torch.full((1, H), -3.0, dtype=torch.float64)  # the masked-region word
    state["module.aux_text_visual_embedding.weight"] = torch.full((1, H), 0.5, dtype=torch.float64)
    state["module.object_mask_visual_embedding.weight"] = torch.full((1, APPEARANCE), 2.0, dtype=torch.float64)
    task = pretraining_task()
    report = load_official_weights(task, state, "vl-bert-base-prec.model")
    embedding = task.model.vlbert.embedding
    assert torch.equal(embedding.image_token.weight, torch.full((1, H), 7.0))
    assert torch.equal(embedding.masked_region_token.weight, torch.full((1, H), -3.0))
    assert torch.equal(task.objectives["mlm_text"].aux_text_visual_embedding.weight, torch.full((1, H), 0.5))
    assert torch.equal(task.objectives["mvrc"].mask_feature, torch.full((1, APPEARANCE), 2.0))
    expected = {  # official name -> vlblocks name, by hand from the two codes
        "vlbert.word_embeddings.weight": "model.vlbert.embedding.word_embeddings.weight",
        "vlbert.end_embedding.weight": "model.vlbert.embedding.end_embedding.weight",
        "vlbert.embedding_LayerNorm.bias": "model.vlbert.embedding.LayerNorm.bias",
        "vlbert.visual_ln_text.weight": "model.vlbert.embedding.visual_text.LayerNorm.weight",
        "vlbert.visual_ln_object.bias": "model.vlbert.embedding.visual_region.LayerNorm.bias",
        "vlbert.encoder.layer.1.attention.self.key.weight": "model.vlbert.encoder.layer.1.attention.self.key.weight",
        "vlbert.encoder.layer.0.output.LayerNorm.weight": "model.vlbert.encoder.layer.0.output.LayerNorm.weight",
        "image_feature_extractor.obj_downsample.1.weight": "model.vlbert.visual_embedding.projection.weight",
        "vlbert.mlm_head.predictions.transform.LayerNorm.bias": "model.mlm_head.transform.LayerNorm.bias",
        "vlbert.mlm_head.predictions.bias": "model.mlm_head.bias",
        "vlbert.mvrc_head.transform.dense.weight": "model.region_head.transform.dense.weight",
        "vlbert.mvrc_head.region_cls_pred.bias": "model.region_head.region_cls_pred.bias",
    }
    targets = task.state_dict()
    for official, ours in expected.items():
        assert torch.equal(targets[ours], state["module." + official].float()), official
    assert task.model.mlm_head.decoder.weight is embedding.word_embeddings.weight
    # 58 official tensors: 6 embeddings + 4 visual LN + 2 layers x 16 + 1 [IMG] + 2 obj_downsample
    # + 6 MLM (decoder among them) + 4 MVRC + 3 (mask word, aux text visual, mask feature);
    # the decoder is checked and dropped, 57 are placed.
    assert len(state) == 58 and report.placed == 57 and report.checked == ["vlbert.mlm_head.predictions.decoder.weight"]


def test_end_to_end_layer4_is_taken_once_after_checking_both_copies():
    state = ddp(official_pretraining(torch.Generator().manual_seed(1), precomputed=False))
    chosen = torch.full((8 * WIDTH, 16 * WIDTH, 1, 1), 0.125, dtype=torch.float64)
    state["module.image_feature_extractor.roi_head_feature_extractor.0.conv1.weight"] = chosen
    state["module.image_feature_extractor.head.0.0.conv1.weight"] = chosen.clone()
    state["module.image_feature_extractor.backbone.layer2.0.bn3.running_var"] = torch.full((8 * WIDTH,), 9.0, dtype=torch.float64)
    task = pretraining_task(precomputed=False)
    report = load_official_weights(task, state, "vl-bert-base-e2e.model")
    front = task.model.vlbert.region_features
    assert torch.equal(front.roi_head[0].conv1.weight, torch.full((8 * WIDTH, 16 * WIDTH, 1, 1), 0.125))
    assert torch.equal(front.backbone.layer2[0].bn3.running_var, torch.full((8 * WIDTH,), 9.0))
    assert int(front.backbone.bn1.num_batches_tracked) == 5
    # layer4 of one bottleneck with downsample: 4 convs + 4 BatchNorms x 5 tensors = 24 copies dropped, + the decoder
    assert len(report.checked) == 25

    state["module.image_feature_extractor.head.0.2.bn3.weight"] = torch.ones(1)  # a stray copy
    with pytest.raises(CheckpointError, match=r"'image_feature_extractor.head.0.2.bn3.weight' is there but 'image_feature_extractor.roi_head_feature_extractor.2.bn3.weight'"):
        convert_official_state_dict(state, pretraining_task(precomputed=False), "e2e.model")
    del state["module.image_feature_extractor.head.0.2.bn3.weight"]
    state["module.image_feature_extractor.head.0.0.conv1.weight"] = chosen + 1
    with pytest.raises(CheckpointError, match=r"'image_feature_extractor.head.0.0.conv1.weight' differs from 'image_feature_extractor.roi_head_feature_extractor.0.conv1.weight'"):
        convert_official_state_dict(state, pretraining_task(precomputed=False), "e2e.model")


def test_fp16_tensors_become_float32():
    state = official_vqa(torch.Generator().manual_seed(2))
    state = {key: value.half() for key, value in state.items()}
    state["vlbert.word_embeddings.weight"][3, 0] = 0.333251953125  # exactly representable in fp16 (1365 / 4096)
    task = vqa_task()
    report = load_official_weights(task, state, "vl-bert-large-vqa.model")
    assert all(value.dtype == torch.float32 for value in task.state_dict().values())
    assert task.vlbert.embedding.word_embeddings.weight[3, 0].item() == 0.333251953125
    assert report.half == len(state) and "fp16 tensors converted to float32" in str(report)


def test_zero_d_visual_scales_become_one_element_scales():
    state = official_vqa(torch.Generator().manual_seed(3), visual_ln=False)
    task = vqa_task(visual_ln=False)
    load_official_weights(task, state)
    assert task.vlbert.embedding.visual_text.scale.shape == (1,) and task.vlbert.embedding.visual_text.scale.item() == 0.25
    assert task.vlbert.embedding.visual_region.scale.item() == -1.5
    with pytest.raises(CheckpointError, match="scalar visual scales .* VLEmbedding.visual_layer_norm = False"):
        convert_official_state_dict(state, vqa_task(visual_ln=True), "vqa.model")


def test_vcr_time_distributed_prefix_and_heads():
    state = ddp(official_vcr(torch.Generator().manual_seed(4)))
    state["module.vlbert._module.pooler.dense.bias"] = torch.arange(H, dtype=torch.float64)
    state["module.final_mlp.1.bias"] = torch.tensor([0.75], dtype=torch.float64)
    task = vcr_task()
    report = load_official_weights(task, state, "vcr_q2a.model")
    assert torch.equal(task.vlbert.pooler.dense.bias, torch.arange(H, dtype=torch.float32))
    assert task.head.classifier.bias.item() == 0.75
    assert torch.equal(task.region_head.classifier.weight, state["module.cnn_loss_reg.2.weight"].float())
    assert torch.equal(task.region_head.transform.dense.bias, state["module.cnn_loss_reg.0.dense.bias"].float())
    # the fine-tuning model has no masked-region word: it is the one tensor set to 0
    assert report.zeroed == ["vlbert.embedding.masked_region_token.weight"]
    assert torch.equal(task.vlbert.embedding.masked_region_token.weight, torch.zeros(1, H))


def test_refcoco_heads():
    state = official_refcoco(torch.Generator().manual_seed(5))
    state["final_mlp.2.bias"] = torch.tensor([-2.0], dtype=torch.float64)
    task = refcoco_task()
    load_official_weights(task, state)
    assert task.head.classifier.bias.item() == -2.0
    assert torch.equal(task.head.transform.dense.weight, state["final_mlp.0.dense.weight"].float())
    assert torch.equal(task.vlbert.region_features.roi_head[0].downsample[1].running_mean, state["image_feature_extractor.roi_head_feature_extractor.0.downsample.1.running_mean"].float())


def test_unknown_unused_and_missing_tensors_are_refused_by_name():
    generator = torch.Generator().manual_seed(6)
    task = vqa_task()
    before = {name: value.clone() for name, value in task.state_dict().items()}
    cases = [
        ({**official_vqa(generator), "vlbert.mystery.weight": torch.zeros(2)}, "'vlbert.mystery.weight' has no place in VQATask"),
        ({**official_vqa(generator), "vlbert.special_word_embeddings.weight": torch.zeros(2)}, "word_embedding_frozen"),
        (official_pretraining(generator), "'vlbert.mlm_head.predictions.bias' has no place in VQATask: this is a pre-training checkpoint"),
        ({key: value for key, value in official_vqa(generator).items() if key != "final_mlp.0.LayerNorm.bias"}, "no official tensor for head.transform.LayerNorm.bias"),
        ({**official_vqa(generator), "final_mlp.2.weight": torch.zeros(9, H)}, r"'final_mlp.2.weight' has shape \(9, 32\), head.classifier.weight needs \(5, 32\)"),
        ({**official_vqa(generator), "vlbert.pooler.dense.weight": torch.zeros(H, H)}, "maps to vlbert.pooler.dense.weight, which VQATask does not have: .* VLBert.pooler = @Pooler"),
    ]
    for state, message in cases:
        with pytest.raises(CheckpointError, match=message):
            load_official_weights(task, state, "vqa.model")
    assert all(torch.equal(before[name], value) for name, value in task.state_dict().items())  # nothing loaded


def test_ignore_drops_named_tensors_on_purpose():
    state = official_pretraining(torch.Generator().manual_seed(7))
    model = pretraining_task()
    del model.objectives["mlm_text"]  # a recipe without the text-only stream
    with pytest.raises(CheckpointError, match="text-only stream"):
        convert_official_state_dict(state, model)
    report = convert_official_state_dict(state, model, ignore=["aux_text_visual_embedding"])
    assert report.ignored == ["aux_text_visual_embedding.weight"]


# --- tests: the converted model computes the official equations -----------------------------


def test_converted_vqa_model_computes_the_official_equations():
    state = official_vqa(torch.Generator().manual_seed(8))
    task = vqa_task().double()
    load_official_weights(task, state)
    batch = make_batch()
    with torch.no_grad():
        logits = task.eval().logits(batch)
    for b in range(2):
        x, _, _ = official_sample(state, batch, b)
        hidden = x[int(batch.answer_positions[b])]
        expected = linear(layer_norm(gelu(linear(hidden, state, "final_mlp.0.dense")), state, "final_mlp.0.LayerNorm"), state, "final_mlp.2")
        torch.testing.assert_close(logits[b], expected, atol=1e-10, rtol=0)


def test_converted_pretraining_model_computes_the_official_equations():
    state = official_pretraining(torch.Generator().manual_seed(9))
    task = pretraining_task().double()
    load_official_weights(task, state)
    batch = make_batch(masked=True)
    with torch.no_grad():
        output = task.model.eval()(batch, token_select=batch.text_mask, region_select=batch.region_mask)
    text_rows, region_rows = [], []
    for b in range(2):
        x, n, regions = official_sample(state, batch, b)
        text_rows.append(x[:n])
        region_rows.append(x[n : n + len(regions)])
    text, regions = torch.cat(text_rows), torch.cat(region_rows)
    mlm = layer_norm(gelu(linear(text, state, "vlbert.mlm_head.predictions.transform.dense")), state, "vlbert.mlm_head.predictions.transform.LayerNorm")
    mlm = mlm @ state["vlbert.mlm_head.predictions.decoder.weight"].T + state["vlbert.mlm_head.predictions.bias"]
    mvrc = linear(gelu(linear(regions, state, "vlbert.mvrc_head.transform.dense")), state, "vlbert.mvrc_head.region_cls_pred")
    torch.testing.assert_close(output.mlm_logits, mlm, atol=1e-10, rtol=0)
    torch.testing.assert_close(output.region_logits, mvrc, atol=1e-10, rtol=0)


def test_converted_refcoco_and_vcr_heads_compute_the_official_equations():
    state = official_refcoco(torch.Generator().manual_seed(10), precomputed=True)
    task = refcoco_task(precomputed=True).double()
    load_official_weights(task, state)
    batch = make_batch()
    with torch.no_grad():
        scores = task.eval()(batch).model_output
    for b in range(2):
        x, n, regions = official_sample(state, batch, b)
        expected = linear(gelu(linear(x[n : n + len(regions)], state, "final_mlp.0.dense")), state, "final_mlp.2").squeeze(-1)
        torch.testing.assert_close(scores[b, regions], expected, atol=1e-10, rtol=0)

    vcr = official_vcr(torch.Generator().manual_seed(11), precomputed=True)
    model = VCRTask(vlbert(pooler=True), ChoiceHead(H), RegionScoreHead(H, REGION_CLASSES, xavier=False)).double()
    load_official_weights(model, vcr)
    with torch.no_grad():
        logits = model.eval().head(model.vlbert(batch).pooled)
    unwrapped = {key.replace("vlbert._module.", "vlbert."): value for key, value in vcr.items()}
    for b in range(2):
        x, _, _ = official_sample(unwrapped, batch, b)
        expected = linear(torch.tanh(linear(x[0], unwrapped, "vlbert.pooler.dense")), unwrapped, "final_mlp.1")
        torch.testing.assert_close(logits[b], expected[0], atol=1e-10, rtol=0)


# --- tests: files and the command -----------------------------------------------------------


def test_reading_official_files(tmp_path):
    import numpy as np

    state = ddp(official_vqa(torch.Generator().manual_seed(13)))
    path = tmp_path / "vqa-0019.model"
    torch.save({"state_dict": state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}, "validation_monitor": {"best_epoch": 19, "best_val": np.float64(0.71)}}, path)
    assert read_official_checkpoint(path).keys() == state.keys()
    truncated = tmp_path / "truncated.model"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated.model: not a readable PyTorch checkpoint"):
        read_official_checkpoint(truncated)
    pickled = tmp_path / "pickled.model"
    torch.save({"state_dict": state, "config": CheckpointError("an object")}, pickled)
    with pytest.raises(CheckpointError, match="pickled.model: holds pickled objects other than tensors"):
        read_official_checkpoint(pickled)
    with pytest.raises(CheckpointError, match="no such file"):
        read_official_checkpoint(tmp_path / "absent.model")


def tiny_vqa_recipe(tmp_path):
    recipe = tmp_path / "tiny_vqa.gin"
    recipe.write_text(
        "include 'models/vlbert_tiny.gin'\ninclude 'features/precomputed.gin'\ninclude 'finetune/vqa.gin'\n"
        f"HIDDEN_SIZE = {H}\nNUM_LAYERS = {LAYERS}\nINTERMEDIATE_SIZE = {FFN}\nVOCAB_SIZE = {VOCAB}\nAPPEARANCE_SIZE = {APPEARANCE}\n"
        f"RegionGeometryEmbedding.dim = {GEOMETRY_DIM}\nVLEmbedding.max_position_embeddings = {POSITIONS}\nAnswerHead.num_answers = {ANSWERS}\n"
    )
    return recipe


def test_convert_command_writes_a_checkpoint_that_eval_loads(tmp_path):
    recipe = tiny_vqa_recipe(tmp_path)
    state = ddp(official_vqa(torch.Generator().manual_seed(14)))
    state["module.final_mlp.2.bias"] = torch.tensor([0.5, 1.5, 2.5, 3.5, 4.5], dtype=torch.float64)
    source = tmp_path / "vl-bert-vqa.model"
    torch.save({"state_dict": {key: value.half() for key, value in state.items()}, "optimizer": {}}, source)
    out = tmp_path / "converted.safetensors"
    runner = CliRunner()
    result = runner.invoke(app, ["convert", "official", str(source), "--recipe", str(recipe), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    with safe_open(str(out), "pt") as handle:
        assert handle.metadata()["converted_from"] == str(source) and "VQATask" in handle.metadata()["recipe"]
        assert handle.get_tensor("head.classifier.bias").tolist() == [0.5, 1.5, 2.5, 3.5, 4.5]

    parse_recipe(recipe, ["build_model.bert_directory = None"])
    task = build_from_recipe(recipe, build_from_recipe(recipe, experiment)[0])
    load_checkpoint(task, out)  # what `vlblocks eval --checkpoint` does
    assert task.head.classifier.bias.tolist() == [0.5, 1.5, 2.5, 3.5, 4.5]

    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a checkpoint")
    refused = runner.invoke(app, ["convert", "official", str(bad), "--recipe", str(recipe), "--out", str(tmp_path / "never.safetensors")])
    assert refused.exit_code == 2 and "bad.model: not a readable PyTorch checkpoint" in refused.output
    mismatch = runner.invoke(app, ["convert", "official", str(source), "--recipe", str(recipe), "--out", str(out), "--bind", "AnswerHead.num_answers = 4"])
    assert mismatch.exit_code == 2 and "head.classifier.weight needs (4, 32)" in mismatch.output
    assert sorted(path.name for path in tmp_path.iterdir() if "safetensors" in path.name) == ["converted.safetensors"]
    with safe_open(str(out), "pt") as handle:  # the failed conversion left the earlier file as it was
        assert handle.get_tensor("head.classifier.bias").tolist() == [0.5, 1.5, 2.5, 3.5, 4.5]


def test_a_converted_pretraining_file_starts_fine_tuning_through_experiment_pretrained(tmp_path):
    from vlblocks.interop.official_vlbert import write_weights_file
    from vlblocks.train.checkpoint import load_pretrained

    state = ddp(official_pretraining(torch.Generator().manual_seed(15)))
    state["module.vlbert.word_embeddings.weight"][9] = 4.0
    state["module.vlbert.mlm_head.predictions.decoder.weight"] = state["module.vlbert.word_embeddings.weight"]
    pretraining = pretraining_task()
    load_official_weights(pretraining, state)
    out = write_weights_file(pretraining, tmp_path / "vl-bert-base-prec.safetensors", {"step": "0", "recipe": ""})
    task = vqa_task()
    load_pretrained(task, out, task.pretrained_prefixes)  # what experiment.pretrained does
    assert torch.equal(task.vlbert.embedding.word_embeddings.weight[9], torch.full((H,), 4.0))
    assert torch.equal(task.head.transform.dense.weight, state["module.vlbert.mlm_head.predictions.transform.dense.weight"].float())
    assert [path.name for path in tmp_path.iterdir()] == ["vl-bert-base-prec.safetensors"]  # no temporary file left
