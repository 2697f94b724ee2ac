import argparse
import csv
import errno
import os
import platform
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch

import batching
import checkpoints
import devices
import files
import train
from conftest import ROOT, run_script, train_run
from resnet import build_model

TINY = ["--image-size", "32", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--print-freq", "2"]


def run_train(demo_root, out, *extra, check=True):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--data-root", demo_root, "--output-dir", str(out), *TINY, *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def wait_for(condition, seconds=60):
    """condition(), polled until it holds or the time is up."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def read_history(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def weights(path):
    return checkpoints.load_checkpoint(path)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_same_history(a, b):
    timing = {"seconds", "images_per_s"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in a] == [{k: v for k, v in r.items() if k not in timing} for r in b]


def test_end_to_end_run_writes_every_run_file(trained_runs):
    run = trained_runs[0]  # 2 epochs
    with open(run + ".stdout") as f:
        stdout = f.read()
    assert sorted(os.listdir(run)) == ["args.json", "best.pt", "history.csv", "last.pt", "train.lock"]
    assert "device cpu" in stdout and "48 train (33 ALL, 15 hem), 16 valid" in stdout
    assert "python evaluate.py --checkpoint" in stdout
    history = read_history(os.path.join(run, "history.csv"))
    assert [int(r["epoch"]) for r in history] == [1, 2]
    assert list(history[0]) == ["epoch", "lr", "train_loss", "train_acc", "valid_loss", "valid_acc", "valid_f1", "seconds", "images_per_s"]

    checkpoint = torch.load(os.path.join(run, "last.pt"), map_location="cpu", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "scaler", "ema", "epoch", "best_metric", "history", "rng", "model_name",
                "num_classes", "preprocess", "args"):
        assert key in checkpoint
    assert checkpoint["epoch"] == 2 and checkpoint["model_name"] == "resnet18" and checkpoint["num_classes"] == 2
    assert checkpoint["preprocess"]["size"] == 32 and checkpoint["preprocess"]["crop"] == 350
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in checkpoint["model"])
    best = torch.load(os.path.join(run, "best.pt"), map_location="cpu", weights_only=True)
    assert best["best_metric"] == max(float(r["valid_acc"]) for r in history)

    model, preprocess = checkpoints.model_from_checkpoint(checkpoint, torch.device("cpu"))
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 2) and preprocess.size == 32


def test_a_killed_run_resumes_and_a_finished_run_goes_on_as_one_straight_run_would(demo_root, tmp_path):
    # MixUp and CutMix draw from torch's global generator, reseeded for every batch; the step schedule does not
    # depend on --epochs, so a finished run can be given more and still follow the straight run's schedule.
    flags = ["--deterministic", "--seed", "3", "--scheduler", "step", "--lr-step", "2", "--mixup-alpha", "0.4", "--cutmix-alpha", "1"]
    run_train(demo_root, tmp_path, "--epochs", "4", *flags, "--run-name", "straight")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--data-root", demo_root, "--output-dir", str(tmp_path), *TINY,
           "--epochs", "3", *flags, "--run-name", "killed"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history = tmp_path / "killed" / "history.csv"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if history.exists() and len(read_history(history)) >= 1:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    done = len(read_history(history))
    assert done < 3
    result = run_train(demo_root, tmp_path, "--run-name", "killed", "--resume")
    assert f"resumed {tmp_path / 'killed' / 'last.pt'} after epoch {done}" in result.stdout
    assert len(read_history(history)) == 3
    run_train(demo_root, tmp_path, "--run-name", "killed", "--resume", "--epochs", "4")
    straight, killed = (checkpoints.load_checkpoint(str(tmp_path / run / "last.pt")) for run in ("straight", "killed"))
    assert_same_weights(straight["model"], killed["model"])
    assert_same_weights(straight["ema"], killed["ema"])
    assert_same_history(read_history(tmp_path / "straight" / "history.csv"), read_history(history))


def test_a_run_is_the_same_with_any_number_of_workers(trained_runs, demo_root, tmp_path):
    here = trained_runs[0]  # --workers 0: decoded in the training process
    workers = train_run(demo_root, str(tmp_path), "workers", "--workers", "2")  # the same flags otherwise
    assert_same_history(read_history(os.path.join(here, "history.csv")), read_history(os.path.join(workers, "history.csv")))
    assert_same_weights(weights(os.path.join(here, "last.pt")), weights(os.path.join(workers, "last.pt")))


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_to_the_process_group_stops_cleanly_and_says_how_to_resume(demo_root, tmp_path, sig, code):
    # Ctrl-C in a terminal signals every process of the group, DataLoader workers included.
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--data-root", demo_root, "--output-dir", str(tmp_path), *TINY,
           "--workers", "2", "--epochs", "50", "--run-name", "term"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    history = tmp_path / "term" / "history.csv"
    wait_for(history.exists, seconds=240)
    os.killpg(proc.pid, sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, out
    assert f"stopped by {sig.name}" in out and "--resume" in out and "Traceback" not in out
    last = checkpoints.load_checkpoint(str(tmp_path / "term" / "last.pt"))
    assert last["epoch"] == len(read_history(history)) >= 1


def test_a_signal_in_the_first_epoch_says_to_start_again_not_to_resume(demo_root, tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--data-root", demo_root, "--output-dir", str(tmp_path), *TINY,
           "--epochs", "50", "--run-name", "early"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    for line in proc.stdout:  # the first progress line: inside the first epoch
        lines.append(line)
        if "epoch 1 step" in line:
            break
    os.killpg(proc.pid, signal.SIGINT)
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out
    assert "stopped by SIGINT during the first epoch" in out and "--resume" not in out and "Traceback" not in out
    assert not (tmp_path / "early" / "last.pt").exists()
    run_train(demo_root, tmp_path, "--epochs", "1", "--run-name", "early")  # the same run starts again


def refused(demo_root, out, *extra):
    """train.py with flags it refuses while reading them, before any work: run in this process (run_script)."""
    return run_script("train.py", "--data-root", demo_root, "--output-dir", str(out), *TINY, *extra)


def test_bad_resume_inputs_get_clear_errors(trained_runs, demo_root, tmp_path):
    result = run_train(demo_root, tmp_path, "--run-name", "nothing", "--resume", check=False)
    assert result.returncode == 1 and "no such checkpoint" in result.stderr

    shutil.copytree(trained_runs[0], tmp_path / "r18")  # a finished resnet18 run
    before = {f: (tmp_path / "r18" / f).read_bytes() for f in ("last.pt", "best.pt", "args.json", "history.csv")}
    result = run_train(demo_root, tmp_path, "--epochs", "1", "--run-name", "r18", "--lr", "0.1", check=False)
    assert result.returncode == 1 and "r18 holds an earlier run" in result.stderr and "--run-name r18" in result.stderr
    assert {f: (tmp_path / "r18" / f).read_bytes() for f in before} == before
    result = refused(demo_root, tmp_path, "--model", "resnet50", "--run-name", "r18", "--resume")
    assert result.returncode == 1 and "is a resnet18 run, not resnet50" in result.stderr
    result = refused(demo_root, tmp_path, "--run-name", "r18", "--resume", "--optimizer", "adam")
    assert result.returncode == 1 and "--optimizer sgd" in result.stderr and "cannot change on resume" in result.stderr

    partial = torch.load(tmp_path / "r18" / "last.pt", weights_only=True)
    del partial["optimizer"]
    torch.save(partial, tmp_path / "partial.pt")
    result = refused(demo_root, tmp_path, "--resume", str(tmp_path / "partial.pt"))
    assert result.returncode == 1 and "lacks optimizer: it can be evaluated, not resumed" in result.stderr

    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "bare.pt")
    result = refused(demo_root, tmp_path, "--resume", str(tmp_path / "bare.pt"))
    assert result.returncode == 1 and "not a checkpoint written by train.py" in result.stderr
    (tmp_path / "broken.pt").write_bytes(b"\x00" * 100)
    result = refused(demo_root, tmp_path, "--resume", str(tmp_path / "broken.pt"))
    assert result.returncode == 1 and "broken.pt: not a readable PyTorch checkpoint" in result.stderr


def test_train_set_of_one_class_is_refused_before_anything_is_written(demo_root, tmp_path):
    data = tmp_path / "one_class"
    data.mkdir()
    for split in ("train", "valid"):  # the demo's images, by absolute path; train keeps its ALL cells only
        with open(os.path.join(demo_root, f"{split}.csv")) as f:
            rows = [(os.path.join(demo_root, r["Path"]), r["label"]) for r in csv.DictReader(f)]
        with open(data / f"{split}.csv", "w") as f:
            f.write("Path,label\n" + "".join(f"{p},{y}\n" for p, y in rows if split == "valid" or y == "1"))
    result = run_train(str(data), tmp_path / "runs", "--epochs", "1", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{data / 'train.csv'}: no image labelled 0 (hem); training needs both classes" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(trained_runs, demo_root, tmp_path):
    shutil.copytree(trained_runs[1], tmp_path / "nan")  # finished after 2 epochs
    before = checkpoints.load_checkpoint(str(tmp_path / "nan" / "last.pt"))
    result = run_train(demo_root, tmp_path, "--epochs", "3", "--resume", "--lr", "1e30", "--run-name", "nan", check=False)
    assert "peak learning rate changed from 0.05 to 1e+30" in result.stdout
    assert result.returncode == 1 and "loss became nan" in result.stdout.lower()
    assert "keeps the last good epoch" in result.stdout
    after = checkpoints.load_checkpoint(str(tmp_path / "nan" / "last.pt"))
    assert after["epoch"] == 2
    assert_same_weights(before["model"], after["model"])


def test_two_process_torchrun_on_cpu(demo_root, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           os.path.join(ROOT, "train.py"), "--data-root", demo_root, "--output-dir", str(tmp_path), *TINY,
           "--epochs", "2", "--run-name", "ddp"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("epoch 2/2  lr") == 1  # only rank 0 prints
    assert "x 2 process(es)" in result.stdout and "3 steps of 8 x 2 per epoch" in result.stdout
    checkpoint = checkpoints.load_checkpoint(str(tmp_path / "ddp" / "last.pt"))
    assert checkpoint["epoch"] == 2 and not any(k.startswith("module.") for k in checkpoint["model"])
    # valid accuracy is a share of exactly the 16 valid images
    assert all(round(float(r["valid_acc"]) * 16, 4) == round(float(r["valid_acc"]) * 16) for r in read_history(tmp_path / "ddp" / "history.csv"))


# ----------------------------------------------------------------------------------------------------------
# Atomic saves


def test_save_killed_halfway_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    checkpoints.save_checkpoint({"model": {"w": torch.ones(3)}, "epoch": 1}, str(path))
    script = (
        "import os, signal, sys, torch\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import files\n"
        "def write(f):\n"
        "    f.write(b'x' * 1000)\n"
        "    f.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        f"files.atomic_write({str(path)!r}, write)\n"
    )
    result = subprocess.run([sys.executable, "-c", script])
    assert result.returncode == -signal.SIGKILL
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 1 and torch.equal(loaded["model"]["w"], torch.ones(3))


def test_full_disk_says_so_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "best.pt"
    checkpoints.save_checkpoint({"epoch": 1}, str(path))

    def full(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(files.DiskFullError, match=r"disk full: .*best.pt needs [\d.]+ MB, and [\d,.]+ MB is free there; "
                                                        "the previous version is intact"):
        checkpoints.save_checkpoint({"epoch": 2}, str(path))
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert os.listdir(tmp_path) == ["best.pt"]


def test_torchs_own_error_on_a_full_disk_is_called_a_full_disk(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoints.save_checkpoint({"epoch": 1}, str(path))

    def zip_writer_fails(obj, f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 70674176 vs 70674072")

    monkeypatch.setattr(torch, "save", zip_writer_fails)
    monkeypatch.setattr(files, "free_space", lambda folder: 4096)  # the disk is full by now
    with pytest.raises(files.DiskFullError, match="^disk full: .*last.pt did not fit, and 0.00 MB is free there; the previous version is intact"):
        files.atomic_write(str(path), lambda f: torch.save({}, f))
    monkeypatch.setattr(files, "free_space", lambda folder: 10**12)  # room enough: a real error, not a full disk
    with pytest.raises(RuntimeError, match="unexpected pos"):
        files.atomic_write(str(path), lambda f: torch.save({}, f))
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["epoch"] == 1 and os.listdir(tmp_path) == ["last.pt"]


def test_a_write_that_cannot_fit_is_refused_before_it_starts(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "free_space", lambda folder: 10_000_000)
    with pytest.raises(files.DiskFullError, match="sub.csv needs 25 MB, and 10 MB is free there; nothing was written"):
        files.atomic_write(str(tmp_path / "sub.csv"), lambda f: f.write(b"x"), size=25_000_000)
    assert os.listdir(tmp_path) == []


def test_free_space_check_stops_with_both_numbers(tmp_path, monkeypatch):
    messages = []
    monkeypatch.setattr(train, "free_space", lambda folder: 150_000_000)
    with pytest.raises(files.DiskFullError, match=r"needs 180 MB, and 150 MB is free there; last.pt \(134 MB\) and best.pt \(46 MB\)"):
        train.check_free_space(str(tmp_path), (134_000_000, 46_000_000), messages.append)
    train.check_free_space(str(tmp_path), (100_000_000, 40_000_000), messages.append)  # fits, but not a third copy
    assert len(messages) == 1 and "the run will stop there" in messages[0]
    with open(tmp_path / "last.pt", "wb") as f:  # a resumed run's own files count as held (a sparse file of 100 MB)
        f.truncate(100_000_000)
    train.check_free_space(str(tmp_path), (100_000_000, 40_000_000), messages.append)
    assert len(messages) == 1


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_new_files_get_the_permissions_of_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        checkpoints.save_checkpoint({"epoch": 1}, str(tmp_path / "last.pt"))
        files.write_csv_atomic(str(tmp_path / "sub.csv"), ["ID", "label"], [["a", 1]])
    finally:
        os.umask(old)
    for name in ("last.pt", "sub.csv"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~umask


def test_checkpoint_sizes_are_what_train_writes(trained_runs):
    for run in trained_runs:
        checkpoint = torch.load(os.path.join(run, "last.pt"), weights_only=True)
        args = argparse.Namespace(**checkpoint["args"])
        model = build_model(args.model, num_classes=2)
        last, best = train.checkpoint_sizes(model, checkpoint["ema"] and object(), args)
        assert os.path.getsize(os.path.join(run, "last.pt")) == pytest.approx(last, rel=0.03)
        assert os.path.getsize(os.path.join(run, "best.pt")) == pytest.approx(best, rel=0.03)
        best_pt = torch.load(os.path.join(run, "best.pt"), weights_only=True)
        assert "optimizer" not in best_pt and "rng" not in best_pt
        if best_pt["epoch"] == checkpoint["epoch"]:  # the weights it validated: the EMA's where the run keeps one
            validated = checkpoint["ema"] or checkpoint["model"]
            assert all(torch.equal(v, best_pt["model"][k]) for k, v in validated.items())


def mounted_tmpfs(path, megabytes: int) -> bool:
    os.makedirs(path, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)], capture_output=True).returncode == 0


@pytest.mark.parametrize("failing", ["best.pt", "last.pt"])
def test_a_failed_save_never_leaves_last_pt_naming_a_best_epoch_that_best_pt_lacks(tmp_path, monkeypatch, failing):
    def epoch(n):
        return {"model": {"w": torch.full((2,), float(n))}, "ema": None, "epoch": n, "best_epoch": n, "best_metric": n / 10,
                "metric": "acc", "history": [], "model_name": "resnet18", "num_classes": 2, "preprocess": {}, "augment": {},
                "args": {}, "format_version": 1}

    train.save_epoch(epoch(1), True, [], str(tmp_path))
    save = checkpoints.save_checkpoint

    def full_disk(checkpoint, path):
        if os.path.basename(path) == failing:
            raise files.DiskFullError(path, 10**9, 0, "the previous version is intact")
        save(checkpoint, path)

    monkeypatch.setattr(train, "save_checkpoint", full_disk)
    with pytest.raises(files.DiskFullError):
        train.save_epoch(epoch(2), True, [], str(tmp_path))
    last, best = (torch.load(tmp_path / name, weights_only=True) for name in ("last.pt", "best.pt"))
    assert last["epoch"] == 1 and last["best_epoch"] <= best["epoch"]


def test_training_into_a_disk_that_fills_up_stops_with_a_message(demo_root, tmp_path):
    disk = tmp_path / "disk"
    if not mounted_tmpfs(disk, 200):
        pytest.skip("cannot mount a tmpfs here (needs root); the mocked full disks above stand in")
    try:
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--data-root", demo_root, "--output-dir", str(disk), "--run-name", "demo",
               "--image-size", "32", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--epochs", "3"]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "Traceback" not in result.stderr and "disk full: " in result.stderr
        assert "holds epoch 1, the last one saved" in result.stderr and "--resume" in result.stderr
        assert "the run will stop there" in result.stdout  # said before the first epoch
        run = disk / "demo"
        assert sorted(os.listdir(run)) == ["args.json", "best.pt", "history.csv", "last.pt", "train.lock"]
        assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1
    finally:
        subprocess.run(["umount", str(disk)])


# ----------------------------------------------------------------------------------------------------------
# Pieces


def test_recipes_fill_only_unset_flags():
    args = train.parse_args(["--model", "resnet152", "--recipe", "seed", "--lr", "0.01"])
    assert (args.batch_size, args.epochs, args.lr, args.optimizer, args.label_smoothing) == (32, 31, 0.01, "sgd", 0.0)
    args = train.parse_args(["--demo"])
    assert (args.model, args.image_size, args.run_name, args.data_root) == ("resnet18", 64, "demo", os.path.join("data", "demo"))


def test_every_flag_has_help():
    for action in train.get_args_parser()._actions:
        assert action.help, action.dest


@pytest.mark.parametrize("flags, message", [
    (["--workers", "-1"], "argument --workers: -1 is not a whole number of at least 0"),
    (["--batch-size", "0"], "argument --batch-size: 0 is not a whole number of at least 1"),
    (["--print-freq", "0"], "argument --print-freq: 0 is not a whole number of at least 1"),
    (["--hue-jitter", "0.6"], "argument --hue-jitter: 0.6 is not between 0 and 0.5"),
    (["--mixup-alpha", "-1"], "argument --mixup-alpha: -1.0 is not a number of at least 0"),
])
def test_values_out_of_range_are_refused_by_the_flag_parser(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(flags)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert train.parse_args(["--workers", "0", "--crop", "0"]).workers == 0


def test_epoch_sampler_shards_without_overlap_and_depends_only_on_epoch():
    a = batching.EpochBatchSampler(10, 3, shuffle=True, seed=1, rank=0, world_size=2)
    b = batching.EpochBatchSampler(10, 3, shuffle=True, seed=1, rank=1, world_size=2)
    a.set_epoch(5)
    b.set_epoch(5)
    assert sorted(a.indices() + b.indices()) == list(range(10))
    again = batching.EpochBatchSampler(10, 3, shuffle=True, seed=1, rank=0, world_size=2)
    again.set_epoch(5)
    assert list(again) == list(a)
    valid = [batching.EpochBatchSampler(7, 2, shuffle=False, rank=r, world_size=3).indices() for r in range(3)]
    assert sorted(sum(valid, [])) == list(range(7))


@pytest.mark.parametrize("balanced", [False, True])
def test_every_rank_takes_as_many_train_batches(balanced):
    # Under DDP a rank with one batch more than the others waits for them at its all-reduce for ever.
    for n in range(1, 60):
        counts = set()
        for rank in range(3):
            sampler = batching.EpochBatchSampler(n, 4, shuffle=True, seed=2, rank=rank, world_size=3, drop_last=True)
            if balanced:
                sampler = batching.BalancedBatchSampler([i % 2 for i in range(n)], sampler)
            counts.add((len(sampler), len(list(sampler))))
        assert len(counts) == 1, (n, counts)


@pytest.mark.parametrize("mode", ["sampler", "subject", "subject-only"])
def test_balanced_sampler_draws_each_class_and_each_patient_as_often_as_it_should(mode):
    # ALL: patient 51 with 90 cells, patient 2 with 9; hem: H10 with 40, H14 with 10.
    subjects = ["51"] * 90 + ["2"] * 9 + ["H10"] * 40 + ["H14"] * 10
    labels = [1] * 99 + [0] * 50
    base = batching.EpochBatchSampler(len(labels), 16, shuffle=True, seed=3, drop_last=True)
    by_subject, keep_mix = mode != "sampler", mode == "subject-only"
    sampler = batching.BalancedBatchSampler(labels, base, subjects if by_subject else None, keep_class_mix=keep_mix)
    drawn = []
    for epoch in range(200):
        sampler.set_epoch(epoch)
        drawn += [subjects[i] for batch in sampler for i in batch]
    share = {s: drawn.count(s) / len(drawn) for s in set(subjects)}
    all_share, hem_share = (99 / 149, 50 / 149) if keep_mix else (0.5, 0.5)
    if by_subject:  # each class's share split between its patients as the square roots of their cell counts
        expected = {"51": all_share * 90**0.5 / (90**0.5 + 9**0.5), "2": all_share * 9**0.5 / (90**0.5 + 9**0.5),
                    "H10": hem_share * 40**0.5 / (40**0.5 + 10**0.5), "H14": hem_share * 10**0.5 / (40**0.5 + 10**0.5)}
    else:  # each class half, its patients as their cell counts
        expected = {"51": 0.5 * 90 / 99, "2": 0.5 * 9 / 99, "H10": 0.5 * 40 / 50, "H14": 0.5 * 10 / 50}
    for s in subjects:
        assert share[s] == pytest.approx(expected[s], abs=0.01), s
    again = batching.BalancedBatchSampler(labels, base, subjects if by_subject else None, keep_class_mix=keep_mix)
    again.set_epoch(7)
    sampler.set_epoch(7)
    assert list(again) == list(sampler)


@pytest.mark.parametrize("mode", ["subject", "subject-only"])
def test_subject_balance_needs_release_file_names(demo_root, tmp_path, mode):
    result = run_train(demo_root, tmp_path / "runs", "--epochs", "1", "--class-balance", mode, check=False)
    assert result.returncode != 0
    assert "train.csv" in result.stderr and "--import-cnmc" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


class FetchLog(torch.utils.data.Dataset):
    """Tiny images whose workers append each index they fetch to a file."""

    def __init__(self, n, log):
        self.n, self.log = n, log

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()} {i}\n")
        return torch.full((2, 2, 3), i, dtype=torch.uint8), i % 2


def fetched_by_workers(log) -> list[str]:
    """The items of a log of "pid item" lines that a process other than this one (a loader's worker) fetched."""
    lines = [line.split(" ", 1) for line in log.read_text().splitlines()] if log.exists() else []
    return [item for pid, item in lines if int(pid) != os.getpid()]


def test_epoch_stream_gives_each_epoch_in_order_and_decodes_the_next_one_ahead(tmp_path):
    log = tmp_path / "fetched.txt"
    sampler = batching.EpochBatchSampler(8, 3, shuffle=True, seed=2, drop_last=True)
    sampler.set_epoch(1)  # a run resumed after its first epoch
    loader = batching.make_loader(FetchLog(8, log), batching.RunBatchSampler(sampler, 4), workers=1, device=torch.device("cpu"))
    assert len(loader) == 3 * 2  # epochs 1 to 3, 2 batches each
    stream = batching.EpochStream(loader, len(sampler))
    first = [batch[0].tolist() for batch in stream]
    assert len(first) == len(stream) == 2
    next_epoch_fetched = wait_for(lambda: len(fetched_by_workers(log)) > 6)  # 2 batches of 3 taken
    assert next_epoch_fetched, "the worker waited for the next epoch to be asked for"
    later = [[batch[0].tolist() for batch in stream] for _ in range(3)]
    assert later[2] == []  # the run ends after epoch 3 (0-based)
    for epoch, batches in zip((1, 2, 3), [first, *later[:2]]):
        expected = batching.EpochBatchSampler(8, 3, shuffle=True, seed=2, drop_last=True)
        expected.set_epoch(epoch)
        assert batches == list(expected)


def test_make_loader_pins_batches_for_a_gpu_only(demo_root):
    from dataloader import Preprocess, RetinopathyLoader

    cells = RetinopathyLoader(demo_root, "valid", preprocess=Preprocess(crop=48), output="uint8")
    sampler = batching.EpochBatchSampler(len(cells), 4, shuffle=False)
    assert batching.make_loader(cells, sampler, 2, torch.device("cuda")).loader.pin_memory  # built, not iterated: no GPU needed
    loader = batching.make_loader(cells, sampler, 2, torch.device("cpu"))
    assert not loader.loader.pin_memory and loader.loader.persistent_workers
    batches = list(loader)
    assert torch.equal(torch.cat([b[0] for b in batches]), torch.arange(len(cells)))
    torch.testing.assert_close(batches[0][1], torch.stack([cells[i][0] for i in range(4)]), rtol=0, atol=0)


def test_the_valid_set_is_decoded_while_the_epoch_trains(demo_root, tmp_path, monkeypatch):
    import dataloader

    log, decode = tmp_path / "decoded.txt", dataloader.decode_image
    valid_paths = set(dataloader.getData("valid", demo_root)[0])

    def logged_decode(path, crop, size):  # the forked workers inherit it
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {path}\n")
        return decode(path, crop, size)

    def valid_decoded():  # by the valid loader's workers
        return bool(valid_paths & set(fetched_by_workers(log)))

    during_training = []

    def train_one_epoch(*args, **kwargs):  # instead of training: wait for the valid workers, then end the run
        during_training.append(wait_for(valid_decoded))

    monkeypatch.setattr(dataloader, "decode_image", logged_decode)
    monkeypatch.setattr(train, "train_one_epoch", train_one_epoch)
    monkeypatch.setattr(train.signal, "signal", lambda *a: None)  # leave pytest's own Ctrl-C handler alone
    argv = ["--data-root", demo_root, "--output-dir", str(tmp_path), *TINY, "--workers", "1", "--epochs", "1"]
    assert train.main(train.parse_args(argv)) == 0
    assert during_training == [True]


FREED_MEMORY_PROBE = """
import resource, sys, torch
sys.path.insert(0, {root!r})
import devices

def faults_per_64_mb_block(cycles=16, counted=4):
    for i in range(cycles):  # the heap may take a few blocks to settle
        if i == cycles - counted:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(16 << 20).fill_(1)  # 64 MB, past the 32 MB beyond which glibc maps every block afresh
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // counted

print(faults_per_64_mb_block())
devices.keep_freed_memory(torch.device("meta"))  # any device but the CPU: nothing changes
print(faults_per_64_mb_block())
devices.keep_freed_memory(torch.device("cpu"))
print(faults_per_64_mb_block())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="only glibc's malloc is told to keep freed memory")
def test_keep_freed_memory_reuses_big_blocks_on_the_cpu_only():
    # In a child process: malloc's settings last for the life of the process.
    result = subprocess.run([sys.executable, "-c", FREED_MEMORY_PROBE.format(root=ROOT)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    default, other_device, cpu = map(int, result.stdout.split())
    assert min(default, other_device) >= 32  # each block came fresh from the system: a fault per page, even at 2 MB pages
    assert cpu < min(default, other_device) / 10  # freed blocks were reused in place


def test_lr_schedule_warms_up_then_decays_to_zero():
    args = train.parse_args(["--epochs", "10", "--warmup-epochs", "2"])
    f = [train.lr_factor(s, 5, args) for s in range(50)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[-1] < 0.01
    assert all(x >= y for x, y in zip(f[10:], f[11:]))


@pytest.mark.parametrize("weight", [None, torch.tensor([2.5, 0.625])])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_matches_pytorchs_cross_entropy(weight, smoothing):
    torch.manual_seed(0)
    logits = torch.randn(16, 2, requires_grad=True)
    target = torch.randint(0, 2, (16,))
    ours = train.CrossEntropy(weight, smoothing)(logits, target)
    theirs = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=smoothing)(logits, target)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(*(torch.autograd.grad(loss, logits)[0] for loss in (ours, theirs)))


@pytest.mark.parametrize("weight", [None, torch.tensor([2.5, 0.625])])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_of_mixed_labels_is_pytorchs_divided_by_their_weight(weight, smoothing):
    torch.manual_seed(0)
    logits, target = torch.randn(16, 2), torch.randint(0, 2, (16,))
    loss = train.CrossEntropy(weight, smoothing)
    torch.testing.assert_close(loss(logits, torch.nn.functional.one_hot(target, 2).float()), loss(logits, target))
    mixed = torch.distributions.Dirichlet(torch.ones(2)).sample((16,))
    total = torch.nn.functional.cross_entropy(logits, mixed, weight=weight, label_smoothing=smoothing, reduction="sum")
    torch.testing.assert_close(loss(logits, mixed), total / (16 if weight is None else (mixed @ weight).sum()))


def test_mixup_blends_each_image_with_the_next_and_their_labels_alike():
    args = train.parse_args(["--mixup-alpha", "0.4"])
    x, y = torch.rand(8, 3, 16, 16), torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    torch.manual_seed(1)
    mixed, target = train.batch_mixing(args)(x, y)
    lam = target[0, 0].item()  # image 0 (hem) is blended with image 7 (ALL)
    assert 0 < lam < 1
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.roll(1, 0))
    one_hot = torch.nn.functional.one_hot(y, 2).float()
    torch.testing.assert_close(target, lam * one_hot + (1 - lam) * one_hot.roll(1, 0))
    assert train.batch_mixing(train.parse_args([])) is None


def test_ema_tracks_weights_and_batchnorm_statistics():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = train.EMA(model, decay=0.5)
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model(torch.randn(8, 2))  # training mode: BatchNorm's running statistics and batch count move
    start, start_mean = ema.module[0].weight.clone(), ema.module[1].running_mean.clone()
    ema.update()
    d = min(0.5, 2 / 11)
    torch.testing.assert_close(ema.module[0].weight, d * start + (1 - d) * model[0].weight)
    torch.testing.assert_close(ema.module[1].running_mean, d * start_mean + (1 - d) * model[1].running_mean)
    assert ema.module[1].num_batches_tracked == model[1].num_batches_tracked == 1

    other = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    model.load_state_dict(other.state_dict())  # as a resumed run does: in place, so the EMA still follows
    start = ema.module[0].weight.clone()
    ema.update()
    d = min(0.5, 3 / 12)
    torch.testing.assert_close(ema.module[0].weight, d * start + (1 - d) * other[0].weight)


def test_mixed_precision_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert devices.amp_dtype(cpu, "auto") is None and devices.amp_dtype(cpu, "bf16") is None
    assert devices.amp_dtype(cuda, "off") is None and devices.amp_dtype(cuda, "fp16") is torch.float16
    assert devices.amp_dtype(torch.device("mps"), "auto") is None


def test_compile_is_on_by_default_only_where_triton_serves_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla P100-PCIE-16GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 0))
    monkeypatch.setattr(train.importlib.util, "find_spec", lambda name: object() if name == "triton" else None)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    default, on, off = (train.parse_args(argv) for argv in ([], ["--compile"], ["--no-compile"]))
    with pytest.raises(SystemExit) as e:
        train.should_compile(on, cuda)
    assert "Tesla P100-PCIE-16GB is 6.0" in str(e.value.code) and "without --compile" in str(e.value.code)
    assert train.should_compile(default, cuda) is False and train.should_compile(off, cuda) is False

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert train.should_compile(default, cuda) is True and train.should_compile(on, cuda) is True
    assert train.should_compile(off, cuda) is False
    assert train.should_compile(default, cpu) is False and train.should_compile(on, cpu) is True

    monkeypatch.setattr(train.importlib.util, "find_spec", lambda name: None)  # Windows: no Triton
    assert train.should_compile(default, cuda) is False
    with pytest.raises(SystemExit, match="Triton"):
        train.should_compile(on, cuda)


def test_a_compiled_run_can_be_resumed_without_compiling(tmp_path):
    saved = vars(train.parse_args(["--compile", "--epochs", "3"]))
    checkpoint = {k: None for k in checkpoints.CHECKPOINT_KEYS + train.RESUME_KEYS} | {"model_name": "resnet18", "args": saved}
    torch.save(checkpoint, tmp_path / "last.pt")
    assert train.parse_args(["--resume", str(tmp_path / "last.pt")]).compile is True
    assert train.parse_args(["--resume", str(tmp_path / "last.pt"), "--no-compile"]).compile is False
    checkpoint["args"] = vars(train.parse_args(["--epochs", "3"]))  # compile left to the machine it resumes on
    torch.save(checkpoint, tmp_path / "last.pt")
    assert train.parse_args(["--resume", str(tmp_path / "last.pt")]).compile is None


def test_demo_makes_its_data_when_missing(tmp_path):
    # The full demo trains for minutes; one short epoch shows the data is made and training starts on it.
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--demo", "--data-root", str(tmp_path / "demo"), "--output-dir",
           str(tmp_path / "runs"), "--epochs", "1", "--image-size", "32", "--workers", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "making the synthetic demo dataset" in result.stdout and "600 train (408 ALL, 192 hem), 150 valid" in result.stdout
    assert (tmp_path / "runs" / "demo" / "best.pt").exists() and "python evaluate.py --checkpoint" in result.stdout


# ----------------------------------------------------------------------------------------------------------
# TensorBoard


def scalars(run: str, tag: str) -> tuple[list[tuple[int, float]], dict]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(run, "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)], events.Tags()


def test_tensorboard_logs_every_epoch_and_a_resume_goes_on_without_orphans(trained_runs, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    run = str(tmp_path / "tb")
    shutil.copytree(trained_runs[1], run)  # trained with --tensorboard
    points, tags = scalars(run, "valid/acc")
    assert [step for step, _ in points] == [1, 2]
    assert {"lr", "train/loss", "train/acc", "valid/loss", "valid/f1", "images_per_s"} <= set(tags["scalars"])
    assert tags["images"] == ["valid/confusion_matrix"]
    history = list(csv.DictReader(open(os.path.join(run, "history.csv"))))
    assert [round(v, 5) for _, v in points] == [round(float(r["valid_acc"]), 5) for r in history]
    orphan = SummaryWriter(os.path.join(run, "tensorboard"))  # a run stopped after logging epoch 3 but before saving it
    orphan.add_scalar("valid/acc", 99.0, 3)
    orphan.close()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--output-dir", str(tmp_path), "--run-name", "tb",
                             "--resume", "--epochs", "3"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    points, _ = scalars(run, "valid/acc")
    assert [step for step, _ in points] == [1, 2, 3] and 99.0 not in [v for _, v in points]
