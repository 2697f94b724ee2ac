"""What helps on patients the model never saw: per-cell colour standardisation, HED stain, hue and saturation
augmentation, and BatchNorm adapted to the images being scored (evaluate.py and predict.py --adapt-bn)."""
import hashlib
import math
import os

import pytest
import torch

import checkpoints
import dataloader
import evaluate
import files
import inference
from conftest import run_script
from resnet import build_model

nn = torch.nn


def stripes(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Float images (n, 3, 16, 16) whose class is the direction of their stripes, with random contrast and noise."""
    y = torch.randint(0, 2, (n,), generator=g)
    wave = torch.sin(torch.arange(16.0) * 1.6)
    x = torch.where(y.view(n, 1, 1, 1).bool(), wave.view(1, 1, 16, 1).expand(n, 3, 16, 16), wave.view(1, 1, 1, 16).expand(n, 3, 16, 16))
    return x * (0.5 + torch.rand(n, 1, 1, 1, generator=g)) + 0.3 * torch.randn(n, 3, 16, 16, generator=g), y


def as_batches(x: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.arange(i, min(i + size, len(x))), x[i : i + size]) for i in range(0, len(x), size)]


def test_adapting_batchnorm_recovers_what_a_colour_shift_lost():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(100):
        x, y = stripes(32, g)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    x, y = stripes(128, g)
    shifted = x * torch.tensor([0.5, 0.3, 0.6]).view(1, 3, 1, 1) + torch.tensor([1.0, -0.5, 2.0]).view(1, 3, 1, 1)  # another stain
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def accuracy(m, images):
        with torch.no_grad():
            return (m(images).argmax(1) == y).float().mean().item()

    clean, lost = accuracy(model, x), accuracy(model, shifted)
    assert clean > 0.95 and lost < clean - 0.2
    adapted = inference.adapt_batchnorm(model, as_batches(shifted, 32), None, torch.device("cpu"))
    assert accuracy(adapted, shifted) >= clean - 0.03
    assert not adapted.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model given is untouched


def test_adapted_statistics_are_those_of_each_layers_inputs():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=2).eval()
    images = torch.randn(20, 3, 32, 32) * 0.7 + 0.4
    adapted = inference.adapt_batchnorm(model, as_batches(images, 8), None, torch.device("cpu"))

    # The first BatchNorm sees conv1's output, which no other BatchNorm touches: its statistics over all 20 images.
    direct = model.conv1(images)
    var, mean = torch.var_mean(direct, dim=(0, 2, 3), correction=1)
    torch.testing.assert_close(adapted.bn1.running_mean, mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(adapted.bn1.running_var, var, rtol=1e-4, atol=1e-5)

    # Every layer: the statistics of the inputs it got in the same pass (training mode, the same batches).
    inputs = {}
    reference = build_model("resnet18", num_classes=2)
    reference.load_state_dict(model.state_dict())
    reference.train()
    layers = {name: m for name, m in reference.named_modules() if isinstance(m, nn.BatchNorm2d)}
    for name, layer in layers.items():
        layer.register_forward_pre_hook(lambda m, args, name=name: inputs.setdefault(name, []).append(args[0].detach()))
    with torch.no_grad():
        for _, x in as_batches(images, 8):
            reference(x)
    adapted_layers = dict(adapted.named_modules())
    for name in layers:
        var, mean = torch.var_mean(torch.cat(inputs[name]), dim=(0, 2, 3), correction=1)
        torch.testing.assert_close(adapted_layers[name].running_mean, mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(adapted_layers[name].running_var, var, rtol=1e-4, atol=1e-5)

    # A batch size that divides the set otherwise gives the first layer the same statistics.
    other = inference.adapt_batchnorm(model, as_batches(images, 5), None, torch.device("cpu"))
    torch.testing.assert_close(other.bn1.running_var, adapted.bn1.running_var, rtol=1e-5, atol=1e-6)


class TwoStains(torch.utils.data.Dataset):
    """uint8 (H, W, 3) noise images, the first half in one stain and the second in another: a CSV sorted by class."""

    def __init__(self, n: int = 96):
        g = torch.Generator().manual_seed(0)
        self.y = (torch.arange(n) >= n // 2).long()
        tint = torch.tensor([[1.0, 0.6, 1.0], [0.6, 1.0, 0.7]])[self.y].view(n, 1, 1, 3)
        self.x = (torch.randint(0, 256, (n, 32, 32, 3), generator=g).float() * tint).to(torch.uint8)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


def test_adapted_statistics_hold_when_scoring_a_set_sorted_by_class():
    # The pass normalises each layer by its batch; batches of one stain would hide the difference between the two
    # from every later layer, whose statistics then miss what scoring (by the adapted statistics) shows them.
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=2).eval()
    preprocess, dataset = dataloader.Preprocess(crop=None, size=None), TwoStains()
    adapted = inference.adapt_to_dataset(model, preprocess, dataset, torch.device("cpu"), batch_size=16, workers=0)
    layers = {name: m for name, m in adapted.named_modules() if isinstance(m, nn.BatchNorm2d) and name.startswith(("layer1", "layer2"))}
    inputs = {}
    for name, layer in layers.items():
        layer.register_forward_pre_hook(lambda m, args, name=name: inputs.setdefault(name, args[0].detach()))
    with torch.no_grad():
        adapted(dataloader.BatchTransform(preprocess)(dataset.x))
    for name, layer in layers.items():
        var, mean = torch.var_mean(inputs[name], dim=(0, 2, 3), correction=1)
        assert (layer.running_mean - mean).abs().max() < 0.05 * var.sqrt().mean(), name
        assert 0.9 < (layer.running_var / var).min() and (layer.running_var / var).max() < 1.1, name


def test_cell_colour_standardisation_takes_away_a_stain():
    cell = torch.zeros(1, 24, 24, 3, dtype=torch.uint8)
    cell[0, 6:18, 6:18] = torch.tensor([90, 40, 100], dtype=torch.uint8)
    cell[0, 9:15, 9:15] = torch.tensor([60, 20, 80], dtype=torch.uint8)  # a darker nucleus
    stained = (cell.float() * torch.tensor([1.25, 0.8, 1.1])).round().to(torch.uint8)
    gain = dataloader.cell_color_gain(torch.cat([cell, stained]))
    pixels = cell[0][cell[0].amax(2) > dataloader.BACKGROUND].float()
    torch.testing.assert_close(gain[0], torch.tensor(dataloader.CELL_COLOR) / pixels.mean(0))
    standardised = dataloader.BatchTransform(dataloader.Preprocess(crop=None, color_norm="cell"))
    plain = dataloader.BatchTransform(dataloader.Preprocess(crop=None))
    a, b = standardised(cell), standardised(stained)
    torch.testing.assert_close(a, b, atol=0.03, rtol=0)  # the same cell, whatever its stain (up to uint8 rounding)
    assert (plain(cell) - plain(stained)).abs().max() > 0.3
    background = cell[0].amax(2) == 0
    assert torch.equal(a[0][:, background], plain(cell)[0][:, background])  # the black background stays black


def test_stain_jitter_is_scikit_images_colour_deconvolution():
    skcolor = pytest.importorskip("skimage.color")
    g = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 256, (3, 10, 12, 3), dtype=torch.uint8, generator=g)
    rgb[:, :3] = 0  # black background
    times, plus = 0.8 + 0.4 * torch.rand(3, 3, generator=g), 0.2 * torch.rand(3, 3, generator=g) - 0.1
    jittered = rgb.float()
    dataloader.jitter_stains(jittered, times, plus)
    # scikit-image measures optical density in units of -ln(1e-6); the jitter, as Tellez et al., in units of 1.
    unit = -math.log(1e-6)
    for image, out, t, p in zip(rgb.numpy(), jittered, times.numpy(), plus.numpy()):
        expected = skcolor.hed2rgb(skcolor.rgb2hed(image) * t + p / unit) * 255
        torch.testing.assert_close(out, torch.from_numpy(expected).float(), atol=0.05, rtol=1e-4)
    assert jittered[:, :3].max() < 0.5  # the background stays black
    unchanged = rgb.float()
    dataloader.jitter_stains(unchanged, torch.ones(3, 3), torch.zeros(3, 3))
    assert not torch.equal(unchanged, jittered)


def test_hed_augmentation_gives_each_image_its_own_stain():
    cell = torch.zeros(1, 16, 16, 3, dtype=torch.uint8)
    cell[0, 4:12, 4:12] = torch.tensor([150, 80, 170], dtype=torch.uint8)
    pre = dataloader.Preprocess(crop=None, mean=(0, 0, 0), std=(1, 1, 1))
    hed = dataloader.Augment(hflip=False, vflip=False, rotation=0, scale=(1, 1), stain=0, brightness=0, hed=0.1)
    out = dataloader.BatchTransform(pre, hed)(cell.expand(4, 16, 16, 3), torch.Generator().manual_seed(0))
    colours = out[:, :, 8, 8]
    assert len({tuple(c.tolist()) for c in colours}) == 4  # four copies of one cell, four stains
    assert (colours - cell[0, 8, 8].float() / 255).abs().max() > 0.02
    assert out[:, :, 0, 0].abs().max() < 0.01  # the background stays black


def test_blur_is_torchvisions_gaussian_blur_with_each_images_own_sigma():
    tvf = pytest.importorskip("torchvision.transforms.functional")
    x = torch.rand(3, 3, 20, 24, generator=torch.Generator().manual_seed(0)) * 255
    sigmas = torch.tensor([0.0, 0.8, 1.7])
    out = dataloader.gaussian_blur(x, sigmas)
    assert torch.equal(out[0], x[0])  # sigma 0 leaves the image as it was
    for image, blurred, sigma in zip(x[1:], out[1:], sigmas[1:].tolist()):
        torch.testing.assert_close(blurred, tvf.gaussian_blur(image, [13, 13], [sigma, sigma]), atol=1e-3, rtol=1e-5)


def test_blur_and_noise_draw_per_image_and_repeat_with_the_seed():
    cell = torch.zeros(1, 16, 16, 3, dtype=torch.uint8)
    cell[0, 4:12, 4:12] = 160
    pre = dataloader.Preprocess(crop=None, mean=(0, 0, 0), std=(1, 1, 1))
    still = dict(hflip=False, vflip=False, rotation=0, scale=(1, 1), stain=0, brightness=0, hed=0)
    batch = cell.expand(6, 16, 16, 3)
    noisy = dataloader.BatchTransform(pre, dataloader.Augment(**still, noise=0.1))
    out = noisy(batch, torch.Generator().manual_seed(0))
    inside = out[:, :, 5:11, 5:11].std((1, 2, 3)) * 255
    assert 0 < inside.min() < inside.max() < 0.1 * 255 * 1.2  # each image its own amount, up to 10% of 255
    assert torch.equal(out, noisy(batch, torch.Generator().manual_seed(0)))
    blurred = dataloader.BatchTransform(pre, dataloader.Augment(**still, blur=2.0))(batch, torch.Generator().manual_seed(0))
    edges = blurred[:, 0, 8, 3]  # just outside the cell: dark unless blurred
    assert len(set(edges.tolist())) == 6 and edges.max() > 0.05
    assert (blurred[:, :, 8, 8] - 160 / 255).abs().max() < 0.1  # the cell's middle stays about as it was


def test_hue_and_saturation_jitter_are_torchvisions_with_each_images_own_factor():
    tvf = pytest.importorskip("torchvision.transforms.functional")
    g = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 256, (3, 10, 12, 3), dtype=torch.uint8, generator=g)
    hue, saturation = torch.tensor([0.0, -0.2, 0.45]), torch.tensor([1.0, 0.6, 1.4])
    jittered = rgb.float()
    dataloader.jitter_hue_saturation(jittered, hue, saturation)
    torch.testing.assert_close(jittered[0], rgb[0].float(), atol=1e-3, rtol=0)  # factors of no change
    for image, out, h, s in zip(rgb[1:], jittered[1:], hue[1:].tolist(), saturation[1:].tolist()):
        expected = tvf.adjust_saturation(tvf.adjust_hue(image.permute(2, 0, 1).float() / 255, h), s)
        torch.testing.assert_close(out, expected.permute(1, 2, 0) * 255, atol=0.05, rtol=1e-4)


def test_hue_and_saturation_jitter_give_each_image_its_own_colour():
    cell = torch.zeros(1, 16, 16, 3, dtype=torch.uint8)
    cell[0, 4:12, 4:12] = torch.tensor([150, 80, 170], dtype=torch.uint8)
    pre = dataloader.Preprocess(crop=None, mean=(0, 0, 0), std=(1, 1, 1))
    still = dict(hflip=False, vflip=False, rotation=0, scale=(1, 1), stain=0, brightness=0, hed=0)
    transform = dataloader.BatchTransform(pre, dataloader.Augment(**still, hue=0.1, saturation=0.3))
    out = transform(cell.expand(4, 16, 16, 3), torch.Generator().manual_seed(0))
    colours = out[:, :, 8, 8]
    assert len({tuple(c.tolist()) for c in colours}) == 4  # four copies of one cell, four colours
    assert (colours - cell[0, 8, 8].float() / 255).abs().max() > 0.02
    assert out[:, :, 0, 0].abs().max() < 0.01  # the background stays black
    assert torch.equal(out, transform(cell.expand(4, 16, 16, 3), torch.Generator().manual_seed(0)))


def test_old_checkpoints_keep_dataset_normalisation():
    d = dataloader.Preprocess(crop=300, size=64).to_dict()
    del d["color_norm"]
    assert dataloader.Preprocess.from_dict(d).color_norm == "dataset"


def test_adapt_bn_warns_when_the_scored_set_is_mostly_one_class(capsys):
    evaluate.warn_if_one_class([1] * 97 + [0] * 3, "held_out.csv")
    warning = capsys.readouterr().err
    assert "held_out.csv" in warning and "97% ALL" in warning and "both classes" in warning
    evaluate.warn_if_one_class([1] * 60 + [0] * 40, "mixed.csv")
    evaluate.warn_if_one_class([0] * 89 + [1] * 11, "mixed.csv")
    assert capsys.readouterr().err == ""


def test_adapt_bn_warns_about_a_network_trained_with_class_balancing(capsys):
    for balance in ("loss", "sampler", "subject"):
        inference.warn_if_class_balanced({"args": {"class_balance": balance}}, "run/last.pt")
        assert f"run/last.pt was trained with --class-balance {balance}" in capsys.readouterr().err
    for balance in ("none", "subject-only"):
        inference.warn_if_class_balanced({"args": {"class_balance": balance}}, "run/last.pt")
    inference.warn_if_class_balanced({}, "old/last.pt")
    assert capsys.readouterr().err == ""


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_adapt_bn_scores_and_predicts_without_touching_the_checkpoints(trained_runs, demo_root, tmp_path):
    checkpoints = [os.path.join(run, "best.pt") for run in trained_runs]
    before = [digest(c) for c in checkpoints]
    common = ["--device", "cpu", "--workers", "0"]
    evaluated = run_script("evaluate.py", "--checkpoint", checkpoints[0], "--adapt-bn", "--tta", "--out-dir",
                           str(tmp_path / "results"), *common)
    assert evaluated.returncode == 0, evaluated.stderr
    assert '"adapt_bn": true' in (tmp_path / "results" / "a" / "metrics.json").read_text()
    assert f"warning: {checkpoints[0]} was trained with --class-balance loss" in evaluated.stderr
    predicted = run_script("predict.py", "--checkpoint", *checkpoints, "--adapt-bn", "--tta", "--output", str(tmp_path / "sub.csv"),
                           *common)
    assert predicted.returncode == 0, predicted.stderr
    assert all(f"warning: {c} was trained with --class-balance loss" in predicted.stderr for c in checkpoints)
    ids, _ = files.read_csv(os.path.join(demo_root, "resnet_18_test.csv"), labelled=False)
    with open(tmp_path / "sub.csv") as f:
        lines = f.read().splitlines()
    assert lines[0] == "ID,label" and [line.split(",")[0] for line in lines[1:]] == ids
    assert [digest(c) for c in checkpoints] == before


@pytest.mark.parametrize("adapt", [False, True])
def test_dataset_logits_with_adaptation_differ_only_through_batchnorm(trained_runs, demo_root, adapt):
    checkpoint = checkpoints.load_checkpoint(os.path.join(trained_runs[0], "best.pt"))
    model, preprocess = checkpoints.model_from_checkpoint(checkpoint, torch.device("cpu"))
    dataset = dataloader.RetinopathyLoader(demo_root, "valid", preprocess=preprocess, output="uint8")
    if adapt:
        model = inference.adapt_to_dataset(model, preprocess, dataset, torch.device("cpu"), batch_size=8, workers=0)
    logits = inference.dataset_logits(model, preprocess, dataset, torch.device("cpu"), batch_size=8, workers=0)
    plain = inference.dataset_logits(checkpoints.model_from_checkpoint(checkpoint, torch.device("cpu"))[0], preprocess, dataset,
                                 torch.device("cpu"), batch_size=8, workers=0)
    assert logits.shape == (len(dataset), 2)
    assert torch.equal(logits, plain) != adapt
