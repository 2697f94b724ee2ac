import pytest
import torch
import torchvision

import resnet

PARAMS_1000 = {"resnet18": 11_689_512, "resnet50": 25_557_032, "resnet152": 60_192_808}


@pytest.mark.parametrize("name", list(resnet.MODELS))
def test_parameter_count_matches_torchvision(name):
    ours = resnet.build_model(name, num_classes=1000)
    theirs = getattr(torchvision.models, name)(num_classes=1000)
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in theirs.parameters()) == PARAMS_1000[name]


@pytest.mark.parametrize("name", list(resnet.MODELS))
@pytest.mark.parametrize("num_classes", [2, 7])
def test_torchvision_weights_load_strict_and_give_same_outputs(name, num_classes):
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, name)(num_classes=num_classes).eval()
    ours = resnet.build_model(name, num_classes=num_classes)
    theirs_sd = theirs.state_dict()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs_sd.items()}
    ours.load_state_dict(theirs_sd, strict=True)
    ours.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("side", [32, 33, 57])
def test_any_side_from_32_and_channels_last(name, side):
    model = resnet.build_model(name).eval()
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        out = model(x)
        out_cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert out.shape == (2, 2)
    torch.testing.assert_close(out, out_cl, atol=1e-4, rtol=1e-4)


def test_zero_init_residual_zeroes_last_bn_of_each_block():
    model = resnet.resnet50(zero_init_residual=True)
    assert all(torch.count_nonzero(b.bn3.weight) == 0 for layer in (model.layer1, model.layer4) for b in layer)
    assert torch.count_nonzero(resnet.resnet18(zero_init_residual=True).layer2[0].bn2.weight) == 0
    assert torch.count_nonzero(resnet.resnet18().layer2[0].bn2.weight) > 0


def test_bottleneck_strides_on_3x3_like_torchvision():
    block = resnet.resnet50().layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
    assert block.downsample[0].stride == (2, 2)


def test_unknown_model_name_is_rejected():
    with pytest.raises(ValueError, match="resnet18, resnet50, resnet152"):
        resnet.build_model("resnet34")


def test_flops_match_published_figure():
    # The paper's 1.8 GFLOPs (multiply-adds) for ResNet18 at 224 px.
    gmacs = resnet.resnet18(num_classes=1000).flops_per_image(224) / 2e9
    assert 1.75 < gmacs < 1.85


def test_counting_flops_leaves_a_training_model_as_it_was():
    model = resnet.resnet18().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.flops_per_image(32) > 0  # 1x1 at the last stage: a batch of one in training mode would fail
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
