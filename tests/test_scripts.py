"""evaluate.py, predict.py and plot.py on runs made by train.py."""
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

import files
from conftest import ROOT, run_script, shared_path


def run(script, *args, cwd=None):
    on_cpu = [] if script == "plot.py" else ["--device", "cpu", "--workers", "0"]
    return run_script(script, *args, *on_cpu, cwd=cwd)


def rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


# ----------------------------------------------------------------------------------------------------------
# evaluate.py


def test_evaluate_metrics_agree_with_sklearn_on_its_own_predictions(trained_runs, demo_root, tmp_path):
    result = run("evaluate.py", "--checkpoint", os.path.join(trained_runs[0], "best.pt"), "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    out = tmp_path / "a"
    assert sorted(os.listdir(out)) == ["confusion_matrix.png", "errors.png", "metrics.json", "predictions.csv", "roc.png"]
    for figure in ("confusion_matrix.png", "errors.png", "roc.png"):
        assert Image.open(out / figure).format == "PNG"
    m = json.loads((out / "metrics.json").read_text())
    table = rows(out / "predictions.csv")
    assert table[0] == ["path", "label", "pred", "prob_ALL"]
    names, labels = files.read_csv(os.path.join(demo_root, "valid.csv"), True)
    assert [r[0] for r in table[1:]] == names and [int(r[1]) for r in table[1:]] == labels  # CSV order, never shuffled
    y, pred, prob = (np.array([float(r[i]) for r in table[1:]]) for i in (1, 2, 3))
    assert np.array_equal(pred, prob >= 0.5)
    assert m["images"] == 16
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["weighted_f1"] == pytest.approx(skm.f1_score(y, pred, average="weighted"))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, prob), abs=1e-4)
    assert m["sensitivity_ALL"] == pytest.approx(skm.recall_score(y, pred, pos_label=1))
    assert m["specificity_ALL"] == pytest.approx(skm.recall_score(y, pred, pos_label=0))
    assert m["precision_hem"] == pytest.approx(skm.precision_score(y, pred, pos_label=0, zero_division=0))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    # the same numbers train.py recorded for that epoch
    with open(os.path.join(trained_runs[0], "history.csv")) as f:
        history = {int(r["epoch"]): r for r in csv.DictReader(f)}[m["epoch"]]
    assert m["accuracy"] == pytest.approx(float(history["valid_acc"]))
    assert m["loss"] == pytest.approx(float(history["valid_loss"]), rel=1e-4)
    assert "weighted F1" in result.stdout and "sensitivity (ALL)" in result.stdout


def test_evaluate_is_deterministic(trained_runs, tmp_path):
    for d in ("x", "y"):
        assert run("evaluate.py", "--checkpoint", os.path.join(trained_runs[0], "best.pt"), "--out-dir", str(tmp_path / d)).returncode == 0
    assert (tmp_path / "x" / "a" / "predictions.csv").read_text() == (tmp_path / "y" / "a" / "predictions.csv").read_text()


