"""Loading a ResNet file into the end-to-end front end, in the three layouts users have.

The files are built here, tiny (stem width 2, one block per stage), under the names each layout
uses: torchvision's (the official `resnet101-pt-vgbua-0000.model` is the same flat dict without
`fc`, read by the official `common/fast_rcnn.py`: `layer4.*` to the RoI head, the rest to the
backbone) and detectron's blob names. The names are written out here from those layouts, not
taken from the vlblocks modules.
"""

import pickle

import numpy as np
import pytest
import torch

from vlblocks.blocks.backbones import DilatedC5RoIHead, ResNetC4Backbone
from vlblocks.interop.resnet_weights import DETECTRON, TORCHVISION, VGBUA, detectron_name, load_resnet_weights, read_resnet_file
from vlblocks.train.checkpoint import CheckpointError

WIDTH = 2  # stem width; stage s (1..4) has inner width 2 * 2**(s-1) and output 4x that
IN_CHANNELS = {1: 2, 2: 8, 3: 16, 4: 32}  # input channels of each stage's first block


def tiny_front_end(stride_in_1x1: bool = True) -> tuple[ResNetC4Backbone, DilatedC5RoIHead]:
    backbone = ResNetC4Backbone(base_width=WIDTH, stage_blocks=[1, 1, 1], stride_in_1x1=stride_in_1x1)
    head = DilatedC5RoIHead(in_channels=32, base_width=WIDTH, num_blocks=1)
    return backbone, head


def block_shapes(stage: int) -> dict[str, tuple[int, ...]]:
    """torchvision names and shapes of block 0 of `layer{stage}` (a bottleneck with downsample)."""
    mid, cin = WIDTH * 2 ** (stage - 1), IN_CHANNELS[stage]
    shapes = {"conv1.weight": (mid, cin, 1, 1), "conv2.weight": (mid, mid, 3, 3), "conv3.weight": (4 * mid, mid, 1, 1)}
    shapes["downsample.0.weight"] = (4 * mid, cin, 1, 1)
    for norm, channels in (("bn1", mid), ("bn2", mid), ("bn3", 4 * mid), ("downsample.1", 4 * mid)):
        shapes.update({f"{norm}.{p}": (channels,) for p in ("weight", "bias", "running_mean", "running_var")})
    return {f"layer{stage}.0.{name}": shape for name, shape in shapes.items()}


def torchvision_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {"conv1.weight": (WIDTH, 3, 7, 7), **{f"bn1.{p}": (WIDTH,) for p in ("weight", "bias", "running_mean", "running_var")}}
    for stage in (1, 2, 3, 4):
        shapes.update(block_shapes(stage))
    return shapes


def torchvision_state(classifier: bool) -> dict[str, torch.Tensor]:
    """Each tensor filled with its own value (0.01 * its index), with a few hand-chosen ones."""
    state = {name: torch.full(shape, 0.01 * i) for i, (name, shape) in enumerate(torchvision_shapes().items())}
    state["conv1.weight"] = torch.arange(2 * 3 * 7 * 7, dtype=torch.float32).reshape(2, 3, 7, 7)
    state["bn1.running_var"] = torch.tensor([4.0, 9.0])
    state["layer3.0.downsample.1.running_mean"] = torch.full((32,), -1.5)
    state["layer4.0.conv2.weight"] = torch.full((16, 16, 3, 3), 0.5)
    state["layer4.0.bn3.bias"] = torch.full((64,), 2.25)
    if classifier:
        state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 64), torch.zeros(1000)
    return state


def target_of(backbone, head, name: str) -> torch.Tensor:
    """The model tensor a torchvision name should land on: layer4.* in the head, the rest in the backbone."""
    if name.startswith("layer4."):
        return head.state_dict()[name[len("layer4.") :]]
    return backbone.state_dict()[name]


# --- the official vgbua file and torchvision -----------------------------------------------------


def test_official_vgbua_file_places_every_tensor(tmp_path):
    path = tmp_path / "resnet101-pt-vgbua-0000.model"
    state = torchvision_state(classifier=False)
    torch.save(state, path)
    backbone, head = tiny_front_end()
    report = load_resnet_weights(backbone, head, path)
    assert report.layout == VGBUA and report.placed == len(state) and report.left_out == []
    for name, tensor in state.items():
        assert torch.equal(target_of(backbone, head, name), tensor), name
    # hand-chosen spots: the stem's first weights 0, 1, 2; bn1's variances; layer4 block 0 in head[0]
    assert backbone.conv1.weight[0, 0, 0, :3].tolist() == [0.0, 1.0, 2.0]
    assert backbone.bn1.running_var.tolist() == [4.0, 9.0]
    assert backbone.layer3[0].downsample[1].running_mean[0].item() == -1.5
    assert head[0].conv2.weight[3, 5, 1, 1].item() == 0.5
    assert head[0].bn3.bias[63].item() == 2.25


