"""The course data: the split CSVs (getData), the RetinopathyLoader dataset, and one preprocessing pipeline.

Layout (see data/README.md): <root>/train.csv and valid.csv (Path,label), <root>/resnet_<18|50|152>_test.csv
(Path), the images at the CSV's paths, relative to the CSV's folder. Label 0 = hem (normal), 1 = ALL (blast).

The pipeline has two halves so that it runs as fast on a GPU as on a laptop:
  - decode_image (CPU, in DataLoader workers): read the file (the course's 24-bit BMPs with numpy, anything else
    with PIL), make it RGB, centre-crop the black border, resize, and return uint8 (H, W, 3). Nothing else
    crosses to a GPU.
  - BatchTransform (batched, on the training device): flips, rotation and zoom in one affine grid_sample,
    stain/colour jitter, float conversion and normalisation.
A RetinopathyLoader with output="float" runs both halves per image, so there is one copy of each transform.

    python dataloader.py --check [--data-root data]        scan every file and report problems
    python dataloader.py --make-demo data/demo             write a synthetic dataset in the course layout
    python dataloader.py --import-cnmc SRC --out DIR       turn the public C-NMC release into the course layout
    python dataloader.py --import-cnmc SRC --out DIR --folds 3    ...as patient-level folds DIR/fold_0..2
"""
from __future__ import annotations

import argparse
import functools
import io
import math
import os
import struct
import sys
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

import datatools
from files import IMAGE_EXTENSIONS, TEST_CSVS, DataError, check_not_empty, read_csv

SPLITS = ("train", "valid", "test")


@dataclass
class Preprocess:
    """How an image becomes a network input; stored in every checkpoint so evaluation repeats it exactly.

    crop: side of the centre square kept from the original image (px, before resizing); it removes the black
      border around the cell. None keeps the whole image. Images smaller than crop are kept whole.
    size: side of the network input after resizing. None keeps the cropped side.
    color_norm: "dataset" normalises every image with mean and std alone; "cell" first brings each cell's mean
      colour (its pixels brighter than the black background) to CELL_COLOR, so that a patient's stain and
      microscope do not shift what the network sees.
    """

    crop: int | None = 350
    size: int | None = None
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    color_norm: str = "dataset"

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(crop=d["crop"], size=d["size"], mean=tuple(d["mean"]), std=tuple(d["std"]),
                   color_norm=d.get("color_norm", "dataset"))


COLOR_NORMS = ("dataset", "cell")
CELL_COLOR = (71.0, 31.0, 81.0)  # the mean RGB of the cell pixels of 600 cells of the C-NMC release
BACKGROUND = 20  # a pixel no brighter than this in every channel is the slide's black background


@dataclass
class Augment:
    """Training augmentation, applied batched on the training device. Cells have no up, down, left or right."""

    hflip: bool = True
    vflip: bool = True
    rotation: float = 180.0  # degrees, uniform in [-rotation, rotation]
    scale: tuple[float, float] = (0.9, 1.1)  # cell size varies between images and patients
    stain: float = 0.1  # per-image, per-channel gain in [1 - stain, 1 + stain]
    brightness: float = 0.1  # per-image gain in [1 - brightness, 1 + brightness]
    hed: float = 0.2  # per-image stain jitter in HED space: each stain's amount times [1 - hed, 1 + hed], plus [-hed, hed]
    hue: float = 0.0  # per-image hue shift in [-hue, hue] of the colour circle, as torchvision's ColorJitter (at most 0.5)
    saturation: float = 0.0  # per-image saturation factor in [1 - saturation, 1 + saturation], as ColorJitter
    blur: float = 0.0  # per-image Gaussian blur (focus), sigma uniform in [0, blur] px of the network's input
    noise: float = 0.0  # per-image Gaussian pixel noise (camera), std uniform in [0, noise] of the 0-255 range

    def to_dict(self) -> dict:
        return asdict(self)


NO_AUGMENT = Augment(hflip=False, vflip=False, rotation=0.0, scale=(1.0, 1.0), stain=0.0, brightness=0.0, hed=0.0, hue=0.0,
                     saturation=0.0, blur=0.0, noise=0.0)

