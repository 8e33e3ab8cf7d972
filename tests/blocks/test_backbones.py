import pytest
import torch
from torch import nn

from vlblocks.blocks.backbones import (
    DilatedC5RoIHead,
    PooledRoIHead,
    ResNetC4Backbone,
    TinyBackbone,
)


def tiny_backbone(**kwargs) -> ResNetC4Backbone:
    return ResNetC4Backbone(base_width=8, stage_blocks=[1, 2, 2], **kwargs)


def tiny_head(**kwargs) -> DilatedC5RoIHead:
    return DilatedC5RoIHead(in_channels=128, base_width=8, num_blocks=2, **kwargs)


# --- shapes -----------------------------------------------------------------


@pytest.mark.parametrize("size,expected", [((64, 96), (4, 6)), ((65, 97), (5, 7)), ((33, 16), (3, 1))])
def test_c4_output_shape_and_stride(size, expected):
    torch.manual_seed(0)
    backbone = tiny_backbone().eval()
    assert backbone.stride == 16 and backbone.out_channels == 128
    out = backbone(torch.randn(2, 3, *size))
    assert out.shape == (2, 128, *expected)


def test_full_resnet101_forward_small_image():
    torch.manual_seed(0)
    backbone = ResNetC4Backbone(depth=101).eval()
    head = DilatedC5RoIHead().eval()
    assert backbone.out_channels == 1024 and head.out_channels == 2048
    with torch.no_grad():
        fmap = backbone(torch.randn(1, 3, 64, 96))
        rois = head(torch.randn(2, 1024, 14, 14))
    assert fmap.shape == (1, 1024, 4, 6)
    assert rois.shape == (2, 2048)
    assert torch.isfinite(fmap).all() and torch.isfinite(rois).all()


def test_depth50_blocks():
    with torch.device("meta"):
        backbone = ResNetC4Backbone(depth=50)
    assert [len(backbone.layer1), len(backbone.layer2), len(backbone.layer3)] == [3, 4, 6]
    with pytest.raises(ValueError):
        ResNetC4Backbone(depth=34)


def test_head_preserves_roi_grid_and_pools():
    torch.manual_seed(0)
    head = tiny_head().eval()
    x = torch.randn(3, 128, 14, 14)
    fmap = head.feature_map(x)
    assert fmap.shape == (3, 256, 14, 14)
    torch.testing.assert_close(head(x), fmap.mean(dim=(2, 3)))


def test_head_pools_masked_feature_map():
    # VCR multiplies the map by instance masks before pooling; the map must be mask-able.
    head = tiny_head().eval()
    fmap = head.feature_map(torch.randn(2, 128, 14, 14))
    mask = torch.zeros(2, 1, 14, 14)
    mask[..., :7, :] = 1
    pooled = (fmap * mask).sum(dim=(2, 3)) / mask.sum(dim=(2, 3))
    torch.testing.assert_close(pooled, fmap[..., :7, :].mean(dim=(2, 3)))


# --- naming -----------------------------------------------------------------


def test_resnet101_state_dict_names_match_torchvision():
    with torch.device("meta"):
        backbone = ResNetC4Backbone(depth=101)
        head = DilatedC5RoIHead()
    keys = set(backbone.state_dict())
    expected = {
        "conv1.weight",
        "bn1.weight",
        "bn1.bias",
        "bn1.running_mean",
        "bn1.running_var",
        "bn1.num_batches_tracked",
        "layer1.0.conv1.weight",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.running_mean",
        "layer1.2.bn3.running_var",
        "layer2.0.downsample.0.weight",
        "layer2.3.conv2.weight",
        "layer3.0.downsample.1.weight",
        "layer3.22.conv3.weight",
        "layer3.22.bn3.bias",
    }
    assert expected <= keys
    assert not any(k.startswith("layer4") or k.startswith("fc") for k in keys)
    assert not any(k.endswith("bias") and ".conv" in k for k in keys)  # convs have no bias
    assert [len(backbone.layer1), len(backbone.layer2), len(backbone.layer3)] == [3, 4, 23]
    # only the first block of each stage has a projection shortcut
    assert {k.split(".downsample")[0] for k in keys if ".downsample." in k} == {
        "layer1.0",
        "layer2.0",
        "layer3.0",
    }
    # conv weights: stem + 3 per block + 3 downsamples
    assert sum(k.endswith("weight") and "conv" in k for k in keys) == 1 + 3 * (3 + 4 + 23)

    head_keys = set(head.state_dict())
    assert {
        "0.conv1.weight",
        "0.downsample.0.weight",
        "0.downsample.1.running_var",
        "1.conv2.weight",
        "2.bn3.weight",
        "2.bn3.running_mean",
    } <= head_keys
    assert len(head) == 3 and {k.split(".")[0] for k in head_keys} == {"0", "1", "2"}
    assert not any(k.startswith("2.downsample") or k.startswith("1.downsample") for k in head_keys)
    assert head[0].conv1.weight.shape == (512, 1024, 1, 1)
    assert head[2].conv3.weight.shape == (2048, 512, 1, 1)
    assert backbone.layer3[22].conv3.weight.shape == (1024, 256, 1, 1)