def test_evaluate_every_run_writes_a_comparison(trained_runs, tmp_path):
    checkpoints = os.path.dirname(trained_runs[0])
    result = run("evaluate.py", "--checkpoints-dir", checkpoints, "--model", "resnet18", "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    table = rows(tmp_path / "comparison.csv")
    assert [r[0] for r in table[1:]] == ["a", "b"]
    assert table[0][:5] == ["run", "model", "epoch", "best_train_acc", "best_valid_acc"]
    assert (tmp_path / "comparison.md").read_text().count("| resnet18 |") == 2


def test_evaluate_keeps_the_results_of_each_checkpoint_of_one_run(trained_runs, tmp_path):
    last, best = (os.path.join(trained_runs[0], name) for name in ("last.pt", "best.pt"))
    result = run("evaluate.py", "--checkpoint", last, best, "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    for name, path in (("a-last", last), ("a-best", best)):
        assert json.loads((tmp_path / name / "metrics.json").read_text())["checkpoint"] == path
    assert [r[0] for r in rows(tmp_path / "comparison.csv")[1:]] == ["a-last", "a-best"]
    assert not (tmp_path / "a").exists()
    copy = tmp_path / "elsewhere" / "a"
    shutil.copytree(trained_runs[0], copy)
    clash = run("evaluate.py", "--checkpoint", best, str(copy / "best.pt"), "--out-dir", str(tmp_path / "clash"))
    assert clash.returncode == 1 and "a-best" in clash.stderr and "its own --out-dir" in clash.stderr
    assert not (tmp_path / "clash").exists()


def test_evaluate_without_runs_says_what_to_do(tmp_path):
    result = run("evaluate.py", "--checkpoints-dir", str(tmp_path))
    assert result.returncode == 1 and "python train.py --demo" in result.stderr


def test_evaluate_refuses_checkpoints_of_another_model_than_named_before_scoring_any(trained_runs, tmp_path):
    import torch

    best = os.path.join(trained_runs[0], "best.pt")
    checkpoint = torch.load(best, weights_only=True)
    checkpoint["model_name"] = "resnet50"
    (tmp_path / "other").mkdir()
    torch.save(checkpoint, tmp_path / "other" / "best.pt")
    other, out = str(tmp_path / "other" / "best.pt"), tmp_path / "results"
    result = run("evaluate.py", "--model", "resnet18", "--checkpoint", best, other, "--out-dir", str(out))
    assert result.returncode == 1 and f"--model resnet18 does not match {other} (resnet50)" in result.stderr
    assert not out.exists()  # not even the resnet18 checkpoint listed first was scored
    assert run("evaluate.py", "--model", "resnet18", "--checkpoint", best, "--out-dir", str(out)).returncode == 0


# ----------------------------------------------------------------------------------------------------------
# predict.py


def lab_test_root(tmp_path):
    """The course's real test CSV with small synthetic cells at its paths."""
    root = tmp_path / "lab"
    root.mkdir()
    shutil.copy(shared_path("lab_csv", "resnet_18_test.csv"), root / "resnet_18_test.csv")
    ids, _ = files.read_csv(str(root / "resnet_18_test.csv"), False)
    (root / "new_dataset" / "test").mkdir(parents=True)
    cells = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)) for i in range(4)]
    for k, cells_path in enumerate(ids):
        cells[k % 4].save(root / cells_path)
    return root, ids


def test_submission_matches_the_course_test_csv(trained_runs, tmp_path):
    root, ids = lab_test_root(tmp_path)
    out = tmp_path / "sub.csv"
    result = run("predict.py", "--checkpoint", os.path.join(trained_runs[0], "best.pt"), "--data-root", str(root), "--output", str(out))
    assert result.returncode == 0, result.stderr
    table = rows(out)
    assert table[0] == ["ID", "label"]
    assert [r[0] for r in table[1:]] == ids and len(ids) == 1067
    assert {r[1] for r in table[1:]} <= {"0", "1"}
    sample = rows(shared_path("lab_csv", "sample_submission.csv"))
    assert [r[0] for r in sample] == [r[0] for r in table]  # the layout Kaggle accepted