# Colour deconvolution (Ruifrok and Johnston 2001), scikit-image's rgb2hed: a pixel's optical density -ln(RGB) is
# RGB_FROM_HED's rows (haematoxylin, eosin, DAB) mixed by the stains' amounts. HED stain augmentation (Tellez et al.
# 2019) scales and shifts those amounts, in units of optical density, which is how another lab's staining differs.
RGB_FROM_HED = torch.tensor(((0.65, 0.70, 0.29), (0.07, 0.99, 0.11), (0.27, 0.57, 0.78)))
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED.double()).float()


# ----------------------------------------------------------------------------------------------------------
# The split CSVs


def find_test_csv(root: str, model: str | None = None) -> str:
    """The model's own test CSV (resnet_18_test.csv for resnet18, ...), else the only one present."""
    if model is not None:
        own = os.path.join(root, TEST_CSVS[model])
        if os.path.isfile(own):
            return own
    present = [os.path.join(root, name) for name in TEST_CSVS.values() if os.path.isfile(os.path.join(root, name))]
    if len(present) == 1:
        return present[0]
    if not present:
        raise DataError(f"{root}: no test CSV ({', '.join(TEST_CSVS.values())}); pass the test CSV's path")
    raise DataError(f"{root}: several test CSVs ({', '.join(map(os.path.basename, present))}); name the model or the CSV")


def split_csv(root: str, mode: str, model: str | None = None, csv_path: str | None = None) -> str:
    if mode not in SPLITS:
        raise ValueError(f"mode must be one of {SPLITS}, got {mode!r}")
    if csv_path is not None:
        return csv_path
    known = ("train.csv", "valid.csv", *TEST_CSVS.values())
    if not os.path.isdir(root) or not any(os.path.isfile(os.path.join(root, name)) for name in known):
        raise DataError(
            f"no dataset at {root!r}: expected train.csv, valid.csv and resnet_18_test.csv (or _50_, _152_) with the "
            "images at their paths (see data/README.md). Without the course data, make the synthetic demo: "
            "python dataloader.py --make-demo data/demo, then use --data-root data/demo"
        )
    return find_test_csv(root, model) if mode == "test" else os.path.join(root, f"{mode}.csv")


def getData(mode: str, root: str = "data", model: str | None = None, csv_path: str | None = None):
    """Image paths (resolved against the CSV's folder) and labels of a split; paths alone for 'test'.

    The test CSV is the model's own (resnet_18_test.csv for resnet18, ...) or the only one present;
    csv_path overrides the CSV of any split.
    """
    path = split_csv(root, mode, model, csv_path)
    names, labels = read_csv(path, labelled=mode != "test")
    folder = os.path.dirname(os.path.abspath(path))
    paths = [os.path.normpath(os.path.join(folder, name)) for name in names]
    return paths if mode == "test" else (paths, labels)


def check_files_exist(paths: list[str], source: str) -> None:
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        listed = "\n  ".join(missing[:5])
        raise DataError(
            f"{len(missing)} of {len(paths)} images named in {source} are missing, e.g.\n  {listed}\n"
            "Put the images where the CSV's paths point (relative to the CSV's folder); "
            "python dataloader.py --check lists every problem."
        )


# ----------------------------------------------------------------------------------------------------------
# Decoding (CPU) and batched transforms (any device)


def as_rgb(img: Image.Image) -> Image.Image:
    """img as RGB, whatever its mode; transparent parts become black, like the slide background."""
    if img.mode == "RGB":
        return img
    if img.mode in ("P", "PA", "LA", "RGBA") or "transparency" in img.info:
        img = img.convert("RGBA")
        black = Image.new("RGBA", img.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, img).convert("RGB")
    return img.convert("RGB")


