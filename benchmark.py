"""How fast this project trains, measured against references in the same run.

    python benchmark.py                                   CPU: small settings, about 80 s on 2 cores
    python benchmark.py --json benchmark.json             also write the figures as JSON
    python benchmark.py --preset gpu --json gpu.json      CUDA: 450 px, every model, course-sized data

Every figure is a ratio where above 1 means this project is faster, measured in the same process:
  model_vs_torchvision  train-step images/s of resnet.py against torchvision's same network, step by step in turns
  pipeline_vs_report    images/s of the input pipeline against the seed report's (PIL per image: flip,
                        rotation 15, ToTensor, Normalize), same files and workers, up to an augmented,
                        normalised float batch on the training device
  epoch_vs_report       one training epoch of train.py against a report-style loop (fp32, NCHW, PIL, .item())
train.py's epoch runs with its defaults, which include torch.compile on a CUDA GPU that Triton supports.
On CUDA also: images/s and the share of the GPU's bf16 peak per model; the share of step time the GPU
spends waiting for data and the host syncs per step, with workers decoding (train.py's default); the
estimated time of 200 ResNet152 epochs on the course data (measured with --no-compile, to save the two
minutes compiling it takes); and the ResNet50 epoch with --no-compile.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import statistics
import sys
import time
import warnings
from typing import Callable

import torch
import torchvision
from PIL import Image
from torchvision import transforms

from batching import EpochBatchSampler, make_loader
from cli import non_negative_int, positive_int
from dataloader import Augment, BatchTransform, Preprocess, RetinopathyLoader, getData
from devices import DEVICES, amp_dtype, autocast, device_name, keep_freed_memory, resolve_device
from files import atomic_write
from resnet import build_model
import train

# Dense bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "RTX 4090": 165.0, "V100": 125.0}
PRESETS = {
    "cpu": dict(models=["resnet18"], crop=350, image_size=64, batch_size=16, steps=100, pipeline_images=1024, train_images=256,
                rounds=3, epochs=2),
    "gpu": dict(models=["resnet18", "resnet50", "resnet152"], crop=None, image_size=None, batch_size=64, steps=60,
                pipeline_images=4096, train_images=7995, rounds=1, epochs=2),
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), help="settings for the machine (default: gpu on CUDA, else cpu)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="training device (default: auto)")
    parser.add_argument("--data-root", default=os.path.join("data", "bench"),
                        help="450 px dataset in the course layout; made with the demo generator if missing (default: data/bench)")
    parser.add_argument("--models", nargs="+", help="models to measure (default: from the preset)")
    parser.add_argument("--crop", type=non_negative_int, help="centre crop of the epoch measurements, 0 for the whole 450 px image (default: from the preset)")
    parser.add_argument("--image-size", type=positive_int, help="network input side; unset keeps the crop's side (default: from the preset)")
    parser.add_argument("--batch-size", type=positive_int, help="images per step (default: from the preset)")
    parser.add_argument("--steps", type=positive_int, help="timed train steps per model, models taking turns (default: from the preset)")
    parser.add_argument("--rounds", type=positive_int,
                        help="rounds of the pipeline and epoch measurements, taken in turns; medians compared (default: from the preset)")
    parser.add_argument("--images", type=positive_int, help="images for the pipeline and epoch measurements (default: from the preset)")
    parser.add_argument("--epochs", type=positive_int,
                        help="epochs of train.py in each epoch measurement, the last one timed; the report-style loop runs one "
                             "(default: from the preset)")
    parser.add_argument("--workers", type=non_negative_int, default=os.cpu_count() or 1, help="data-loading processes for both pipelines (default: all cores)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not in the built-in table")
    parser.add_argument("--skip-compile", action="store_true",
                        help="time train.py with --no-compile throughout: quicker, and for a GPU without Triton (default: train.py's choice)")
    parser.add_argument("--json", help="write the figures to this JSON file, after each part")
    return parser


def bench_data(root: str, images: int, workers: int) -> str:
    """A course-layout dataset of 450 px demo cells with at least `images` train images."""
    if os.path.isfile(os.path.join(root, "train.csv")) and len(getData("train", root)[0]) >= images:
        return root
    import datatools

    datatools.make_demo(root, sizes=(images, 64, 0), seed=0, workers=workers)
    return root


def input_side(cfg: dict) -> int:
    return cfg["image_size"] or cfg["crop"] or 450


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------------------
# 1. resnet.py against torchvision


def train_step_seconds(models: dict[str, torch.nn.Module], x, y, steps: int, device, dtype) -> dict[str, list[float]]:
    """Seconds of each of `steps` train steps per model, after a warm-up step. The models take turns step by step,
    first one then the other going first, so whatever else the machine does meanwhile slows them alike."""
    criterion = torch.nn.CrossEntropyLoss()
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, m in models.items()}
    seconds: dict[str, list[float]] = {k: [] for k in models}
    for i in range(steps + 1):
        for k in list(models) if i % 2 == 0 else list(models)[::-1]:
            model = models[k]
            sync(device)
            start = time.perf_counter()
            with autocast(device, dtype):
                loss = criterion(model(x).float(), y)
            optimizers[k].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[k].step()
            sync(device)
            if i > 0:
                seconds[k].append(time.perf_counter() - start)
    return seconds


def model_vs_torchvision(name: str, cfg: dict, device, dtype, channels_last: bool) -> dict:
    side = input_side(cfg)
    torch.manual_seed(0)
    ours, theirs = build_model(name).to(device), getattr(torchvision.models, name)(num_classes=2).to(device)
    theirs.load_state_dict(ours.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    models = {"ours": ours.to(memory_format=fmt).train(), "torchvision": theirs.to(memory_format=fmt).train()}
    x = torch.randn(cfg["batch_size"], 3, side, side, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 2, (cfg["batch_size"],), device=device)
    rates = {k: len(x) / statistics.median(s) for k, s in train_step_seconds(models, x, y, cfg["steps"], device, dtype).items()}
    return {"ours_images_per_s": rates["ours"], "torchvision_images_per_s": rates["torchvision"],
            "ratio": rates["ours"] / rates["torchvision"], "image_size": side, "batch_size": cfg["batch_size"], "steps": cfg["steps"]}


# ----------------------------------------------------------------------------------------------------------
# 2. input pipelines


class ReportDataset(torch.utils.data.Dataset):
    """The seed report's RetinopathyLoader: PIL per image, flip, rotation 15, ToTensor, Normalize."""

    def __init__(self, root: str, extra: list | None = None):
        self.paths, self.labels = getData("train", root)
        self.transform = transforms.Compose([*(extra or []), transforms.RandomHorizontalFlip(), transforms.RandomRotation(degrees=15),
                                             transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.transform(Image.open(self.paths[i])), self.labels[i]


def pipeline_rate(loader, device, transform=None, images: int = 0) -> float:
    """Images/s until `images` have arrived on the device as float batches (after one warm-up batch), going
    through the dataset again if it has fewer."""

    def forever():
        while True:
            yield from loader

    seen, start = 0, None
    for batch in forever():
        x = batch[1] if len(batch) == 3 else batch[0]
        x = x.to(device, non_blocking=True)
        x = transform(x) if transform is not None else x
        if start is None:
            sync(device)
            start = time.perf_counter()
            continue
        seen += len(x)
        if seen >= images:
            break
    sync(device)
    return seen / (time.perf_counter() - start)


def pipeline_vs_report(root: str, cfg: dict, workers: int, device, pin: bool) -> dict:
    """Median images/s of each pipeline over cfg["rounds"] rounds, the pipelines taking turns within a round.

    With pin (on CUDA), the CPU's share is also measured without pinned memory: whether the main process's one
    pin-memory thread, which copies every batch, is what limits the workers.
    """
    n = cfg["pipeline_images"]
    batch = max(1, min(32, n // 4))

    def report() -> float:  # persistent workers, as ours: no worker start-up counted when it goes round the data again
        loader = torch.utils.data.DataLoader(ReportDataset(root), batch_size=batch, shuffle=True, num_workers=workers,
                                             pin_memory=pin, persistent_workers=workers > 0)
        return pipeline_rate(loader, device, images=n)

    def ours(crop: int | None, host_only: bool, pinned: bool = pin) -> Callable[[], float]:
        preprocess = Preprocess(crop=crop)
        dataset = RetinopathyLoader(root, "train", preprocess=preprocess, output="uint8")
        transform = None if host_only else BatchTransform(preprocess, Augment())  # host only: decode and crop to uint8
        loader_device = device if pinned else torch.device("cpu")

        def measure() -> float:  # a fresh loader each time: nothing decoded ahead by the one before
            sampler = EpochBatchSampler(len(dataset), batch, shuffle=True)
            loader = make_loader(dataset, sampler, workers, loader_device)
            return pipeline_rate(loader, device if transform else torch.device("cpu"), transform, images=n)

        return measure

    pipelines = {"report": report, "ours": ours(350, False), "ours_host_only": ours(350, True),
                 "ours_full_450": ours(None, False), "ours_full_450_host_only": ours(None, True)}
    if pin:
        pipelines["ours_full_450_host_only_unpinned"] = ours(None, True, pinned=False)
    rounds: dict[str, list[float]] = {k: [] for k in pipelines}
    for _ in range(cfg["rounds"]):
        for k, measure in pipelines.items():
            rounds[k].append(measure())
    rates = {k: statistics.median(v) for k, v in rounds.items()}
    return {**{f"{k}_images_per_s": v for k, v in rates.items()}, "workers": workers, "rounds": rounds,
            "ratio": rates["ours"] / rates["report"], "ratio_full_450": rates["ours_full_450"] / rates["report"],
            "host_ratio": rates["ours_host_only"] / rates["report"]}


# ----------------------------------------------------------------------------------------------------------
# 3. a training epoch


@contextlib.contextmanager
def pytorch_defaults():
    """cuDNN autotuning and TF32 matmuls off, as the report ran; the settings before are put back after."""
    before = torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = False, False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = before


def report_epoch(root: str, name: str, batch_size: int, workers: int, device, crop: int | None, size: int | None) -> float:
    """The seed report's loop: fp32, NCHW, PIL pipeline, .item() every step. Returns images/s."""
    extra = ([transforms.CenterCrop(crop)] if crop else []) + ([transforms.Resize(size)] if size else [])
    loader = torch.utils.data.DataLoader(ReportDataset(root, extra), batch_size=batch_size, shuffle=True, num_workers=workers)
    model = build_model(name).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    criterion = torch.nn.CrossEntropyLoss()
    seen, running_loss, correct, start = 0, 0.0, 0, time.perf_counter()
    with pytorch_defaults():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            outputs = model(x)
            loss = criterion(outputs, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            correct += (outputs.argmax(1) == y).sum().item()
            seen += len(x)
        sync(device)
    return seen / (time.perf_counter() - start)


class TimedBatches:
    """Wraps an iterable of batches and adds up how long the training device waits for the next one.

    On a CPU that is the time the loop waits. On CUDA the host runs ahead of the GPU, and a wait for a batch
    stalls the GPU only once it has run out of queued work: two events recorded around each wait give the
    GPU's idle time between them (none while it is still busy with earlier steps).
    """

    def __init__(self, batches, device: torch.device):
        self.batches, self.cuda = batches, device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        self.host_waits, self.events = [], []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        it = iter(self.batches)
        while True:
            start, before = time.perf_counter(), self.event()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.host_waits.append(time.perf_counter() - start)
            self.events.append((before, self.event()))
            yield batch

    def event(self) -> torch.cuda.Event | None:
        if not self.cuda:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def device_waits(self) -> list[float]:
        """Seconds the device waited for each batch; call once it has finished."""
        return [before.elapsed_time(after) / 1e3 for before, after in self.events] if self.cuda else self.host_waits


def ours_epoch(root: str, name: str, batch_size: int, workers: int, device, crop: int | None, size: int | None, cache: str,
               epochs: int, compile_model: bool | None = None) -> dict:
    """The last of `epochs` epochs of train.py's own loop with its default recipe (compile_model: --compile or
    --no-compile, None for train.py's choice). The first epoch starts the workers, which train.py does once a run
    (the report's loop starts its own every epoch, and is timed so), and warms up cuDNN, the cache and the compiler.
    Returns images/s and the data wait."""
    argv = ["--model", name, "--data-root", root, "--batch-size", str(batch_size), "--workers", str(workers), "--cache", cache,
            "--device", device.type, "--epochs", str(epochs), "--crop", str(crop or 0)]
    argv += ["--image-size", str(size)] if size else []
    argv += [] if compile_model is None else ["--compile" if compile_model else "--no-compile"]
    args = train.parse_args(argv)
    args.rank, args.world_size = 0, 1
    train.seed_everything(args.seed, False)
    preprocess, augment = train.transforms_from_args(args)
    train_batches, transform, _, _, _, labels, _ = train.load_data(args, preprocess, augment, 0, 1, device)
    model, channels_last, dtype, optimizer, scheduler, scaler, ema, criterion = train.build_training(args, device, labels, len(train_batches))
    compiled = train.should_compile(args, device)
    if compiled:
        torch._dynamo.reset()  # compiled afresh, as in a new train.py process, not re-specialised from the last model
    step_model = train.compile_for_training(model) if compiled else model
    timed = TimedBatches(train_batches, device)
    results, first_epoch_seconds = {}, None
    for epoch in range(epochs):
        timed.reset()
        with host_syncs(device) as syncs:
            stats = train.train_one_epoch(step_model, ema, timed, transform, optimizer, scheduler, scaler, criterion, epoch, args,
                                          device, dtype, channels_last, train.StopRequest(), False)
        first_epoch_seconds = first_epoch_seconds or stats["seconds"]  # with --compile, the compilation's too
        waits = timed.device_waits()
        results = {"images_per_s": stats["images_per_s"], "seconds": stats["seconds"], "first_epoch_seconds": first_epoch_seconds,
                   "data_wait_share": sum(waits) / stats["seconds"], "host_wait_share": sum(timed.host_waits) / stats["seconds"],
                   "first_batch_wait_seconds": waits[0], "train_images": len(labels), "steps": len(timed), "cache": cache,
                   "compiled": compiled}
        if device.type == "cuda":
            results["host_syncs"], results["host_sync_sites"] = len(syncs), dict(collections.Counter(syncs))
    return results


@contextlib.contextmanager
def host_syncs(device):
    """Where the host waited for the GPU inside the block (file:line, once per wait), as CUDA's sync debug mode
    reports it."""
    found: list[str] = []
    if device.type != "cuda":
        yield found
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode("default")
            found.extend(f"{os.path.basename(w.filename)}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))


# ----------------------------------------------------------------------------------------------------------
# 4. CUDA throughput against the hardware's peak


def gpu_peak_tflops(device, given: float | None) -> float | None:
    if given:
        return given
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def model_throughput(name: str, cfg: dict, device, dtype, peak: float | None) -> dict:
    side = input_side(cfg)
    model = build_model(name).to(device).to(memory_format=torch.channels_last).train()
    x = torch.randn(cfg["batch_size"], 3, side, side, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (cfg["batch_size"],), device=device)
    rate = len(x) / statistics.median(train_step_seconds({name: model}, x, y, cfg["steps"], device, dtype)[name])
    train_flops = 3 * model.flops_per_image(side)  # forward + backward (twice the forward)
    result = {"images_per_s": rate, "image_size": side, "train_gflops_per_image": train_flops / 1e9}
    if peak:
        result["bf16_peak_share"] = train_flops * rate / (peak * 1e12)
    return result


# ----------------------------------------------------------------------------------------------------------


def median_note(cfg: dict) -> str:
    return f"; medians of {cfg['rounds']} rounds" if cfg["rounds"] > 1 else ""


def compile_choice(args: argparse.Namespace) -> bool | None:
    return False if args.skip_compile else None


def compile_note(epoch: dict) -> str:
    return f"compiled, its first epoch {epoch['first_epoch_seconds']:.0f} s" if epoch["compiled"] else "not compiled"


def wait_note(epoch: dict) -> str:
    """The device's data wait and how much of it the first batch took; on CUDA also the host's wait, which mostly
    overlaps GPU work, and the host syncs."""
    cuda = "host_syncs" in epoch
    host = f" (the host's {epoch['host_wait_share']:.1%})" if cuda else ""
    syncs = f", {epoch['host_syncs']} host syncs in {epoch['steps']} steps" if cuda else ""
    return f"data wait {epoch['data_wait_share']:.1%}{host}, {epoch['first_batch_wait_seconds'] * 1e3:.0f} ms of it for the first batch{syncs}"


def main(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    keep_freed_memory(device)  # as train.py: both sides of every figure run in this process
    cfg = dict(PRESETS[args.preset or ("gpu" if device.type == "cuda" else "cpu")])
    for k in ("models", "crop", "image_size", "batch_size", "steps", "rounds", "epochs"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    if args.images:
        cfg["pipeline_images"] = cfg["train_images"] = args.images
    dtype = amp_dtype(device)
    channels_last = device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    root = bench_data(args.data_root, cfg["train_images"], args.workers)
    out = {"device": device_name(device), "cpu_cores": os.cpu_count(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "settings": cfg, "command": " ".join(["python", *sys.argv])}
    print(f"device {out['device']}, {out['cpu_cores']} CPU cores, torch {torch.__version__}; data {root}")

    out["model_comparison"] = {m: model_vs_torchvision(m, cfg, device, dtype, channels_last) for m in cfg["models"]}
    for m, r in out["model_comparison"].items():
        print(f"1. {m} train step at {r['image_size']} px: ours {r['ours_images_per_s']:.1f} img/s, "
              f"torchvision {r['torchvision_images_per_s']:.1f} img/s, ratio {r['ratio']:.3f}")
    save(out, args.json)

    p = out["pipeline"] = pipeline_vs_report(root, cfg, args.workers, device, pin=device.type == "cuda")
    print(f"2. input pipeline, {p['workers']} workers, to a float batch on {device.type}: report {p['report_images_per_s']:.0f} img/s; "
          f"ours {p['ours_images_per_s']:.0f} (350 px crop, ratio {p['ratio']:.2f}), {p['ours_full_450_images_per_s']:.0f} "
          f"(full 450 px, ratio {p['ratio_full_450']:.2f}); ours' CPU share alone (decode + crop, uint8) {p['ours_host_only_images_per_s']:.0f} "
          f"(ratio {p['host_ratio']:.2f}){median_note(cfg)}")
    if "ours_full_450_host_only_unpinned_images_per_s" in p:
        print(f"2. ours' CPU share at 450 px: {p['ours_full_450_host_only_images_per_s']:.0f} img/s pinned, "
              f"{p['ours_full_450_host_only_unpinned_images_per_s']:.0f} without pinning")
    save(out, args.json)

    epoch_model = "resnet50" if device.type == "cuda" else cfg["models"][0]
    runs = []
    for _ in range(cfg["rounds"]):  # in turns, so that whatever else the machine does slows both alike
        runs.append((ours_epoch(root, epoch_model, cfg["batch_size"], args.workers, device, cfg["crop"], cfg["image_size"], "none",
                                cfg["epochs"], compile_choice(args)),
                     report_epoch(root, epoch_model, cfg["batch_size"], args.workers, device, cfg["crop"], cfg["image_size"])))
    ours = sorted((o for o, _ in runs), key=lambda o: o["images_per_s"])[len(runs) // 2]
    theirs = statistics.median(t for _, t in runs)
    out["epoch"] = {"model": epoch_model, "ours": ours, "report_images_per_s": theirs, "ratio": ours["images_per_s"] / theirs,
                    "rounds": [{"ours_images_per_s": o["images_per_s"], "report_images_per_s": t} for o, t in runs]}
    print(f"3. one {epoch_model} epoch at {input_side(cfg)} px: train.py {ours['images_per_s']:.0f} img/s ({compile_note(ours)}; "
          f"{wait_note(ours)}), report-style loop {theirs:.0f} img/s, ratio {out['epoch']['ratio']:.2f}{median_note(cfg)}")

    summary = {"model_vs_torchvision": min(r["ratio"] for r in out["model_comparison"].values()), "pipeline_vs_report": p["ratio"],
               "epoch_vs_report": out["epoch"]["ratio"]}
    out.update(summary)
    save(out, args.json)
    if device.type == "cuda":
        summary.update(cuda_figures(out, root, cfg, args, device, dtype))
        out.update(summary)
    print("\n| figure | value |\n|---|---|")
    for k, v in summary.items():
        print(f"| {k} | {json.dumps(v, default=lambda x: round(x, 3)) if isinstance(v, dict) else f'{v:.3f}'} |")
    save(out, args.json)
    if args.json:
        print(f"wrote {args.json}")
    return 0


def cuda_figures(out: dict, root: str, cfg: dict, args: argparse.Namespace, device, dtype) -> dict:
    """Part 4: each model against the card's peak, ResNet18's data wait, ResNet152's 200 epochs, and the epoch
    without compiling; saved as they come."""
    peak = gpu_peak_tflops(device, args.peak_tflops)
    ours = out["epoch"]["ours"]
    summary = {"data_wait_share": ours["data_wait_share"], "host_syncs_per_step": ours["host_syncs"] / ours["steps"]}
    out["throughput"] = {m: model_throughput(m, cfg, device, dtype, peak) for m in cfg["models"]}
    summary["images_per_s"] = {m: r["images_per_s"] for m, r in out["throughput"].items()}
    summary["bf16_peak_share"] = {m: r.get("bf16_peak_share") for m, r in out["throughput"].items()}
    for m, r in out["throughput"].items():
        share = f", {r['bf16_peak_share']:.1%} of the {peak:.0f} TFLOP/s bf16 peak" if peak else ""
        print(f"4. {m} at {r['image_size']} px: {r['images_per_s']:.0f} img/s{share}")
    save({**out, **summary}, args.json)
    if "resnet18" in cfg["models"]:  # the fastest network asks the most of the decoding workers
        r18 = out["resnet18_epoch"] = ours_epoch(root, "resnet18", cfg["batch_size"], args.workers, device, cfg["crop"],
                                                 cfg["image_size"], "none", cfg["epochs"], compile_choice(args))
        summary["data_wait_share_resnet18"] = r18["data_wait_share"]
        print(f"4. resnet18 epoch at {input_side(cfg)} px, workers decoding: {r18['images_per_s']:.0f} img/s ({compile_note(r18)}; "
              f"{wait_note(r18)})")
        save({**out, **summary}, args.json)
    if "resnet152" in cfg["models"]:  # not compiled: compiling it takes two minutes and gained nothing measurable on an H200
        r152 = out["resnet152_epoch"] = ours_epoch(root, "resnet152", cfg["batch_size"], args.workers, device, 350, cfg["image_size"],
                                                   "none", cfg["epochs"], compile_model=False)
        summary["resnet152_200_epochs_minutes"] = 200 * r152["train_images"] / r152["images_per_s"] / 60
        print(f"4. resnet152 at the default 350 px crop: one epoch of {r152['train_images']} images at {r152['images_per_s']:.0f} img/s "
              f"({compile_note(r152)}; {wait_note(r152)}): 200 epochs in about {summary['resnet152_200_epochs_minutes']:.0f} minutes "
              "(training only)")
        save({**out, **summary}, args.json)
    if ours["compiled"]:  # what a run with --no-compile gets
        name = out["epoch"]["model"]
        eager = out["epoch"]["ours_eager"] = ours_epoch(root, name, cfg["batch_size"], args.workers, device, cfg["crop"],
                                                        cfg["image_size"], "none", cfg["epochs"], compile_model=False)
        summary["compile_speedup"] = ours["images_per_s"] / eager["images_per_s"]
        summary["epoch_vs_report_eager"] = eager["images_per_s"] / out["epoch"]["report_images_per_s"]
        print(f"4. {name} epoch with --no-compile: {eager['images_per_s']:.0f} img/s ({wait_note(eager)}), "
              f"{summary['epoch_vs_report_eager']:.2f}x the report-style loop; compiling gains {summary['compile_speedup']:.2f}x")
    return summary


def save(out: dict, path: str | None) -> None:
    """Write the figures so far: a run cut short still leaves what it measured."""
    if path:
        atomic_write(path, lambda f: f.write(json.dumps(out, indent=2).encode()))


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
