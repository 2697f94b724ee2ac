"""benchmark.py runs end to end and writes every figure it promises (speed itself is not tested)."""
import json
import os
import subprocess
import sys

from conftest import ROOT


def test_benchmark_writes_its_figures(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmark.py"), "--device", "cpu", "--data-root", str(tmp_path / "data"),
           "--image-size", "32", "--batch-size", "4", "--steps", "1", "--rounds", "1", "--images", "24", "--workers", "1",
           "--json", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(out.read_text())
    for key in ("model_vs_torchvision", "pipeline_vs_report", "epoch_vs_report"):
        assert figures[key] > 0
    assert figures["device"].startswith("cpu") and "command" in figures and "date" in figures
    assert "| pipeline_vs_report |" in result.stdout
