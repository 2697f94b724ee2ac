"""benchmark.py runs end to end and writes every figure it promises (speed itself is not tested)."""
import json
import os
import subprocess
import sys

from conftest import ROOT


def test_benchmark_writes_its_figures(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmark.py"), "--device", "cpu", "--data-root", str(tmp_path / "data"),
           "--image-size", "32", "--batch-size", "4", "--steps", "1", "--images", "24", "--workers", "1", "--rounds", "2", "--epochs", "1",
           "--json", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(out.read_text())
    for key in ("model_vs_torchvision", "pipeline_vs_report", "epoch_vs_report"):
        assert figures[key] > 0
    assert figures["device"].startswith("cpu") and "command" in figures and "date" in figures
    assert "| pipeline_vs_report |" in result.stdout and "medians of 2 rounds" in result.stdout
    assert len(figures["pipeline"]["rounds"]["report"]) == len(figures["epoch"]["rounds"]) == 2


def test_pipelines_with_pinning_also_measure_the_cpu_share_unpinned(demo_root):
    """The pinned branch runs on CUDA only; on a CPU the DataLoader ignores pin_memory, so it can be driven here."""
    import warnings

    import torch

    import benchmark

    cfg = dict(pipeline_images=8, rounds=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pin_memory without an accelerator
        p = benchmark.pipeline_vs_report(demo_root, cfg, 0, torch.device("cpu"), pin=True)
    assert p["ours_full_450_host_only_unpinned_images_per_s"] > 0 and len(p["rounds"]) == 6
    unpinned = benchmark.pipeline_vs_report(demo_root, cfg, 0, torch.device("cpu"), pin=False)
    assert "ours_full_450_host_only_unpinned_images_per_s" not in unpinned


def test_cuda_section_runs_and_its_figures_add_up(demo_root, tmp_path):
    """The part that runs only on CUDA, driven on the CPU (compile left out) so that it cannot first fail on a GPU."""
    import argparse

    import torch

    import benchmark

    out = {"epoch": {"model": "resnet18", "report_images_per_s": 4.0,
                     "ours": {"data_wait_share": 0.02, "host_syncs": 3, "steps": 12, "compiled": True, "images_per_s": 10.0}}}
    cfg = dict(models=["resnet18", "resnet152"], crop=None, image_size=32, batch_size=4, steps=1, epochs=1)
    args = argparse.Namespace(peak_tflops=0.5, skip_compile=True, workers=0, json=str(tmp_path / "gpu.json"))
    summary = benchmark.cuda_figures(out, demo_root, cfg, args, torch.device("cpu"), None)

    assert summary["host_syncs_per_step"] == 3 / 12 and summary["data_wait_share"] == 0.02
    for name in cfg["models"]:
        r = out["throughput"][name]
        flops = 3 * benchmark.build_model(name).flops_per_image(32)
        assert r["images_per_s"] > 0 and abs(r["bf16_peak_share"] - flops * r["images_per_s"] / 0.5e12) < 1e-12
    assert summary["data_wait_share_resnet18"] == out["resnet18_epoch"]["data_wait_share"] < 1
    r152 = out["resnet152_epoch"]
    assert r152["train_images"] == 48 and r152["cache"] == "none" and not r152["compiled"]
    assert abs(summary["resnet152_200_epochs_minutes"] - 200 * 48 / r152["images_per_s"] / 60) < 1e-9
    eager = out["epoch"]["ours_eager"]  # the default epoch compiled: the same without compiling, to compare
    assert not eager["compiled"] and summary["compile_speedup"] == 10.0 / eager["images_per_s"]
    assert summary["epoch_vs_report_eager"] == eager["images_per_s"] / 4.0
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert saved["resnet152_200_epochs_minutes"] == summary["resnet152_200_epochs_minutes"]


def test_cuda_data_wait_is_the_gpu_time_between_the_events_around_each_wait(monkeypatch):
    import pytest
    import torch

    import benchmark

    class GpuEvent:  # when the GPU reached the event, in ms
        def __init__(self, ms):
            self.ms = ms

        def elapsed_time(self, end):
            return end.ms - self.ms

    # Before and after each of three waits, then before the one that ends the epoch: the GPU idled 5 ms during
    # the first wait, not at all during the second (still busy with earlier steps), 3.5 ms during the third.
    reached = iter([0.0, 5.0, 7.0, 7.0, 20.0, 23.5, 30.0])
    timed = benchmark.TimedBatches(["a", "b", "c"], torch.device("cpu"))
    timed.cuda = True
    monkeypatch.setattr(timed, "event", lambda: GpuEvent(next(reached)))
    assert list(timed) == ["a", "b", "c"]
    assert timed.device_waits() == pytest.approx([5e-3, 0, 3.5e-3])
    timed.reset()
    assert timed.device_waits() == [] and timed.host_waits == []