def test_predict_by_model_name_with_probs_and_tta(trained_runs, demo_root, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(trained_runs[0], checkpoints / "resnet18")
    result = run("predict.py", "--model", "resnet18", "--checkpoints-dir", str(checkpoints), "--tta", "--probs", "probs.csv", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    submission = rows(tmp_path / "submissions" / "resnet18.csv")
    probs = rows(tmp_path / "probs.csv")
    ids, _ = files.read_csv(os.path.join(demo_root, "resnet_18_test.csv"), False)
    assert [r[0] for r in submission[1:]] == ids == [r[0] for r in probs[1:]]
    assert probs[0] == ["ID", "prob_ALL"]
    assert [int(r[1]) for r in submission[1:]] == [int(float(p[1]) >= 0.5) for p in probs[1:]]


def test_ensemble_averages_probabilities(trained_runs, tmp_path):
    a, b = (os.path.join(r, "best.pt") for r in trained_runs)
    for name, checkpoints in (("a", [a]), ("b", [b]), ("ab", [a, b])):
        result = run("predict.py", "--checkpoint", *checkpoints, "--output", str(tmp_path / f"{name}.csv"), "--probs", str(tmp_path / f"{name}_p.csv"))
        assert result.returncode == 0, result.stderr
    p = {n: np.array([float(r[1]) for r in rows(tmp_path / f"{n}_p.csv")[1:]]) for n in ("a", "b", "ab")}
    np.testing.assert_allclose(p["ab"], (p["a"] + p["b"]) / 2, atol=2e-6)
    assert rows(tmp_path / "ab.csv")[0] == ["ID", "label"]


@pytest.mark.parametrize("damage", ["missing", "unreadable"])
def test_bad_test_image_stops_with_its_name_and_no_partial_file(trained_runs, demo_root, tmp_path, damage):
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    bad = root / "new_dataset" / "test" / "5.bmp"
    if damage == "missing":
        bad.unlink()
    else:
        bad.write_bytes(b"BM not really")
    out = tmp_path / "sub.csv"
    out.write_text("an earlier submission\n")
    result = run("predict.py", "--checkpoint", os.path.join(trained_runs[0], "best.pt"), "--data-root", str(root), "--output", str(out))
    assert result.returncode == 1 and "5.bmp" in result.stderr
    assert out.read_text() == "an earlier submission\n"
    assert sorted(os.listdir(tmp_path)) == ["data", "sub.csv"]  # no temporary file left either


def test_predict_of_a_missing_model_says_how_to_train_it(tmp_path):
    result = run("predict.py", "--model", "resnet152", "--checkpoints-dir", str(tmp_path))
    assert result.returncode == 1 and "python train.py --model resnet152" in result.stderr


def test_predict_refuses_checkpoints_of_another_model_than_named(trained_runs, tmp_path):
    best = os.path.join(trained_runs[0], "best.pt")
    result = run("predict.py", "--model", "resnet50", "--checkpoint", best, "--output", str(tmp_path / "sub.csv"))
    assert result.returncode == 1 and f"--model resnet50 does not match {best} (resnet18)" in result.stderr
    assert not (tmp_path / "sub.csv").exists()
    assert run("predict.py", "--model", "resnet18", "--checkpoint", best, "--output", str(tmp_path / "sub.csv")).returncode == 0


# ----------------------------------------------------------------------------------------------------------
# plot.py


def test_plot_writes_curves_and_comparison(trained_runs, tmp_path):
    result = run("plot.py", *trained_runs, "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    for name in ("a", "b"):
        assert Image.open(tmp_path / name / "curves.png").size[0] > 1000
    assert Image.open(tmp_path / "comparison_valid_acc.png").format == "PNG"


def test_plot_works_on_a_run_still_training_and_in_pdf(trained_runs, tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    lines = open(os.path.join(trained_runs[0], "history.csv")).read().splitlines()
    (live / "history.csv").write_text("\n".join(lines[:2]) + "\n")  # one epoch so far
    result = run("plot.py", str(live), "--out-dir", str(tmp_path / "out"), "--format", "pdf")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "live" / "curves.pdf").read_bytes().startswith(b"%PDF")


def test_plot_marks_the_epoch_that_best_pt_holds_by_the_run_s_best_metric(trained_runs):
    import pandas as pd
    import torch

    import plot

    history = plot.read_history(trained_runs[0])
    assert plot.best_epoch(history)["epoch"] == torch.load(os.path.join(trained_runs[0], "best.pt"), weights_only=True)["epoch"]
    by_acc_and_f1 = pd.DataFrame({"epoch": [1, 2, 3], "valid_acc": [0.8, 0.9, 0.9], "valid_f1": [0.85, 0.80, 0.88]})
    assert plot.best_epoch(by_acc_and_f1, "acc")["epoch"] == 2  # the first of two equal, as train.py keeps it
    assert plot.best_epoch(by_acc_and_f1, "f1")["epoch"] == 3


def test_plot_rejects_a_folder_that_is_not_a_run(tmp_path):
    result = run("plot.py", str(tmp_path))
    assert result.returncode == 1 and "no history.csv" in result.stderr


def test_checkpoint_whose_weights_are_of_another_model_is_refused(trained_runs, tmp_path):
    import torch

    checkpoint = torch.load(os.path.join(trained_runs[0], "best.pt"), weights_only=True)
    checkpoint["model_name"] = "resnet50"
    torch.save(checkpoint, tmp_path / "mislabelled.pt")
    result = run("predict.py", "--checkpoint", str(tmp_path / "mislabelled.pt"), "--output", str(tmp_path / "sub.csv"))
    assert result.returncode == 1 and "do not fit a resnet50" in result.stderr
    assert not (tmp_path / "sub.csv").exists()


# ----------------------------------------------------------------------------------------------------------
# Grad-CAM (evaluate.py --cam)


def squares(n, g):
    """Images (n, 3, 32, 32) with a red square in one quadrant; class 1 has a green square in another, whose centre
    is returned."""
    import torch

    y = torch.randint(0, 2, (n,), generator=g)
    x = 0.1 * torch.randn(n, 3, 32, 32, generator=g)
    centre = torch.zeros(n, 2, dtype=torch.long)
    for i in range(n):
        green, red = (torch.tensor(divmod(q, 2)) * 16 + 4 for q in torch.randperm(4, generator=g)[:2].tolist())
        x[i, 0, red[0] : red[0] + 8, red[1] : red[1] + 8] += 1
        if y[i]:
            x[i, 1, green[0] : green[0] + 8, green[1] : green[1] + 8] += 1
        centre[i] = green + 4
    return x, y, centre


def test_grad_cam_peaks_where_the_decision_is_made():
    import torch

    import evaluate

    nn = torch.nn
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential()
    model.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU())
    model.layer4 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
    model.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        x, y, _ = squares(64, g)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    x, y, centre = squares(64, g)
    assert (model(x).argmax(1) == y).float().mean() > 0.95  # it finds the green square, wherever it is
    cells, at = x[y == 1][:16], centre[y == 1][:16]
    cam = evaluate.grad_cam(model, model.layer4, cells, torch.ones(len(cells), dtype=torch.long))
    assert cam.shape == (16, 32, 32) and cam.max() == pytest.approx(1.0)
    peak = cam.flatten(1).argmax(1)
    rows, cols = peak // 32, peak % 32
    assert ((rows - at[:, 0]).abs() <= 4).all() and ((cols - at[:, 1]).abs() <= 4).all()  # on the green square, not the red


def test_evaluate_cam_draws_heat_maps_of_errors_and_right_calls(trained_runs, tmp_path):
    result = run("evaluate.py", "--checkpoint", os.path.join(trained_runs[0], "last.pt"), "--cam", "--adapt-bn", "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    image = np.asarray(Image.open(tmp_path / "a" / "cam.png").convert("RGB"), dtype=float)
    assert image.std() > 10  # not blank


def test_cam_picks_the_worst_errors_then_confident_right_cells():
    import figures

    labels = np.array([0, 0, 0, 1, 1, 1])
    prob = np.array([0.9, 0.6, 0.1, 0.05, 0.7, 0.99])
    assert figures.pick_cells(labels, prob, errors=1, right=1) == [3, 2, 5]  # P(ALL) 0.05 for an ALL cell: the worst error
    assert figures.pick_cells(labels, prob, errors=8, right=2) == [3, 0, 1, 2, 5, 4]


def test_a_missing_optional_package_stops_before_any_work(tmp_path):
    script = ("import sys, importlib.util\n"
              "real = importlib.util.find_spec\n"
              "importlib.util.find_spec = lambda name, *a: None if name == 'captum' else real(name, *a)\n"
              f"sys.path.insert(0, {ROOT!r})\n"
              f"sys.argv = ['evaluate.py', '--cam', '--checkpoint', {str(tmp_path / 'missing.pt')!r}]\n"
              "import evaluate\n"
              "evaluate.run_main(evaluate.main, evaluate.get_args_parser().parse_args)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "pip install captum==0.9.0" in result.stderr and "missing.pt" not in result.stderr
