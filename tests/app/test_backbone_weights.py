"""A training run's ResNet starts from EndToEndRegionFeatures.backbone_checkpoint, a pre-trained
checkpoint, or random weights only on purpose (or on the embedded demo data, said aloud)."""

import pytest
import torch

from vlblocks.app.recipes import RecipeError
from vlblocks.app.run import build_run
from vlblocks.blocks.backbones import DilatedC5RoIHead, ResNetC4Backbone
from vlblocks.data.demo.scenes import write_demo_dataset
from vlblocks.models.vlbert import VLBert

RECIPE = "recipes/demo/vlbert_demo.gin"
TINY_RESNET = [  # the demo model over a tiny ResNet C4 + dilated C5 (stem width 2, one block per stage)
    "HIDDEN_SIZE = 64",
    "NUM_LAYERS = 1",
    "INTERMEDIATE_SIZE = 64",
    "APPEARANCE_SIZE = 64",
    "EndToEndRegionFeatures.backbone = @ResNetC4Backbone()",
    "EndToEndRegionFeatures.roi_head = @DilatedC5RoIHead()",
    "ResNetC4Backbone.base_width = 2",
    "ResNetC4Backbone.stage_blocks = [1, 1, 1]",
    "DilatedC5RoIHead.in_channels = 32",
    "DilatedC5RoIHead.base_width = 2",
    "DilatedC5RoIHead.num_blocks = 1",
]


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo"), train=8, val=4)


def demo_bindings(demo_files) -> list[str]:
    return [f"DemoScenes.directory = '{demo_files.root}'", "DemoScenes.train = 8", "DemoScenes.val = 4", *TINY_RESNET]


def real_data_bindings(demo_files) -> list[str]:
    """The demo scenes' files named as real data: the run is then no demo run."""
    return [
        *demo_bindings(demo_files),
        f"pretraining_data.train_annotations = '{demo_files.train}'",
        f"pretraining_data.val_annotations = '{demo_files.val}'",
        f"pretraining_data.corpus = '{demo_files.corpus}'",
        f"pretraining_data.vocab = '{demo_files.vocab}'",
    ]


def vgbua_file(path):
    """A tiny file in the official flat layout (tests/interop checks the layout's names; here the
    wiring): the backbone's keys, the head's under `layer4.`, bn1's variances 4 and 9, a head bias 2.25."""
    state = ResNetC4Backbone(base_width=2, stage_blocks=[1, 1, 1]).state_dict()
    state.update({"layer4." + k: v for k, v in DilatedC5RoIHead(in_channels=32, base_width=2, num_blocks=1).state_dict().items()})
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    state["bn1.running_var"] = torch.tensor([4.0, 9.0])
    state["layer4.0.bn3.bias"] = torch.full((64,), 2.25)
    torch.save(state, path)


def features_of(task):
    vlbert = next(module for module in task.modules() if isinstance(module, VLBert))
    return vlbert.region_features


def test_training_on_real_data_without_a_backbone_file_is_refused_naming_the_binding(demo_files):
    with pytest.raises(RecipeError, match=r"random weights: set EndToEndRegionFeatures\.backbone_checkpoint = .*EndToEndRegionFeatures\.random_backbone = True"):
        build_run(RECIPE, real_data_bindings(demo_files), echo=lambda _: None, refuse_random_backbone=True)


def test_opting_in_or_not_training_builds(demo_files):
    lines = []
    build_run(RECIPE, [*real_data_bindings(demo_files), "EndToEndRegionFeatures.random_backbone = True"], lines.append, refuse_random_backbone=True)
    build_run(RECIPE, real_data_bindings(demo_files), lines.append)  # eval / predict: a checkpoint follows
    assert not any("random weights" in line for line in lines)


def test_demo_data_accepts_a_random_backbone_and_says_so(demo_files):
    lines = []
    build_run(RECIPE, demo_bindings(demo_files), lines.append, refuse_random_backbone=True)
    assert any(line.startswith("embedded demo data: the ResNet backbone and C5 RoI head start from random weights") for line in lines)


def test_backbone_checkpoint_binding_loads_the_file(demo_files, tmp_path):
    path = tmp_path / "resnet101-pt-vgbua-0000.model"
    vgbua_file(path)
    lines = []
    task, _, _ = build_run(
        RECIPE, [*real_data_bindings(demo_files), f"EndToEndRegionFeatures.backbone_checkpoint = '{path}'"], lines.append, refuse_random_backbone=True
    )
    features = features_of(task)
    assert features.backbone.bn1.running_var.tolist() == [4.0, 9.0]  # hand-chosen in torchvision_state
    assert features.roi_head[0].bn3.bias[0].item() == 2.25
    # 5 stem tensors (conv1 + 4 of bn1) + 4 stages x (4 convs + 4 BatchNorms x 4) = 5 + 80
    assert any(line.startswith(f"loaded 85 tensors from {path} (official VL-BERT vgbua layout)") for line in lines)


def test_file_and_random_opt_in_together_are_refused(demo_files, tmp_path):
    with pytest.raises(RecipeError, match=r"backbone_checkpoint and EndToEndRegionFeatures\.random_backbone = True contradict"):
        build_run(
            RECIPE,
            [*demo_bindings(demo_files), f"EndToEndRegionFeatures.backbone_checkpoint = '{tmp_path}/x.model'", "EndToEndRegionFeatures.random_backbone = True"],
            echo=lambda _: None,
        )


def test_tiny_and_identity_backbones_need_no_opt_in(demo_files):
    bindings = [f"DemoScenes.directory = '{demo_files.root}'", "DemoScenes.train = 8", "DemoScenes.val = 4"]
    real = [f"pretraining_data.{k} = '{getattr(demo_files, v)}'" for k, v in (("train_annotations", "train"), ("val_annotations", "val"), ("corpus", "corpus"), ("vocab", "vocab"))]
    build_run(RECIPE, [*bindings, *real, "HIDDEN_SIZE = 64", "NUM_LAYERS = 1"], echo=lambda _: None, refuse_random_backbone=True)
