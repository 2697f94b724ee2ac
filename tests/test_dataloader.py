import csv
import errno
import glob
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

import dataloader
import files
import datatools
from conftest import ROOT, shared_path
from dataloader import Augment, BatchTransform, Preprocess, RetinopathyLoader, getData
from files import DataError


def write_rows(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def tiny_dataset(root, n=6, image=None):
    """A minimal dataset: n train, n valid and n test images of 40 px."""
    for split in ("train", "valid", "test"):
        os.makedirs(os.path.join(root, "new_dataset", split), exist_ok=True)
        for i in range(n):
            (image or Image.new("RGB", (40, 40), (i * 10, 50, 90))).save(os.path.join(root, "new_dataset", split, f"{i}.bmp"))
    write_rows(os.path.join(root, "train.csv"), ["Path", "label"], [[f"./new_dataset/train/{i}.bmp", i % 2] for i in range(n)])
    write_rows(os.path.join(root, "valid.csv"), ["Path", "label"], [[f"./new_dataset/valid/{i}.bmp", i % 2] for i in range(n)])
    write_rows(os.path.join(root, "resnet_18_test.csv"), ["Path"], [[f"./new_dataset/test/{i}.bmp"] for i in range(n)])
    return str(root)


# ----------------------------------------------------------------------------------------------------------
# The course's real CSV files


@pytest.fixture(scope="module")
def lab_root(tmp_path_factory):
    """The course's CSVs with one tiny image hard-linked at every path they name."""
    src = shared_path("lab_csv")
    root = tmp_path_factory.mktemp("lab")
    for name in ("train.csv", "valid.csv", "resnet_18_test.csv"):
        shutil.copy(os.path.join(src, name), root / name)
    cell = root / "cell.bmp"
    Image.new("RGB", (48, 48), (120, 60, 140)).save(cell)
    for name, labelled in (("train.csv", True), ("valid.csv", True), ("resnet_18_test.csv", False)):
        for p in files.read_csv(str(root / name), labelled)[0]:
            target = os.path.join(root, p)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.link(cell, target)
    return str(root)


def test_course_csvs_load_with_their_counts(lab_root):
    paths, labels = getData("train", lab_root)
    assert len(paths) == 7995 and sum(labels) == 5453
    v_paths, v_labels = getData("valid", lab_root)
    assert len(v_paths) == 1599 and len(v_labels) == 1599
    test = getData("test", lab_root, model="resnet18")
    assert len(test) == 1067
    assert test[0] == os.path.join(lab_root, "new_dataset", "test", "867.bmp")  # shuffled order kept
    assert paths[0] == os.path.join(lab_root, "new_dataset", "train", "0.bmp")


def test_course_csvs_feed_the_dataset(lab_root):
    pre = Preprocess(crop=None, size=32)
    train = RetinopathyLoader(lab_root, "train", preprocess=pre, augment=Augment())
    test = dataloader.LeukemiaLoader(lab_root, "test", preprocess=pre, model="resnet50")  # falls back to the only CSV
    assert len(train) == 7995 and len(test) == 1067
    image, label = train[5452]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label in (0, 1)
    assert test[0].shape == (3, 32, 32)


# ----------------------------------------------------------------------------------------------------------
# Real cells


def test_real_cells_decode_crop_and_resize(tmp_path):
    cnmc = shared_path("cnmc")
    cells = sorted(glob.glob(os.path.join(cnmc, "all", "*.png")))[:3] + sorted(glob.glob(os.path.join(cnmc, "hem", "*.png")))[:3]
    write_rows(tmp_path / "valid.csv", ["Path", "label"], [[c, int("_all." in c)] for c in cells])
    pre = Preprocess(crop=350, size=64)
    ds = RetinopathyLoader(str(tmp_path), "valid", preprocess=pre, output="uint8")
    assert [ds[i][1] for i in range(6)] == [1, 1, 1, 0, 0, 0]
    img = ds[0][0]
    assert img.shape == (64, 64, 3) and img.dtype == torch.uint8
    original = np.asarray(Image.open(cells[0]))
    expected = np.asarray(Image.fromarray(original[50:400, 50:400]).resize((64, 64), Image.BILINEAR))
    assert np.array_equal(img.numpy(), expected)
    assert img[0, 0].sum() == 0 and img[32, 32].sum() > 0  # black border, stained centre


# ----------------------------------------------------------------------------------------------------------
# Decoding and transforms


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "I;16"])
def test_any_image_mode_becomes_rgb(tmp_path, mode):
    path = str(tmp_path / "x.png")
    Image.new("RGB", (40, 30), (200, 100, 50)).convert(mode).save(path)
    img = dataloader.decode_image(path, crop=None, size=None)
    assert img.shape == (30, 40, 3) and img.dtype == torch.uint8
    assert torch.equal(img, torch.from_numpy(np.array(Image.open(path).convert("RGB"))))


