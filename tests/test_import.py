"""python dataloader.py --import-cnmc: the public C-NMC release in the course layout, split by subject."""
import csv
import os
import subprocess
import sys
from collections import Counter

import pytest
from PIL import Image
from sklearn.metrics import f1_score

import dataloader
import files
import datatools
from conftest import ROOT, shared_path

# subject -> cells; ALL subjects are numbers, normal (hem) subjects carry an H
SUBJECTS = {"11": 30, "14": 22, "23": 15, "32": 12, "46": 9, "51": 6, "H10": 20, "H14": 14, "H22": 9, "H3": 5}


@pytest.fixture()
def release(tmp_path):
    """A small release tree: fold_0..2/all|hem/UID_<subject>_<image>_<cell>_<all|hem>.bmp, plus bad names."""
    src = tmp_path / "C-NMC_Leukemia" / "training_data"
    cell = Image.new("RGB", (40, 40), (120, 60, 140))
    for k, (subject, n) in enumerate(SUBJECTS.items()):
        kind = "hem" if subject.startswith("H") else "all"
        folder = src / f"fold_{k % 3}" / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            cell.save(folder / f"UID_{subject}_{i // 3 + 1}_{i % 3 + 1}_{kind}.bmp")
    cell.save(src / "fold_0" / "all" / "snapshot.bmp")  # unparsable name
    cell.save(src / "fold_1" / "hem" / "UID_77_1_1_all.bmp")  # an ALL name in the hem folder
    (src / "fold_0" / "all" / "notes.txt").write_text("not an image")
    return str(tmp_path / "C-NMC_Leukemia")


def read(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def subject_of(path):
    return datatools.parse_cnmc_name(os.path.basename(path))[0]


@pytest.mark.parametrize("name, expected", [
    ("UID_11_10_1_all.bmp", ("11", 1)), ("UID_H10_43_1_hem.bmp", ("H10", 0)), ("uid_h3_1_2_HEM.PNG", ("H3", 0)),
    ("UID_5_1_1_all.jpg", ("5", 1)), ("UID_11_10_all.bmp", None), ("UID_11_10_1_blast.bmp", None), ("11_10_1_all.bmp", None),
])
def test_release_names_parse(name, expected):
    assert datatools.parse_cnmc_name(name) == expected


def test_subject_split_writes_the_course_layout(release, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "dataloader.py"), "--import-cnmc", release, "--out", str(out), "--seed", "1"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert read(out / "train.csv")[0] == ["Path", "label"] and read(out / "resnet_50_test.csv")[0] == ["Path"]
    splits = {s: dataloader.getData(s, str(out)) for s in ("train", "valid")}
    test_names, test_labels = files.read_csv(str(out / "test_labels.csv"), True)
    splits["test"] = ([os.path.normpath(os.path.join(out, p)) for p in test_names], test_labels)
    assert sum(len(p) for p, _ in splits.values()) == sum(SUBJECTS.values())
    # no subject in two splits, and every label agrees with its name
    owner = {}
    for split, (paths, labels) in splits.items():
        for path, label in zip(paths, labels):
            subject = subject_of(path)
            assert owner.setdefault(subject, split) == split, f"{subject} is in {owner[subject]} and {split}"
            assert label == (0 if subject.startswith("H") else 1)
            assert os.path.isfile(path) and os.path.samefile(path, next(
                os.path.join(d, f) for d, _, fs in os.walk(release) for f in fs if f == os.path.basename(path)))
    # both classes in every split, and the split sizes near 60/20/20 for each class
    for label, total in ((1, 94), (0, 48)):
        per_split = {s: labels.count(label) for s, (_, labels) in splits.items()}
        assert all(n > 0 for n in per_split.values()), per_split
        assert abs(per_split["train"] / total - 0.6) < 0.2
    assert sorted(files.read_csv(str(out / "resnet_18_test.csv"), False)[0]) == sorted(test_names)
    # bad names are reported, not silently dropped
    assert "2 files not imported" in result.stdout
    assert {os.path.basename(p) for p in (out / "unparsed.txt").read_text().split()} == {"snapshot.bmp", "UID_77_1_1_all.bmp"}
    table = read(out / "subjects.csv")
    assert table[0] == ["split", "subject", "label", "cells"] and len(table) - 1 == len(SUBJECTS)
    assert "hem cells" in result.stdout and "ALL subj" in result.stdout
    ds = dataloader.RetinopathyLoader(str(out), "valid", preprocess=dataloader.Preprocess(crop=None, size=32))
    assert ds[0][0].shape == (3, 32, 32)


def test_an_imported_release_trains_balanced_by_patient(release, tmp_path):
    out = tmp_path / "out"
    datatools.import_cnmc(release, str(out))
    runs = tmp_path / "runs"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--data-root", str(out), "--output-dir", str(runs),
                             "--class-balance", "subject", "--epochs", "1", "--image-size", "32", "--batch-size", "8",
                             "--workers", "0", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(read(runs / "resnet18" / "history.csv")) == 2


def test_random_split_is_stratified(release, tmp_path):
    split_of = datatools.import_cnmc(release, str(tmp_path / "out"), split="random", valid_frac=0.25, test_frac=0.25, seed=0)
    counts = Counter((split, subject_of(p).startswith("H")) for p, split in split_of.items())
    assert counts["valid", True] == counts["test", True] == 12 and counts["valid", False] == 24


def test_import_refuses_to_overwrite_and_to_import_nothing(release, tmp_path):
    datatools.import_cnmc(release, str(tmp_path / "out"))
    with pytest.raises(files.DataError, match="already holds a dataset"):
        datatools.import_cnmc(release, str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(files.DataError, match="no cell images"):
        datatools.import_cnmc(str(tmp_path / "empty"), str(tmp_path / "out2"))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "dataloader.py"), "--import-cnmc", str(tmp_path / "empty"),
                             "--out", str(tmp_path / "out2")], capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.startswith("error: ") and "no cell images" in result.stderr
    assert "Traceback" not in result.stderr