def test_torchvision_file_leaves_out_the_classifier_and_needs_the_3x3_stride(tmp_path):
    path = tmp_path / "resnet101-63fe2227.pth"
    torch.save(torchvision_state(classifier=True), path)
    with pytest.raises(CheckpointError, match=r"resnet101-63fe2227.pth.*3x3 conv; bind ResNetC4Backbone.stride_in_1x1 = False"):
        load_resnet_weights(*tiny_front_end(stride_in_1x1=True), path)
    backbone, head = tiny_front_end(stride_in_1x1=False)
    report = load_resnet_weights(backbone, head, path)
    assert report.layout == TORCHVISION and report.left_out == ["fc.weight", "fc.bias"]
    assert "left out on purpose (classifier, solver state): fc.weight, fc.bias" in str(report)
    assert head[0].bn3.bias[0].item() == 2.25


def test_legacy_torch_save_format_is_read(tmp_path):
    path = tmp_path / "old.model"
    torch.save(torchvision_state(classifier=False), path, _use_new_zipfile_serialization=False)
    backbone, head = tiny_front_end()
    assert load_resnet_weights(backbone, head, path).layout == VGBUA
    assert backbone.bn1.running_var.tolist() == [4.0, 9.0]


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda s: s.pop("layer2.0.bn1.running_mean"), r"missing from the file: layer2\.0\.bn1\.running_mean"),
        (lambda s: s.update({"layer3.1.conv1.weight": torch.zeros(8, 32, 1, 1)}), r"not in the model: layer3\.1\.conv1\.weight"),
        (lambda s: s.update({"layer4.0.conv1.weight": torch.zeros(16, 32, 3, 3)}), r"wrong shape: layer4\.0\.conv1\.weight \[16, 32, 3, 3\] \(the model has \[16, 32, 1, 1\]\)"),
    ],
)
def test_strict_errors_name_the_tensor_and_change_nothing(tmp_path, change, message):
    state = torchvision_state(classifier=False)
    change(state)
    path = tmp_path / "bad.model"
    torch.save(state, path)
    backbone, head = tiny_front_end()
    before = backbone.conv1.weight.clone()
    with pytest.raises(CheckpointError, match=r"bad\.model \(official VL-BERT vgbua layout\).*" + message):
        load_resnet_weights(backbone, head, path)
    assert torch.equal(backbone.conv1.weight, before)


def test_num_batches_tracked_is_placed_when_the_file_has_it(tmp_path):
    state = torchvision_state(classifier=False)
    state["bn1.num_batches_tracked"] = torch.tensor(7)
    path = tmp_path / "with_counts.model"
    torch.save(state, path)
    backbone, head = tiny_front_end()
    load_resnet_weights(backbone, head, path)
    assert backbone.bn1.num_batches_tracked.item() == 7 and head[0].bn1.num_batches_tracked.item() == 0


# --- detectron / caffe2 R-101.pkl ---------------------------------------------------------------


def detectron_blobs() -> dict[str, np.ndarray]:
    """detectron names: conv1_w, res_conv1_bn_{s,b}, res{2..5}_0_branch{2a,2b,2c,1}_{w,bn_s,bn_b}."""
    blobs = {"conv1_w": np.zeros((2, 3, 7, 7), np.float32), "res_conv1_bn_s": np.array([3.5, 1.0], np.float32)}
    blobs["res_conv1_bn_b"] = np.array([0.25, 0.0], np.float32)
    for stage in (2, 3, 4, 5):
        mid, cin = WIDTH * 2 ** (stage - 2), IN_CHANNELS[stage - 1]
        prefix = f"res{stage}_0_"
        for branch, shape in (("branch2a", (mid, cin, 1, 1)), ("branch2b", (mid, mid, 3, 3)), ("branch2c", (4 * mid, mid, 1, 1)), ("branch1", (4 * mid, cin, 1, 1))):
            blobs[prefix + branch + "_w"] = np.full(shape, 0.125 * stage, np.float32)
            blobs[prefix + branch + "_bn_s"] = np.full(shape[0], 2.0, np.float32)
            blobs[prefix + branch + "_bn_b"] = np.full(shape[0], -0.5, np.float32)
            blobs[prefix + branch + "_w_momentum"] = np.zeros(shape, np.float32)
    blobs["res5_0_branch2b_w"][0, 0, 0, 0] = 9.0
    blobs["fc1000_w"], blobs["fc1000_b"] = np.zeros((1000, 64), np.float32), np.zeros(1000, np.float32)
    return blobs


