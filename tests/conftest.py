import contextlib
import io
import os
import runpy
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared")

import datatools  # noqa: E402


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> str:
    """A tiny synthetic dataset in the course layout: 48 train, 16 valid, 12 test cells of 64 px."""
    root = str(tmp_path_factory.mktemp("demo"))
    datatools.make_demo(root, sizes=(48, 16, 12), seed=1, side=64, workers=1)
    return root


def shared_path(*parts: str) -> str:
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.skip(f"{path} is absent: the shared course files sit beside the repository only on the lab machines")
    return path


def run_script(script: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    """`python <script> <args>` run in this process, its `__main__` block and all, returning what subprocess.run would:
    a new interpreter spends most of a short script's time importing torch. For scripts that leave the process as they
    found it (evaluate.py, predict.py, plot.py, train.py refusing its flags), not for training, which seeds torch."""
    out, err = io.StringIO(), io.StringIO()
    argv, here = sys.argv, os.getcwd()
    sys.argv = [script, *args]
    try:
        os.chdir(cwd or here)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
        code = 0
    except SystemExit as e:  # as the interpreter does: sys.exit(message) prints it and means status 1
        if isinstance(e.code, str):
            err.write(e.code + "\n")
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    finally:
        sys.argv = argv
        os.chdir(here)
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def train_run(demo_root: str, out: str, name: str, *extra: str) -> str:
    """The run folder out/<name> of a tiny train.py run; what it printed is kept beside it, in out/<name>.stdout."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--data-root", demo_root, "--output-dir", out, "--run-name", name,
           "--image-size", "32", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--epochs", "2", *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    with open(os.path.join(out, name + ".stdout"), "w") as f:
        f.write(result.stdout)
    return os.path.join(out, name)


@pytest.fixture(scope="session")
def trained_runs(demo_root, tmp_path_factory) -> list[str]:
    """Two finished tiny runs of the demo data, 2 epochs each: checkpoints/a (resnet18) and checkpoints/b (resnet18,
    another seed, no EMA, TensorBoard logs)."""
    out = str(tmp_path_factory.mktemp("checkpoints"))
    return [train_run(demo_root, out, "a"), train_run(demo_root, out, "b", "--seed", "7", "--ema", "0", "--tensorboard")]