def test_loads_state_dict_by_name():
    src, dst = tiny_backbone(), tiny_backbone()
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
    dst.load_state_dict(src.state_dict(), strict=True)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(dst.eval()(x), src.eval()(x))


# --- stride / dilation placement ---------------------------------------------


def test_caffe_style_stride_in_1x1():
    backbone = tiny_backbone()
    for stage in (backbone.layer2, backbone.layer3):
        first = stage[0]
        assert first.conv1.stride == (2, 2) and first.conv2.stride == (1, 1)
        assert first.downsample[0].stride == (2, 2)
        assert stage[1].conv1.stride == (1, 1) and stage[1].conv2.stride == (1, 1)
    assert backbone.layer1[0].conv1.stride == (1, 1)
    assert backbone.conv1.stride == (2, 2) and backbone.conv1.kernel_size == (7, 7)
    assert backbone.conv1.padding == (3, 3)


def test_torchvision_style_stride_in_3x3():
    backbone = tiny_backbone(stride_in_1x1=False).eval()
    first = backbone.layer2[0]
    assert first.conv1.stride == (1, 1) and first.conv2.stride == (2, 2)
    assert backbone(torch.randn(1, 3, 64, 96)).shape == (1, 128, 4, 6)


def test_head_is_dilated_with_stride_1():
    head = DilatedC5RoIHead()
    for block in head:
        assert block.conv2.dilation == (2, 2)
        assert block.conv2.padding == (2, 2)
        assert block.conv2.stride == (1, 1)
        assert block.conv1.stride == (1, 1)
    assert head[0].downsample[0].stride == (1, 1)


def test_head_dilation_changes_output():
    torch.manual_seed(0)
    dilated = tiny_head().eval()
    plain = tiny_head(dilation=1).eval()
    plain.load_state_dict(dilated.state_dict())
    assert plain[0].conv2.padding == (1, 1)
    x = torch.randn(1, 128, 14, 14)
    assert plain.feature_map(x).shape == dilated.feature_map(x).shape
    assert not torch.allclose(plain.feature_map(x), dilated.feature_map(x))


# --- freezing -----------------------------------------------------------------


def _bn_params(module: nn.Module):
    return [p for m in module.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()]


def test_frozen_parameters_default():
    backbone, head = tiny_backbone(), tiny_head()
    for name, p in backbone.named_parameters():
        frozen_stage = name.startswith(("conv1.", "bn1.", "layer1."))
        if frozen_stage or ".bn" in name or ".downsample.1." in name:
            assert not p.requires_grad, name
        else:
            assert p.requires_grad, name
    assert backbone.layer2[0].conv2.weight.requires_grad
    assert backbone.layer3[0].downsample[0].weight.requires_grad
    assert all(not p.requires_grad for p in _bn_params(backbone) + _bn_params(head))
    assert all(head[i].conv2.weight.requires_grad for i in range(len(head)))


