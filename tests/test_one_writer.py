"""One writer per run, and every stop says how to go on: the run-folder lock, errors met in DataLoader workers, and
running out of GPU memory."""
import hashlib
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import batching
import checkpoints
from conftest import ROOT, run_script
from dataloader import Preprocess, RetinopathyLoader
from files import DataError
from test_train import TINY, read_history, run_train, wait_for


def start_train(demo_root, out, *extra) -> subprocess.Popen:
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--data-root", demo_root, "--output-dir", str(out), *TINY, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def lock_text(out, run) -> str:
    path = os.path.join(out, run, checkpoints.LOCK_FILE)
    return open(path).read() if os.path.isfile(path) else ""


def assert_refused_by(result, holder_pid: int) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "is being trained by another train.py" in result.stderr and f"PID {holder_pid} " in result.stderr
    assert "--resume" in result.stderr and "Traceback" not in result.stdout + result.stderr


def test_a_run_still_training_refuses_a_new_run_and_a_resume_of_it(demo_root, tmp_path):
    first = start_train(demo_root, tmp_path, "--run-name", "busy", "--epochs", "4")
    try:
        assert wait_for(lambda: f"PID {first.pid} " in lock_text(tmp_path, "busy"), seconds=120)
        os.kill(first.pid, signal.SIGSTOP)  # held where it is, lock and all, while the others try
        assert_refused_by(run_train(demo_root, tmp_path, "--run-name", "busy", "--epochs", "6", check=False), first.pid)
        os.kill(first.pid, signal.SIGCONT)
        assert wait_for((tmp_path / "busy" / "last.pt").exists, seconds=120)
        os.kill(first.pid, signal.SIGSTOP)
        assert_refused_by(run_train(demo_root, tmp_path, "--run-name", "busy", "--resume", check=False), first.pid)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, out + err
    assert [int(r["epoch"]) for r in read_history(tmp_path / "busy" / "history.csv")] == [1, 2, 3, 4]


HOLDER = ("import os, sys, time, checkpoints\n"
          "checkpoints.lock_run_folder(sys.argv[1], 'x')\n"
          "child = os.fork()  # as a DataLoader forks its workers: the child must not keep the lock\n"
          "if child:\n"
          "    print('held', child, flush=True)\n"
          "time.sleep(120)\n")


def test_the_lock_names_its_holder_and_dies_with_it_even_under_kill_9(trained_runs, demo_root, tmp_path):
    shutil.copytree(trained_runs[0], tmp_path / "a")  # a finished run of 2 epochs
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "a")], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    child = None
    try:
        word, child = holder.stdout.readline().split()
        assert word == "held"
        with pytest.raises(checkpoints.CheckpointError, match=f"PID {holder.pid} on .*go on with\n  python train.py --resume"):
            checkpoints.lock_run_folder(str(tmp_path / "a"), "python train.py --resume")
        holder.kill()  # SIGKILL: no handler runs; its forked child lives on
        holder.wait()
        result = run_train(demo_root, tmp_path, "--run-name", "a", "--resume", "--epochs", "2")  # at once, nothing deleted
        assert f"resumed {tmp_path / 'a' / 'last.pt'} after epoch 2" in result.stdout and "done:" in result.stdout
    finally:
        holder.kill()
        if child is not None and int(child) > 0:
            os.kill(int(child), signal.SIGKILL)


def test_unlock_takes_away_what_a_run_that_wrote_nothing_left(tmp_path):
    (tmp_path / "run").mkdir()
    lock = checkpoints.lock_run_folder(str(tmp_path / "run"), "x")
    assert f"PID {os.getpid()} " in lock_text(tmp_path, "run")
    checkpoints.unlock_run_folder(lock)
    assert os.listdir(tmp_path / "run") == []  # the lock file goes, the folder it found stays
    lock = checkpoints.lock_run_folder(str(tmp_path / "new" / "run"), "x")
    checkpoints.unlock_run_folder(lock)
    assert not (tmp_path / "new").exists()  # and the folders made for it go too


# ----------------------------------------------------------------------------------------------------------
# An image that cannot be read, met by a DataLoader worker


def broken_copy(demo_root, out) -> str:
    """A copy of the demo dataset (its images copied, so that they can be broken)."""
    root = str(out / "data")
    shutil.copytree(demo_root, root)
    return root


def truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(100)