@pytest.mark.parametrize("w, h", [(40, 30), (41, 30), (1, 7), (33, 5)])
def test_24_bit_bmp_is_read_as_pil_reads_it(tmp_path, w, h):
    rgb = np.random.default_rng(w * h).integers(0, 256, (h, w, 3), dtype=np.uint8)
    path = str(tmp_path / "x.bmp")
    Image.fromarray(rgb).save(path)  # bottom-up rows, each padded to 4 bytes
    data = open(path, "rb").read()
    assert np.array_equal(dataloader.read_bmp24(data), np.asarray(Image.open(path))) and np.array_equal(rgb, np.asarray(Image.open(path)))
    assert np.array_equal(dataloader.decode_image(path, crop=None, size=None).numpy(), rgb)
    # The same pixels stored top-down (a negative height), as some writers do.
    offset, row = int.from_bytes(data[10:14], "little"), (w * 3 + 3) // 4 * 4
    rows = [data[offset + i * row : offset + (i + 1) * row] for i in range(h)]
    top_down = data[:22] + (-h).to_bytes(4, "little", signed=True) + data[26:offset] + b"".join(reversed(rows))
    open(path, "wb").write(top_down)
    assert np.array_equal(np.asarray(Image.open(path)), rgb)
    assert np.array_equal(dataloader.read_bmp24(top_down), rgb)


@pytest.mark.parametrize("mode, suffix", [("L", ".bmp"), ("P", ".bmp"), ("RGBA", ".bmp"), ("RGB", ".png")])
def test_other_files_are_left_to_pil(tmp_path, mode, suffix):
    path = str(tmp_path / f"x{suffix}")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 41, 3), dtype=np.uint8)).convert(mode).save(path)
    assert dataloader.read_bmp24(open(path, "rb").read()) is None
    expected = np.asarray(dataloader.as_rgb(Image.open(path)))
    assert np.array_equal(dataloader.decode_image(path, crop=None, size=None).numpy(), expected)


def test_crop_is_centred_and_clipped_to_the_image(tmp_path):
    a = np.zeros((60, 80, 3), np.uint8)
    a[20:40, 30:50] = 255
    path = str(tmp_path / "x.bmp")
    Image.fromarray(a).save(path)
    assert torch.equal(dataloader.decode_image(path, crop=20, size=None), torch.full((20, 20, 3), 255, dtype=torch.uint8))
    assert dataloader.decode_image(path, crop=350, size=None).shape == (60, 80, 3)