@pytest.mark.parametrize(
    "freeze_at,frozen",
    [(0, []), (1, ["conv1", "bn1"]), (3, ["conv1", "bn1", "layer1", "layer2"])],
)
def test_freeze_at(freeze_at, frozen):
    backbone = tiny_backbone(freeze_at=freeze_at, freeze_batchnorm=False).train()
    for name, p in backbone.named_parameters():
        assert p.requires_grad == (name.split(".")[0] not in frozen), name
    # with trainable BN, only the frozen stages' BN layers stay in eval mode
    for name, m in backbone.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.training == (name.split(".")[0] not in frozen), name


def test_unfrozen_batchnorm_trains():
    backbone = tiny_backbone(freeze_at=0, freeze_batchnorm=False).train()
    assert backbone.bn1.training and backbone.bn1.weight.requires_grad
    before = backbone.layer2[0].bn1.running_mean.clone()
    backbone(torch.randn(2, 3, 32, 32))
    assert not torch.equal(before, backbone.layer2[0].bn1.running_mean)


def test_batchnorm_stays_in_eval_after_train():
    torch.manual_seed(0)
    backbone, head = tiny_backbone(), tiny_head()
    backbone.train()
    head.train()
    assert backbone.training and backbone.layer2.training and head.training
    bns = [m for m in list(backbone.modules()) + list(head.modules()) if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(bn.training for bn in bns)
    stats = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in bns]
    head(torch.randn(2, 128, 14, 14))
    backbone(torch.randn(2, 3, 32, 32))
    for bn, (mean, var) in zip(bns, stats):
        assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)


def test_gradients_flow_only_to_trainable_parts():
    torch.manual_seed(0)
    backbone, head = tiny_backbone().train(), tiny_head().train()
    fmap = backbone(torch.randn(2, 3, 32, 32))
    loss = fmap.square().mean() + head(torch.randn(2, 128, 14, 14)).square().mean()
    loss.backward()
    for conv in (backbone.layer2[0].conv1, backbone.layer3[1].conv2, head[0].conv2, head[1].conv3):
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    for p in (backbone.conv1.weight, backbone.layer1[0].conv2.weight, *_bn_params(backbone), *_bn_params(head)):
        assert p.grad is None


# --- small stand-ins ----------------------------------------------------------


@pytest.mark.parametrize("stride", [1, 4, 8, 16])
def test_tiny_backbone_shapes(stride):
    net = TinyBackbone(out_channels=16, stride=stride, width=8)
    assert net.out_channels == 16 and net.stride == stride
    out = net(torch.randn(2, 3, 64, 96))
    assert out.shape == (2, 16, 64 // stride, 96 // stride)


def test_tiny_backbone_defaults_and_validation():
    net = TinyBackbone()
    assert (net.out_channels, net.stride) == (64, 8)
    assert net(torch.randn(1, 3, 30, 41)).shape == (1, 64, 4, 6)
    with pytest.raises(ValueError):
        TinyBackbone(stride=6)


def test_pooled_roi_head_with_projection():
    head = PooledRoIHead(16, 32)
    x = torch.randn(5, 16, 7, 7)
    assert head.out_channels == 32
    assert head.feature_map(x).shape == (5, 32, 7, 7)
    out = head(x)
    assert out.shape == (5, 32)
    torch.testing.assert_close(out, head.feature_map(x).mean(dim=(2, 3)))


def test_pooled_roi_head_identity():
    head = PooledRoIHead(16)
    x = torch.randn(5, 16, 7, 7)
    assert head.out_channels == 16 and not list(head.parameters())
    torch.testing.assert_close(head.feature_map(x), x)
    torch.testing.assert_close(head(x), x.mean(dim=(2, 3)))


def test_identity_backbone_and_flatten_head_keep_the_layout():
    from vlblocks.blocks.backbones import FlattenRoIHead, IdentityBackbone

    images = torch.randn(2, 3, 8, 8)
    backbone = IdentityBackbone()
    assert backbone(images) is images and backbone.stride == 1 and backbone.out_channels == 3
    head = FlattenRoIHead(3, 2, 5)
    grid = torch.randn(4, 3, 2, 2)
    expected = torch.relu(grid.reshape(4, 12) @ head.projection.weight.T + head.projection.bias)
    torch.testing.assert_close(head(grid), expected)
    # a spatial permutation changes the output (mean pooling would not see it)
    assert not torch.allclose(head(grid), head(grid.flip(-1)))