def test_real_cells_keep_every_subject_in_one_split(tmp_path):
    cnmc = shared_path("cnmc")
    split_of = datatools.import_cnmc(cnmc, str(tmp_path / "out"))
    assert len(split_of) == 2589
    splits_of_subject = {}
    for path, split in split_of.items():
        splits_of_subject.setdefault(subject_of(path), set()).add(split)
    assert all(len(s) == 1 for s in splits_of_subject.values())
    labels = {s: Counter(subject_of(p).startswith("H") for p, sp in split_of.items() if sp == s) for s in ("train", "valid", "test")}
    assert all(c[True] > 0 and c[False] > 0 for c in labels.values())
    assert os.path.isfile(tmp_path / "out" / "new_dataset" / "valid" / os.path.basename(next(p for p, s in split_of.items() if s == "valid")))


def test_folds_hold_out_each_subject_once_and_keep_folds_disjoint(release, tmp_path):
    out = tmp_path / "folds"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "dataloader.py"), "--import-cnmc", release, "--out", str(out),
                             "--folds", "3"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    held_out = Counter()
    for k in range(3):
        fold = str(out / f"fold_{k}")
        (train, train_labels), (valid, valid_labels) = dataloader.getData("train", fold), dataloader.getData("valid", fold)
        train_subjects, valid_subjects = {subject_of(p) for p in train}, {subject_of(p) for p in valid}
        assert not train_subjects & valid_subjects
        assert train_subjects | valid_subjects == set(SUBJECTS)  # train holds every subject not held out
        assert all(os.path.isfile(p) for p in train + valid)
        assert train_labels + valid_labels == [0 if subject_of(p).startswith("H") else 1 for p in train + valid]
        assert len(train) + len(valid) == sum(SUBJECTS.values())
        held_out.update(valid_subjects)
        assert sorted(files.read_csv(os.path.join(fold, "resnet_18_test.csv"), False)[0]) == sorted(
            files.read_csv(os.path.join(fold, "valid.csv"), True)[0])
        assert f"fold_{k} (valid: the subjects {', '.join(sorted(valid_subjects))})" in result.stdout
    assert held_out == Counter(SUBJECTS.keys())  # each subject held out exactly once
    table = read(out / "folds.csv")
    assert table[0] == ["fold", "subject", "label", "cells"]
    assert {row[1]: row[0] for row in table[1:]} == {s: f"fold_{k}" for k in range(3) for s in
                                                     {subject_of(p) for p in dataloader.getData("valid", str(out / f"fold_{k}"))[0]}}
    # the largest subjects of each class are held out in different folds
    fold_of = {row[1]: row[0] for row in table[1:]}
    assert len({fold_of["11"], fold_of["14"], fold_of["23"]}) == 3 and fold_of["H10"] != fold_of["H14"]