def test_eval_transform_is_plain_normalisation():
    x = torch.randint(0, 256, (2, 3, 8, 9), dtype=torch.uint8)
    pre = Preprocess(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    out = BatchTransform(pre)(x.permute(0, 2, 3, 1))
    expected = TF.normalize(TF.to_dtype(x, torch.float32, scale=True), pre.mean, pre.std)
    assert out.shape == (2, 3, 8, 9)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("h, w", [(40, 40), (41, 41), (30, 41)])
@pytest.mark.parametrize("degrees", [90, 33, -70, 180])
def test_affine_matches_torchvision_nearest_rotation(h, w, degrees):
    x = torch.randint(0, 256, (2, 3, h, w), dtype=torch.uint8)
    a = math.radians(degrees)
    theta = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]).expand(2, 2, 2)
    expected = TF.rotate(x, degrees, interpolation=InterpolationMode.NEAREST)
    assert torch.equal(dataloader.sample_nearest(x.float(), dataloader.grid_matrix(theta, h, w)), expected.float())


def test_each_image_of_a_batch_gets_its_own_rotation():
    x = torch.randint(0, 256, (3, 3, 33, 33), dtype=torch.uint8)
    degrees = [20.0, -135.0, 90.0]
    theta = torch.stack([torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
                         for a in map(math.radians, degrees)])
    out = dataloader.sample_nearest(x.float(), dataloader.grid_matrix(theta, 33, 33))
    for o, image, d in zip(out, x, degrees):
        assert torch.equal(o, TF.rotate(image, d, interpolation=InterpolationMode.NEAREST).float())


def test_affine_flips_and_identity_are_exact():
    x = torch.rand(1, 3, 9, 12)
    for sx, sy, expected in ((1, 1, x), (-1, 1, x.flip(3)), (1, -1, x.flip(2)), (-1, -1, x.flip(2).flip(3))):
        theta = torch.tensor([[[sx, 0.0], [0.0, sy]]])
        assert torch.equal(dataloader.sample_nearest(x, dataloader.grid_matrix(theta, 9, 12)), expected)


def test_flip_augmentation_gives_one_of_the_four_flips():
    x = torch.randint(0, 256, (8, 9, 9, 3), dtype=torch.uint8)
    pre = Preprocess(mean=(0, 0, 0), std=(1, 1, 1))
    flips = Augment(hflip=True, vflip=True, rotation=0, scale=(1, 1), stain=0, brightness=0, hed=0)
    out = BatchTransform(pre, flips)(x, torch.Generator().manual_seed(0))
    seen = set()
    for o, i in zip(out, x.permute(0, 3, 1, 2).float() / 255):
        matches = [k for k, c in enumerate((i, i.flip(2), i.flip(1), i.flip(1).flip(2))) if torch.allclose(o, c)]
        assert matches
        seen.add(matches[0])
    assert len(seen) > 1