def test_an_unreadable_image_in_a_worker_raises_the_workers_own_error(demo_root, tmp_path):
    root = broken_copy(demo_root, tmp_path)
    cells = RetinopathyLoader(root, "valid", preprocess=Preprocess(crop=48), output="uint8")
    truncate(cells.img_name[5])
    loader = batching.make_loader(cells, batching.EpochBatchSampler(len(cells), 4, shuffle=False), 1, torch.device("cpu"))
    with pytest.raises(DataError) as e:
        list(loader)
    assert str(e.value).startswith(f"{cells.img_name[5]}: cannot read image") and "Traceback" not in str(e.value)


def test_evaluate_names_an_unreadable_image_its_workers_met(trained_runs, demo_root, tmp_path):
    root = broken_copy(demo_root, tmp_path)
    broken = RetinopathyLoader(root, "valid").img_name[3]
    truncate(broken)
    result = run_script("evaluate.py", "--checkpoint", os.path.join(trained_runs[0], "best.pt"), "--data-root", root,
                        "--out-dir", str(tmp_path / "results"), "--device", "cpu", "--workers", "1")
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: {broken}: cannot read image") and result.stderr.count("\n") == 1
    assert "--resume" not in result.stderr and not (tmp_path / "results").exists()


def test_an_image_broken_during_training_stops_the_run_with_how_to_go_on(demo_root, tmp_path):
    root = broken_copy(demo_root, tmp_path)
    run = start_train(root, tmp_path, "--run-name", "broken", "--epochs", "5", "--workers", "2")
    assert wait_for((tmp_path / "broken" / "history.csv").exists, seconds=240)
    os.kill(run.pid, signal.SIGSTOP)
    for path in RetinopathyLoader(root, "train").img_name:  # every one: the workers may hold the next epoch decoded already
        truncate(path)
    os.kill(run.pid, signal.SIGCONT)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 1, out + err
    assert "Traceback" not in out + err and "cannot read image" in err and os.path.join(root, "new_dataset", "train") in err
    saved = checkpoints.load_checkpoint(str(tmp_path / "broken" / "last.pt"))["epoch"]
    assert 1 <= saved < 5 and f"holds epoch {saved}, the last one saved" in err
    assert f"python train.py --run-name broken --output-dir {tmp_path} --resume" in err


# ----------------------------------------------------------------------------------------------------------
# Out of GPU memory


OOM = ("import runpy, sys, torch, resnet\n"
       "def forward(self, x):\n"
       "    raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')\n"
       "resnet.ResNet.forward = forward\n"
       "sys.argv = ['train.py', *sys.argv[1:]]\n"
       "runpy.run_path('train.py', run_name='__main__')\n")


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_out_of_memory_in_training_says_what_to_try_and_keeps_last_pt(trained_runs, demo_root, tmp_path):
    shutil.copytree(trained_runs[0], tmp_path / "a")
    before = sha256(tmp_path / "a" / "last.pt")
    cmd = [sys.executable, "-c", OOM, "--output-dir", str(tmp_path), "--run-name", "a", "--resume", "--epochs", "3",
           "--device", "cpu", "--workers", "0"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "out of GPU memory with --batch-size 8 and --cache none. Try --batch-size 4" in result.stderr
    assert f"holds epoch 2, the last one saved. Go on with\n  python train.py --run-name a --output-dir {tmp_path} --resume" in result.stderr
    assert sha256(tmp_path / "a" / "last.pt") == before
    assert checkpoints.load_checkpoint(str(tmp_path / "a" / "last.pt"))["epoch"] == 2


@pytest.mark.parametrize("script", ["evaluate.py", "predict.py"])
def test_out_of_memory_in_scoring_says_what_to_try(trained_runs, tmp_path, monkeypatch, script):
    import resnet

    def forward(self, x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(resnet.ResNet, "forward", forward)
    out = ["--out-dir", str(tmp_path)] if script == "evaluate.py" else ["--output", str(tmp_path / "sub.csv")]
    result = run_script(script, "--checkpoint", os.path.join(trained_runs[0], "best.pt"), *out, "--device", "cpu",
                        "--workers", "0", "--batch-size", "16")
    assert result.returncode == 1
    assert result.stderr.startswith("error: out of GPU memory with --batch-size 16. Try --batch-size 8")
    assert "--resume" not in result.stderr and os.listdir(tmp_path) == []