def test_folds_need_at_least_two(release, tmp_path):
    with pytest.raises(files.DataError, match="at least 2 folds"):
        datatools.import_folds(release, str(tmp_path / "out"), 1)


@pytest.mark.parametrize("valid_frac, test_frac", [(0.5, 0.5), (0.7, 0.4), (-0.1, 0.2)])
def test_split_shares_must_leave_cells_for_train(release, tmp_path, valid_frac, test_frac):
    with pytest.raises(files.DataError, match="must leave some for train"):
        datatools.import_cnmc(release, str(tmp_path / "out"), valid_frac=valid_frac, test_frac=test_frac)
    assert not (tmp_path / "out").exists()


def test_real_cells_in_folds_hold_out_each_large_subject(tmp_path):
    cnmc = shared_path("cnmc")
    held_out = datatools.import_folds(cnmc, str(tmp_path / "out"), 3)
    fold_of = {s: fold for fold, subjects in held_out.items() for s in subjects}
    assert len(fold_of) == sum(len(s) for s in held_out.values())  # each subject in one fold's valid only
    assert fold_of["H10"] != fold_of["H14"]
    assert len({fold_of[s] for s in ("51", "32", "46")}) == 3  # the three largest ALL subjects
    for fold, subjects in held_out.items():
        train = {subject_of(p) for p in dataloader.getData("train", str(tmp_path / "out" / fold))[0]}
        assert train == set(fold_of) - set(subjects)


def test_fold_summary_gives_mean_worst_spread_and_subjects(tmp_path, capsys):
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import folds

    f1 = {("fold_0", 0): 0.8, ("fold_1", 0): 0.6, ("fold_0", 1): 0.9, ("fold_1", 1): 0.7}
    for (fold, seed), value in f1.items():
        out = tmp_path / "r" / "plain" / f"{fold}-seed{seed}"
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(f'{{"weighted_f1": {value}, "recall_hem": 0.5, "recall_ALL": 1.0}}')
        rows = ["path,label,pred,prob_ALL", "./a/UID_H10_1_1_hem.bmp,0,0,0.1", "./a/UID_H10_1_2_hem.bmp,0,1,0.9",
                "./a/UID_7_1_1_all.bmp,1,1,0.8"]
        (out / "predictions.csv").write_text("\n".join(rows) + "\n")
    scores = folds.load_scores("r", str(tmp_path))
    s = folds.summarise(scores["plain"])
    assert s["seeds"] == [0, 1]
    assert s["mean"] == pytest.approx(0.75)  # fold means 0.7 (seed 0) and 0.8 (seed 1)
    assert s["spread"] == pytest.approx(0.1) and s["worst"] == pytest.approx(0.65)
    assert s["per_fold"] == pytest.approx({"fold_0": 0.85, "fold_1": 0.65})
    assert folds.share_right(scores["plain"]["fold_0"][0][1]) == {"H10": 0.5, "7": 1.0}
    assert s["patients"] == "2 of 4"  # H10, half its cells called ALL, is called ALL: wrong on both folds
    folds.table(["r"], str(tmp_path))
    assert "| r | plain | 0.750 ± 0.050 | 0.650 | 0.850 | 0.650 | 0.500 / 1.000 | 2 of 4 |" in capsys.readouterr().out
    folds.report("r", scores)
    out = capsys.readouterr().out
    assert "patients called right 2 of 4" in out and "fold_0: weighted F1 0.850" in out
    assert "patients right 1 of 2 (wrong: H10 in 2 of 2 seeds)" in out
    folds.table(["r"], str(tmp_path), ["tta"])
    assert "| r |" not in capsys.readouterr().out  # only the scorings asked for
    with pytest.raises(SystemExit, match="no scores .* for never-run"):
        folds.table(["r", "never-run"], str(tmp_path))