def test_augmentation_is_reproducible_from_a_generator():
    x = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)
    t = BatchTransform(Preprocess(), Augment())
    a = t(x, torch.Generator().manual_seed(3))
    b = t(x, torch.Generator().manual_seed(3))
    c = t(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_evaluation_items_are_deterministic(demo_root):
    ds = RetinopathyLoader(demo_root, "valid", preprocess=Preprocess(crop=None, size=32))
    assert torch.equal(ds[3][0], ds[3][0])


# ----------------------------------------------------------------------------------------------------------
# Test CSV selection


def test_test_csv_is_the_models_own_then_the_only_one(tmp_path):
    root = tiny_dataset(tmp_path)
    assert dataloader.find_test_csv(root, "resnet152").endswith("resnet_18_test.csv")
    shutil.copy(os.path.join(root, "resnet_18_test.csv"), os.path.join(root, "resnet_50_test.csv"))
    assert dataloader.find_test_csv(root, "resnet50").endswith("resnet_50_test.csv")
    with pytest.raises(DataError, match="several test CSVs"):
        dataloader.find_test_csv(root, None)
    explicit = getData("test", "nowhere", csv_path=os.path.join(root, "resnet_50_test.csv"))
    assert len(explicit) == 6 and explicit[0] == os.path.join(root, "new_dataset", "test", "0.bmp")


# ----------------------------------------------------------------------------------------------------------
# Bad input


def test_no_dataset_names_the_files_and_the_demo(tmp_path):
    with pytest.raises(DataError) as e:
        RetinopathyLoader(str(tmp_path / "data"), "train")
    assert "train.csv" in str(e.value) and "--make-demo" in str(e.value) and "README" in str(e.value)


def test_wrong_header_names_found_and_expected_columns(tmp_path):
    root = tiny_dataset(tmp_path)
    write_rows(os.path.join(root, "train.csv"), ["image", "class"], [["./new_dataset/train/0.bmp", 0]])
    with pytest.raises(DataError, match="header is image,class, expected Path,label"):
        getData("train", root)


def test_label_outside_0_1_names_the_row(tmp_path):
    root = tiny_dataset(tmp_path)
    write_rows(os.path.join(root, "train.csv"), ["Path", "label"],
               [["./new_dataset/train/0.bmp", 0], ["./new_dataset/train/1.bmp", 2]])
    with pytest.raises(DataError, match=r"line 3 \(./new_dataset/train/1.bmp\): label '2'"):
        getData("train", root)


@pytest.mark.parametrize("mode", ["train", "test"])
def test_csv_with_a_header_and_no_rows_is_named(tmp_path, mode):
    root = tiny_dataset(tmp_path)
    name, header = ("train.csv", ["Path", "label"]) if mode == "train" else ("resnet_18_test.csv", ["Path"])
    write_rows(os.path.join(root, name), header, [])
    with pytest.raises(DataError, match=f"{name}: no images listed under its header"):
        RetinopathyLoader(root, mode)


def test_missing_images_are_counted_and_listed(tmp_path):
    root = tiny_dataset(tmp_path)
    for i in (1, 4):
        os.remove(os.path.join(root, "new_dataset", "train", f"{i}.bmp"))
    with pytest.raises(DataError) as e:
        RetinopathyLoader(root, "train")
    assert "2 of 6 images" in str(e.value) and "1.bmp" in str(e.value) and "4.bmp" in str(e.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_image_is_named_also_inside_a_worker(tmp_path, damage):
    root = tiny_dataset(tmp_path, image=Image.effect_noise((40, 40), 50).convert("RGB"))
    bad = os.path.join(root, "new_dataset", "valid", "2.bmp")
    if damage == "garbage":
        open(bad, "wb").write(b"not an image at all")
    else:
        data = open(bad, "rb").read()
        open(bad, "wb").write(data[: len(data) // 2])
    ds = RetinopathyLoader(root, "valid", preprocess=Preprocess(crop=None, size=32))
    with pytest.raises(DataError, match="2.bmp: cannot read image"):
        ds[2]
    loader = torch.utils.data.DataLoader(ds, batch_size=6, num_workers=1)
    with pytest.raises(DataError, match="2.bmp: cannot read image"):
        next(iter(loader))


# ----------------------------------------------------------------------------------------------------------
# --make-demo and --check


def test_make_demo_on_a_full_disk_leaves_no_half_written_csv(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="disk full: .*train.csv needs .*; nothing was written"):
        datatools.make_demo(str(tmp_path), sizes=(2, 1, 1), side=32)
    assert not any(name.endswith((".csv", ".tmp")) for name in os.listdir(tmp_path))


def test_make_demo_writes_the_course_layout(demo_root):
    names = sorted(os.listdir(demo_root))
    assert names == ["new_dataset", "resnet_152_test.csv", "resnet_18_test.csv", "resnet_50_test.csv", "train.csv", "valid.csv"]
    paths, labels = files.read_csv(os.path.join(demo_root, "train.csv"), True)
    assert paths == [f"./new_dataset/train/{i}.bmp" for i in range(48)]
    assert abs(sum(labels) / len(labels) - 0.68) < 0.02
    tests = [files.read_csv(os.path.join(demo_root, n), False)[0] for n in files.TEST_CSVS.values()]
    assert all(sorted(t) == sorted(f"./new_dataset/test/{i}.bmp" for i in range(12)) for t in tests)
    assert tests[0] != sorted(tests[0], key=lambda p: int(p.split("/")[-1][:-4]))  # shuffled
    img = Image.open(os.path.join(demo_root, "new_dataset", "valid", "0.bmp"))
    assert img.format == "BMP" and img.mode == "RGB" and img.size == (64, 64)


def test_make_demo_is_deterministic_and_full_size_by_default(tmp_path):
    datatools.make_demo(str(tmp_path / "a"), sizes=(3, 1, 1), seed=5, side=450)
    datatools.make_demo(str(tmp_path / "b"), sizes=(3, 1, 1), seed=5, side=450)
    for f in ("train/0.bmp", "train/2.bmp", "test/0.bmp"):
        a, b = (open(tmp_path / d / "new_dataset" / f, "rb").read() for d in "ab")
        assert a == b
    img = np.asarray(Image.open(tmp_path / "a" / "new_dataset" / "train" / "0.bmp"))
    assert img.shape == (450, 450, 3) and img[0, 0].sum() == 0 and img[225, 225].sum() > 0
    assert dataloader.get_args_parser().parse_args(["--make-demo", "x"]).side == 450


def test_demo_classes_differ_in_morphology_not_mean_colour():
    cells = {label: [datatools.draw_cell(seed, label, 128) for seed in range(30)] for label in (0, 1)}

    def dark_share(img):  # nucleus pixels / cell pixels: the nucleus is darker than the cytoplasm, whatever the stain
        lum = img.astype(float).mean(2)
        cell = lum[lum > 10]
        return (cell < 0.78 * np.percentile(cell, 95)).mean()

    ratio = {label: np.mean([dark_share(c) for c in cells[label]]) for label in (0, 1)}
    assert ratio[1] > ratio[0] + 0.15
    colour = {label: np.mean([c[c.max(2) > 10].mean() for c in cells[label]]) for label in (0, 1)}
    spread = np.std([c[c.max(2) > 10].mean() for c in cells[0] + cells[1]])
    assert abs(colour[1] - colour[0]) < 2 * spread


def run_check(root):
    return subprocess.run([sys.executable, os.path.join(ROOT, "dataloader.py"), "--check", "--data-root", root, "--workers", "1"],
                          capture_output=True, text=True)


def test_check_passes_a_clean_dataset(demo_root):
    result = run_check(demo_root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "train" in result.stdout and "48 rows (15 hem, 33 ALL)" in result.stdout and "no problems found" in result.stdout


def test_check_finds_every_planted_problem(tmp_path):
    root = tiny_dataset(tmp_path)
    os.remove(os.path.join(root, "new_dataset", "train", "3.bmp"))
    open(os.path.join(root, "new_dataset", "valid", "1.bmp"), "wb").write(b"broken")
    write_rows(os.path.join(root, "valid.csv"), ["Path", "label"],
               [[f"./new_dataset/valid/{i}.bmp", 7 if i == 4 else i % 2] for i in range(6)])
    result = run_check(root)
    assert result.returncode == 1
    out = result.stdout
    assert "3 problems" in out
    assert "train/3.bmp: missing" in out and "valid/1.bmp: unreadable" in out and "line 6" in out


def test_check_finds_an_empty_split_and_a_train_set_of_one_class(tmp_path):
    root = tiny_dataset(tmp_path)
    write_rows(os.path.join(root, "train.csv"), ["Path", "label"], [[f"./new_dataset/train/{i}.bmp", 1] for i in range(6)])
    write_rows(os.path.join(root, "valid.csv"), ["Path", "label"], [])
    result = run_check(root)
    assert result.returncode == 1
    assert "train.csv: no image labelled 0 (hem); training needs both classes" in result.stdout
    assert "valid.csv: no images listed under its header" in result.stdout
