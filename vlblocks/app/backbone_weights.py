"""Where a run's ResNet backbone starts: the file `EndToEndRegionFeatures.backbone_checkpoint` names,
a pre-trained or resumed checkpoint, or (on purpose only) random weights."""

from __future__ import annotations

from torch import nn

from vlblocks.app.recipes import RecipeError
from vlblocks.blocks.backbones import DilatedC5RoIHead, ResNetC4Backbone
from vlblocks.blocks.region_features import EndToEndRegionFeatures
from vlblocks.contracts import Echo
from vlblocks.interop.resnet_weights import load_resnet_weights

CHECKPOINT_BINDING = "EndToEndRegionFeatures.backbone_checkpoint"
RANDOM_BINDING = "EndToEndRegionFeatures.random_backbone"


def has_pretrained_weights(features: EndToEndRegionFeatures) -> bool:
    """A ResNet backbone or C5 head: parts that published weights exist for (not Tiny/Identity)."""
    return isinstance(features.backbone, ResNetC4Backbone) or isinstance(features.roi_head, DilatedC5RoIHead)


def start_backbones(task: nn.Module, pretrained: str | None, is_demo: bool, refuse_random: bool, echo: Echo) -> None:
    """Load each end-to-end front end's `backbone_checkpoint`; refuse a random ResNet when asked.

    Args:
        task: the built task; every `EndToEndRegionFeatures` in it is visited.
        pretrained: `experiment.pretrained` (loaded afterwards; it holds the backbone).
        is_demo: the run reads the embedded demo data, where a random backbone is accepted (said).
        refuse_random: a training run that does not resume: a ResNet with no file, no pre-trained
            checkpoint and no `random_backbone = True` is a `RecipeError` naming the binding.
    """
    for features in (module for module in task.modules() if isinstance(module, EndToEndRegionFeatures)):
        if features.backbone_checkpoint is not None and features.random_backbone:
            raise RecipeError(f"{CHECKPOINT_BINDING} and {RANDOM_BINDING} = True contradict each other: set one")
        if features.backbone_checkpoint is not None:
            echo(str(load_resnet_weights(features.backbone, features.roi_head, features.backbone_checkpoint)))
        elif refuse_random and has_pretrained_weights(features) and not features.random_backbone and pretrained is None:
            _refuse_or_announce(is_demo, echo)


def _refuse_or_announce(is_demo: bool, echo: Echo) -> None:
    if not is_demo:
        raise RecipeError(
            f"the ResNet backbone and C5 RoI head would train from random weights: set {CHECKPOINT_BINDING} = "
            "'/path/to/resnet101-pt-vgbua-0000.model' (or a torchvision resnet101-*.pth / detectron R-101.pkl), "
            f"start from experiment.pretrained, or opt in with {RANDOM_BINDING} = True"
        )
    echo(f"embedded demo data: the ResNet backbone and C5 RoI head start from random weights (set {CHECKPOINT_BINDING} for real ones)")