def test_fold_summary_leaves_out_a_scoring_not_finished_on_every_fold(tmp_path, capsys):
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import folds

    scored = {"plain": [("fold_0", 0), ("fold_1", 0)], "tta": [("fold_0", 0)], "adapt-bn": [("fold_0", 0), ("fold_1", 1)],
              "adapt-bn+tta": [("fold_0", 0), ("fold_1", 0)]}
    for scoring, runs in scored.items():
        for fold, seed in runs:
            out = tmp_path / "r" / scoring / f"{fold}-seed{seed}"
            out.mkdir(parents=True)
            (out / "metrics.json").write_text('{"weighted_f1": 0.8, "recall_hem": 0.5, "recall_ALL": 1.0}')
            (out / "predictions.csv").write_text("path,label,pred,prob_ALL\n./a/UID_7_1_1_all.bmp,1,1,0.8\n")
    scores = folds.load_scores("r", str(tmp_path))
    assert folds.summarise(scores["tta"], ["fold_0", "fold_1"]) is None  # one fold of two
    assert folds.summarise(scores["adapt-bn"]) is None  # no seed scored on both folds
    folds.table(["r"], str(tmp_path))
    out, err = capsys.readouterr()
    assert "| r | plain | 0.800 |" in out and "| tta |" not in out and "| adapt-bn |" not in out
    assert "no row for r, tta" in err and "fold_0 seeds 0" in err
    folds.report("r", scores)
    out = capsys.readouterr().out
    assert "scored plain (seeds 0): weighted F1 fold mean 0.800" in out and "scored tta: not scored on every fold" in out
    assert "scored adapt-bn+tta (seeds 0): weighted F1 fold mean 0.800" in out  # finished, after unfinished ones


@pytest.mark.parametrize("valid_labels, train_share, kept", [([1] * 4 + [0] * 4, 0.75, (1, 4)),  # hem thinned
                                                             ([1] * 8 + [0] * 2, 0.5, (2, 2))])  # ALL thinned
def test_train_mix_thins_the_held_out_cells_to_the_training_class_mix(tmp_path, valid_labels, train_share, kept):
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import folds

    train = [1] * int(train_share * 8) + [0] * int((1 - train_share) * 8)
    for split, labels in (("train", train), ("valid", valid_labels)):
        rows = [f"./new_dataset/{split}/{i}.bmp,{label}" for i, label in enumerate(labels)]
        (tmp_path / f"{split}.csv").write_text("\n".join(["Path,label", *rows]) + "\n")
    path = folds.train_mix_csv(str(tmp_path))
    assert path == str(tmp_path / "valid_train_mix.csv")
    paths, labels = files.read_csv(path, labelled=True)
    assert (labels.count(0), labels.count(1)) == kept
    valid = dict(zip(*files.read_csv(str(tmp_path / "valid.csv"), labelled=True)))
    assert all(valid[p] == label for p, label in zip(paths, labels)) and paths == sorted(paths, key=list(valid).index)
    os.remove(path)
    assert folds.train_mix_csv(str(tmp_path)) == path and files.read_csv(path, labelled=True)[0] == paths  # seeded


def test_seed_ensemble_averages_each_cells_probability(tmp_path, capsys):
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import folds

    cells = ["./a/UID_H10_1_1_hem.bmp", "./a/UID_H10_1_2_hem.bmp", "./a/UID_7_1_1_all.bmp", "./a/UID_7_1_2_all.bmp"]
    probs = {0: [0.4, 0.9, 0.2, 0.25], 1: [0.7, 0.0, 0.9, 0.75]}  # means 0.55, 0.45, 0.55, 0.5: ALL, hem, ALL, ALL (as predict.py)
    for fold in ("fold_0", "fold_1"):
        for seed, p in probs.items():
            out = tmp_path / "r" / "plain" / f"{fold}-seed{seed}"
            out.mkdir(parents=True)
            (out / "metrics.json").write_text('{"weighted_f1": 0.5, "recall_hem": 0.5, "recall_ALL": 0.5}')
            rows = [f"{c},{label},{int(q >= 0.5)},{q}" for c, label, q in zip(cells, [0, 0, 1, 1], p)]
            (out / "predictions.csv").write_text("\n".join(["path,label,pred,prob_ALL", *rows]) + "\n")
    ensemble = folds.ensemble_scores("r", str(tmp_path), folds.load_scores("r", str(tmp_path)))
    metrics, subjects = ensemble["plain"]["fold_0"][0]
    assert metrics["recall_hem"] == 0.5 and metrics["recall_ALL"] == 1.0
    assert metrics["weighted_f1"] == pytest.approx(f1_score([0, 0, 1, 1], [1, 0, 1, 1], average="weighted"))
    assert folds.share_right(subjects) == {"H10": 0.5, "7": 1.0}
    assert subjects["call"].tolist() == [1, 1] and subjects["right"].tolist() == [0, 1]  # H10: one cell of two called ALL
    folds.table(["r"], str(tmp_path))
    assert "| r, ensemble of its seeds | plain | " in capsys.readouterr().out