def read_bmp24(data: bytes) -> np.ndarray | None:
    """The RGB pixels (H, W, 3) of an uncompressed 24-bit BMP, the course's format, as a view into data; None for
    any other file, which PIL then reads.

    Twice as fast as PIL, which unpacks every pixel to four bytes and packs it back: on a GPU, decoding is all
    the CPU does per image.
    """
    if len(data) < 54 or data[:2] != b"BM":
        return None
    offset, header_size, w, h, planes, bits, compression = struct.unpack_from("<IIiiHHI", data, 10)
    row = (w * 3 + 3) // 4 * 4  # rows are padded to 4 bytes
    if header_size < 40 or planes != 1 or bits != 24 or compression != 0 or w <= 0 or h == 0 or offset + row * abs(h) > len(data):
        return None
    rows = np.frombuffer(data, np.uint8, count=row * abs(h), offset=offset).reshape(abs(h), row)
    pixels = rows[:, : w * 3].reshape(abs(h), w, 3)[:, :, ::-1]  # stored as BGR
    return pixels[::-1] if h > 0 else pixels  # a positive height means the bottom row comes first


def decode_image(path: str, crop: int | None, size: int | None) -> torch.Tensor:
    """uint8 (H, W, 3), as decoded: RGB, centre-cropped to crop px, resized to size px (antialiased).

    Pixels stay interleaved (channels last), as in the file, until BatchTransform: batching and moving them are
    plain copies, with no transposition on the CPU.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
        pixels = read_bmp24(data)
        if pixels is None:
            with Image.open(io.BytesIO(data)) as img:
                pixels = np.asarray(as_rgb(img))
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: cannot read image ({e}). Replace or remove the file; "
                        "python dataloader.py --check lists every bad file.") from e
    h, w = pixels.shape[:2]
    if crop is not None and (crop < w or crop < h):
        top, left = (h - min(crop, h)) // 2, (w - min(crop, w)) // 2
        pixels = pixels[top : top + crop, left : left + crop]
    out = torch.empty(pixels.shape, dtype=torch.uint8)
    for c in range(3):  # plane by plane: numpy copies a reversed view (BGR, bottom-up) several times faster this way
        out.numpy()[..., c] = pixels[..., c]
    if size is not None and out.shape[:2] != (size, size):
        resized = Image.fromarray(out.numpy()).resize((size, size), Image.BILINEAR, reducing_gap=None)
        out = torch.from_numpy(np.array(resized))
    return out


class BatchTransform:
    """uint8 (N, H, W, 3) -> augmented, normalised float (N, 3, H, W), batched on whatever device x is on.

    Flips, rotation and scale are folded into one affine matrix per image and applied by one nearest-neighbour
    grid_sample (the pixels torchvision's RandomRotation picks by default, tested); the border they uncover
    is black, like the slide background. Stain and brightness gains fold into the normalisation; the HED stain
    jitter, hue and saturation jitter, blur and noise, when on, change the pixels before them. The random draws
    come from `generator` (a CPU generator) and do not depend on the device, except the noise's pixels, drawn on
    the device from a seed it gives.
    """

    def __init__(self, preprocess: Preprocess, augment: Augment | None = None):
        self.preprocess = preprocess
        self.augment = augment or NO_AUGMENT

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        a, (n, h, w, c) = self.augment, x.shape

        def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
            return torch.rand(n, *shape, generator=generator) * (high - low) + low

        def sign(enabled: bool) -> torch.Tensor:
            return torch.where(uniform(0, 1) < 0.5, -1.0, 1.0) if enabled else torch.ones(n)

        matrices = None
        if a.hflip or a.vflip or a.rotation or a.scale != (1.0, 1.0):
            angle = uniform(-a.rotation, a.rotation).mul_(math.pi / 180)
            zoom = 1 / uniform(*a.scale)
            sx, sy = sign(a.hflip) * zoom, sign(a.vflip) * zoom
            cos, sin = torch.cos(angle), torch.sin(angle)
            matrices = grid_matrix(torch.stack([cos * sx, -sin * sy, sin * sx, cos * sy], 1).view(n, 2, 2), h, w)
        gain = uniform(1 - a.stain, 1 + a.stain, 3) * uniform(1 - a.brightness, 1 + a.brightness, 1)
        stains = (uniform(1 - a.hed, 1 + a.hed, 3), uniform(-a.hed, a.hed, 3)) if a.hed else None
        hsv = (uniform(-a.hue, a.hue), uniform(max(0.0, 1 - a.saturation), 1 + a.saturation)) if a.hue or a.saturation else None
        sigmas = uniform(0, a.blur) if a.blur else None
        noise_std = uniform(0, a.noise * 255) if a.noise else None
        noise_seed = int(torch.randint(2**62, (1,), generator=generator)) if a.noise else None
        std = torch.tensor(self.preprocess.std)
        scale, bias = gain / (255 * std), (-torch.tensor(self.preprocess.mean) / std).view(1, c, 1, 1)
        if matrices is not None:
            matrices = to_device(matrices, x.device)
        if stains is not None:
            stains = tuple(to_device(t, x.device) for t in stains)
        if hsv is not None:
            hsv = tuple(to_device(t, x.device) for t in hsv)
        if noise_std is not None:
            noise_std, noise_generator = to_device(noise_std, x.device), torch.Generator(x.device).manual_seed(noise_seed)
        scale, bias = to_device(scale, x.device), to_device(bias, x.device)
        out = torch.empty((n, c, h, w), dtype=torch.float32, device=x.device)
        # A GPU takes the batch at once. A CPU takes two images per thread at a time (grid_sample shares a batch
        # out among threads by image), so that their floats and sampling grids stay in the cores' caches.
        step = 2 * torch.get_num_threads() if x.device.type == "cpu" else n
        floats = torch.empty((min(step, n), h, w, c), dtype=torch.float32, device=x.device)  # reused by every step
        for s in range(0, n, step):
            part = floats[: min(step, n - s)].copy_(x[s : s + step])
            if stains is not None:
                jitter_stains(part, stains[0][s : s + step], stains[1][s : s + step])
            if hsv is not None:
                jitter_hue_saturation(part, hsv[0][s : s + step], hsv[1][s : s + step])
            if sigmas is not None:
                part.copy_(gaussian_blur(part.permute(0, 3, 1, 2), sigmas[s : s + step]).permute(0, 2, 3, 1))
            if noise_std is not None:
                spread = noise_std[s : s + step].view(-1, 1, 1, 1)
                part.add_(torch.randn(part.shape, generator=noise_generator, device=x.device).mul_(spread)).clamp_(0, 255)
            gains = scale[s : s + step]
            if self.preprocess.color_norm == "cell":  # after the stain jitter, as it would meet another lab's stain
                gains = gains * cell_color_gain(part)
            # A row of pixels is w * c numbers: per-channel factors repeated along it let the multiply run over
            # long contiguous rows instead of triples (several times faster on a CPU).
            part.view(-1, h, w * c).mul_(gains.repeat(1, w).view(-1, 1, w * c))
            part = part.permute(0, 3, 1, 2)
            if matrices is not None:
                part = sample_nearest(part, matrices[s : s + step])
            torch.add(part, bias, out=out[s : s + step])
        return out


def jitter_stains(rgb: torch.Tensor, times: torch.Tensor, plus: torch.Tensor) -> None:
    """In place on float RGB (N, H, W, 3) in [0, 255]: each image's stain amounts (colour deconvolution)
    times `times` plus `plus`, both (N, 3), and back to RGB. Black (the background) stays black."""
    density = rgb.div(255).clamp_min_(1e-6).log_().neg_()
    amounts = torch.matmul(density, HED_FROM_RGB.to(rgb.device)).clamp_min_(0)
    amounts.mul_(times.view(-1, 1, 1, 3)).add_(plus.view(-1, 1, 1, 3))
    density = torch.matmul(amounts, RGB_FROM_HED.to(rgb.device))
    rgb.copy_(density.neg_().exp_().clamp_(0, 1).mul_(255))


def jitter_hue_saturation(rgb: torch.Tensor, hue: torch.Tensor, saturation: torch.Tensor) -> None:
    """In place on float RGB (N, H, W, 3) in [0, 255]: each image's hue turned by hue[i] of the colour circle, then
    its saturation scaled by saturation[i], as torchvision's adjust_hue and adjust_saturation (kornia's, which take a
    factor per image)."""
    import kornia.enhance  # imported here: it takes seconds, and only runs that use this jitter need it

    x = rgb.permute(0, 3, 1, 2).div(255)
    x = kornia.enhance.adjust_hue(x, hue * (2 * math.pi))  # kornia turns the hue in radians
    x = kornia.enhance.adjust_saturation_with_gray_subtraction(x, saturation)
    rgb.copy_(x.permute(0, 2, 3, 1).mul_(255))


def gaussian_blur(x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Each image of float (N, C, H, W) blurred by its own Gaussian of std sigmas[i] px (0: unchanged), as
    torchvision's gaussian_blur with a kernel of 2 * ceil(3 * max sigma) + 1 taps and reflected borders."""
    n, c, h, w = x.shape
    radius = min(max(1, math.ceil(3 * float(sigmas.max()))), h - 1, w - 1)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernels = torch.exp(-0.5 * (taps / sigmas.clamp_min(1e-3).view(-1, 1)) ** 2)
    kernels = to_device((kernels / kernels.sum(1, keepdim=True)).repeat_interleave(c, 0), x.device)
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, kernels.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(y, kernels.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


def cell_color_gain(x: torch.Tensor) -> torch.Tensor:
    """(N, 3) float: per image of RGB (N, H, W, 3) in [0, 255], the channel gains that bring the mean colour of its cell
    (every pixel brighter than BACKGROUND in some channel) to CELL_COLOR."""
    cell = x.amax(3, keepdim=True) > BACKGROUND
    pixels = cell.sum((1, 2), dtype=torch.float32).clamp_min(1)
    mean = (x * cell).sum((1, 2), dtype=torch.float32) / pixels
    return torch.tensor(CELL_COLOR, device=x.device) / mean.clamp_min(1)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor on device without making the host wait for the GPU (pinned, non-blocking copy)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@functools.lru_cache(maxsize=8)
def pixel_grid(h: int, w: int, device: torch.device) -> torch.Tensor:
    """(1, H * W, 3): each pixel's centre (x, y) relative to the image centre, and 1; torchvision's base grid."""
    base = torch.empty(1, h, w, 3, device=device)
    base[..., 0].copy_(torch.linspace((1 - w) / 2, (w - 1) / 2, w, device=device))
    base[..., 1].copy_(torch.linspace((1 - h) / 2, (h - 1) / 2, h, device=device).unsqueeze_(-1))
    base[..., 2].fill_(1)
    return base.view(1, h * w, 3)


def grid_matrix(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(N, 3, 2): what turns pixel_grid into grid_sample's grid, for 2x2 matrices theta (N, 2, 2) that map
    an output pixel's offset from the image centre to the input's (torchvision's affine matrix, untranslated).

    The arithmetic is torchvision's (affine, rotate), so each output pixel takes the same source pixel.
    """
    m = torch.zeros(len(theta), 3, 2, device=theta.device)
    m[:, :2] = theta.transpose(1, 2) / torch.tensor([0.5 * w, 0.5 * h], device=theta.device)
    return m


def sample_nearest(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Float images (N, C, H, W) resampled through grid matrices m (N, 3, 2) from grid_matrix, nearest pixel.

    Where TF32 matmuls are allowed (train.py allows them on a GPU) the grid carries TF32's rounding: a
    rotation off by a few hundredths of a degree. Whatever comes from outside the image is 0.
    """
    n, _, h, w = x.shape
    grid = torch.bmm(pixel_grid(h, w, x.device).expand(n, -1, -1), m).view(n, h, w, 2)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


# ----------------------------------------------------------------------------------------------------------
# The dataset


class RetinopathyLoader(Dataset):
    """The course dataset: (image, label) for train/valid, image alone for test.

    output="float" (the default) gives a normalised float (3, H, W), augmented if augment is set: what the
    course template returns. output="uint8" gives the decoded, cropped, resized uint8 image (H, W, 3) only,
    for a training loop that applies BatchTransform to whole batches on the training device (train.py does).
    """

    def __init__(
        self,
        root: str = "data",
        mode: str = "train",
        preprocess: Preprocess | None = None,
        augment: Augment | None = None,
        output: str = "float",
        model: str | None = None,
        csv_path: str | None = None,
    ):
        if output not in ("float", "uint8"):
            raise ValueError(f"output must be 'float' or 'uint8', got {output!r}")
        self.root, self.mode, self.output = root, mode, output
        self.preprocess = preprocess or Preprocess()
        self.transform = BatchTransform(self.preprocess, augment)
        data = getData(mode, root, model=model, csv_path=csv_path)
        self.img_name, self.label = (data, None) if mode == "test" else data
        self.csv_path = split_csv(root, mode, model, csv_path)
        check_not_empty(self.img_name, self.csv_path)
        check_files_exist(self.img_name, self.csv_path)

    def __len__(self) -> int:
        return len(self.img_name)

    def __getitem__(self, index: int):
        img = decode_image(self.img_name[index], self.preprocess.crop, self.preprocess.size)
        if self.output == "float":
            img = self.transform(img[None])[0]
        return img if self.label is None else (img, self.label[index])


LeukemiaLoader = RetinopathyLoader


class ImageFiles(Dataset):
    """Images given by path, with no CSV and no labels (predict.py --images): each decoded as RetinopathyLoader's
    uint8 output, for scoring."""

    def __init__(self, paths: list[str], preprocess: Preprocess):
        self.img_name, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.img_name)

    def __getitem__(self, index: int) -> torch.Tensor:
        return decode_image(self.img_name[index], self.preprocess.crop, self.preprocess.size)


def find_images(folder: str) -> list[str]:
    """Every image file under folder and its subfolders (by extension: IMAGE_EXTENSIONS), sorted by path."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: no such folder; give the folder that holds the cell images")
    paths = sorted(os.path.join(top, name) for top, _, names in os.walk(folder) for name in names
                   if name.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise DataError(f"{folder}: no images under it (files ending {', '.join(IMAGE_EXTENSIONS)}); give the folder that "
                        "holds the cell images")
    return paths


# ----------------------------------------------------------------------------------------------------------
# Command line


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--check", action="store_true", help="decode every image of the dataset and report problems")
    action.add_argument("--make-demo", metavar="DIR", help="write a synthetic dataset in the course layout to DIR")
    action.add_argument("--import-cnmc", metavar="SRC",
                        help="import the public C-NMC release from SRC (its top folder C-NMC_Leukemia, its training_data, or "
                             "../shared/cnmc); from the top folder, its preliminary test phase becomes OUT/prelim_test.csv too")
    parser.add_argument("--data-root", default="data", help="dataset folder for --check (default: data)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for --make-demo and --import-cnmc")
    parser.add_argument("--sizes", type=int, nargs=3, default=[600, 150, 150], metavar=("TRAIN", "VALID", "TEST"),
                        help="--make-demo: number of train, valid and test cells (default: 600 150 150)")
    parser.add_argument("--side", type=int, default=450, help="--make-demo: image side in px (default: 450, as the course)")
    parser.add_argument("--out", help="--import-cnmc: output folder")
    parser.add_argument("--folds", type=int, metavar="K",
                        help="--import-cnmc: write K patient-level folds OUT/fold_0 .. fold_<K-1> instead of one split, "
                             "each holding out its own subjects in valid (the yardstick for unseen patients)")
    parser.add_argument("--split", choices=["subject", "random"], default="subject",
                        help="--import-cnmc: keep each subject in one split (default) or split cells at random")
    parser.add_argument("--valid-frac", type=float, default=0.2, help="--import-cnmc: share of cells for valid (default: 0.2)")
    parser.add_argument("--test-frac", type=float, default=0.2, help="--import-cnmc: share of cells for test (default: 0.2)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes for --check and --make-demo")
    return parser


def main(args: argparse.Namespace) -> int:
    if args.check:
        return datatools.check_dataset(args.data_root, workers=args.workers)
    if args.make_demo:
        datatools.make_demo(args.make_demo, sizes=tuple(args.sizes), seed=args.seed, side=args.side, workers=args.workers)
        return 0
    if not args.out:
        print("--import-cnmc needs --out DIR", file=sys.stderr)
        return 2
    if args.folds is not None:
        datatools.import_folds(args.import_cnmc, args.out, args.folds, seed=args.seed)
        return 0
    datatools.import_cnmc(args.import_cnmc, args.out, split=args.split, valid_frac=args.valid_frac,
                          test_frac=args.test_frac, seed=args.seed)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(get_args_parser().parse_args()))
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