class Python2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` (SHORT_BINSTRING / BINSTRING), as detectron's cPickle did."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        self.write((pickle.SHORT_BINSTRING + bytes([len(obj)]) if len(obj) < 256 else pickle.BINSTRING + len(obj).to_bytes(4, "little")) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def python2_pickle(blobs: dict) -> bytes:
    """A protocol-2 pickle with Python 2 str names and numpy 1's `numpy.core.multiarray` global."""
    import io

    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=2).dump({b"blobs": {name.encode(): value for name, value in blobs.items()}})
    return buffer.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


@pytest.mark.parametrize("python2", [True, False])
def test_detectron_pickle_maps_names_and_sets_affine_statistics(tmp_path, python2):
    path = tmp_path / "R-101.pkl"
    blobs = detectron_blobs()
    path.write_bytes(python2_pickle(blobs) if python2 else pickle.dumps(blobs, protocol=4))
    backbone, head = tiny_front_end()
    report = load_resnet_weights(backbone, head, path)
    assert report.layout == DETECTRON
    assert sorted(report.left_out) == sorted(["fc1000_w", "fc1000_b", *(n for n in blobs if n.endswith("_momentum"))])
    # 1 stem + 4 stages x 4 (conv, bn) pairs = 17 BatchNorms, each given mean 0 and variance 1 - 1e-5
    assert report.affine_only == 17
    # 1 conv + 4 per BN (weight, bias and the two statistics) for the stem; 4 x 4 x 5 for the stages
    assert report.placed == 5 + 80
    assert backbone.bn1.weight.tolist() == [3.5, 1.0] and backbone.bn1.bias.tolist() == [0.25, 0.0]
    assert backbone.bn1.running_mean.tolist() == [0.0, 0.0]
    assert backbone.bn1.running_var.tolist() == pytest.approx([0.99999, 0.99999], abs=1e-7)  # float32
    assert backbone.layer2[0].conv2.weight[0, 0, 0, 0].item() == 0.375  # res3 -> layer2: 0.125 * 3
    assert backbone.layer3[0].downsample[0].weight[0, 0, 0, 0].item() == 0.5  # res4_0_branch1 -> layer3.0.downsample.0
    assert head[0].conv2.weight[0, 0, 0, 0].item() == 9.0  # res5_0_branch2b -> head block 0 conv2
    assert head[0].downsample[1].bias[0].item() == -0.5
    # the frozen BatchNorm is caffe2's AffineChannel: 3.5 * 2.0 + 0.25 = 7.25 on channel 0
    out = backbone.bn1(torch.full((1, 2, 1, 1), 2.0))
    assert out[0, 0, 0, 0].item() == pytest.approx(7.25, abs=1e-6)


def test_detectron_names():
    assert detectron_name("conv1_w") == "conv1.weight"
    assert detectron_name("res_conv1_bn_b") == "bn1.bias"
    assert detectron_name("res4_22_branch2c_bn_s") == "layer3.22.bn3.weight"
    assert detectron_name("res2_0_branch1_bn_b") == "layer1.0.downsample.1.bias"
    assert detectron_name("res5_2_branch2a_w") == "layer4.2.conv1.weight"
    assert detectron_name("res3_1_branch2b_bn_riv") == "layer2.1.bn2.running_var"
    assert detectron_name("pred_w") is None and detectron_name("res6_0_branch2a_w") is None


def test_detectron_unknown_blob_is_named(tmp_path):
    blobs = detectron_blobs()
    blobs["rpn_cls_logits_w"] = np.zeros((1, 1), np.float32)
    path = tmp_path / "R-101.pkl"
    path.write_bytes(pickle.dumps({"blobs": blobs}, protocol=2))
    with pytest.raises(CheckpointError, match=r"R-101\.pkl \(detectron/caffe2 layout\): blobs with no place in a ResNet: rpn_cls_logits_w"):
        read_resnet_file(path)


# --- unknown layouts ------------------------------------------------------------------------------


def test_unknown_layouts_name_the_file(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not weights")
    with pytest.raises(CheckpointError, match=r"notes\.txt: unknown ResNet weights layout"):
        read_resnet_file(text)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": torchvision_state(classifier=False)}, wrapped)
    with pytest.raises(CheckpointError, match=r"wrapped\.pth: unknown ResNet weights layout: not a flat name -> tensor state dict"):
        read_resnet_file(wrapped)
    other = tmp_path / "bert.pth"
    torch.save({"embeddings.word_embeddings.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(CheckpointError, match=r"bert\.pth: unknown ResNet weights layout: no conv1\.weight"):
        read_resnet_file(other)
    pickled = tmp_path / "refs.p"
    pickled.write_bytes(pickle.dumps({"refs": [1, 2]}, protocol=2))
    with pytest.raises(CheckpointError, match=r"refs\.p: unknown ResNet weights layout: a pickle with neither 'blobs' nor 'conv1_w'"):
        read_resnet_file(pickled)
    with pytest.raises(CheckpointError, match=r"missing\.pkl: no such ResNet weights file"):
        read_resnet_file(tmp_path / "missing.pkl")
