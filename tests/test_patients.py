"""Patients, not only cells: evaluate.py's verdict per patient, predict.py on a folder of cells, and the release's
preliminary test phase imported beside the subject split."""
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import datatools
import files
import inference
from checkpoints import load_checkpoint, model_from_checkpoint
from conftest import run_script
from dataloader import RetinopathyLoader


def run(script, *args):
    return run_script(script, *args, "--device", "cpu", "--workers", "0")


def subject_of_each(labels: list[int]) -> list[str]:
    """Two normal patients and three ALL patients, the cells dealt out to them in turn."""
    counts = {0: 0, 1: 0}
    subjects = []
    for label in labels:
        names = ("H1", "H2") if label == 0 else ("7", "8", "9")
        subjects.append(names[counts[label] % len(names)])
        counts[label] += 1
    return subjects


@pytest.fixture(scope="module")
def cells(demo_root, tmp_path_factory):
    """The demo's valid cells twice: listed in a CSV with a subject column, and copied into a nested folder under
    C-NMC names (UID_<subject>_<image>_<cell>_<all|hem>.bmp) with a CSV that has no subject column."""
    out = tmp_path_factory.mktemp("patients")
    paths, labels = files.read_csv(os.path.join(demo_root, "valid.csv"), labelled=True)
    subjects = subject_of_each(labels)
    absolute = [os.path.join(demo_root, p) for p in paths]
    pd.DataFrame({"Path": absolute, "label": labels, "subject": subjects}).to_csv(out / "valid_subjects.csv", index=False)
    named = []
    for i, (path, label, subject) in enumerate(zip(paths, labels, subjects)):
        name = f"./cells/{subject}/UID_{subject}_{i + 1}_1_{'all' if label else 'hem'}.bmp"
        os.makedirs(os.path.dirname(out / name), exist_ok=True)
        shutil.copy(os.path.join(demo_root, path), out / name)
        named.append(name)
    pd.DataFrame({"Path": named, "label": labels}).to_csv(out / "named.csv", index=False)
    return {"subject_csv": str(out / "valid_subjects.csv"), "named_csv": str(out / "named.csv"),
            "folder": str(out / "cells"), "subjects": subjects, "labels": labels}


def by_subject_from_predictions(path: str, subjects: list[str] | None = None) -> pd.DataFrame:
    """The per-patient figures recomputed from predictions.csv alone, with pandas."""
    cells = pd.read_csv(path)
    cells["subject"] = subjects if subjects is not None else [os.path.basename(p).split("_")[1] for p in cells["path"]]
    table = cells.groupby("subject").agg(label=("label", "first"), cells=("pred", "size"), share_called_ALL=("pred", "mean"),
                                         mean_prob_ALL=("prob_ALL", "mean"))
    table["call"] = (table["share_called_ALL"] >= 0.5).astype(int)
    table["right"] = (table["call"] == table["label"]).astype(int)
    return table


@pytest.mark.parametrize("source", ["subject_csv", "named_csv"])
def test_evaluate_gives_a_verdict_per_patient_that_predictions_csv_bears_out(trained_runs, cells, tmp_path, source):
    result = run("evaluate.py", "--checkpoint", os.path.join(trained_runs[0], "last.pt"), "--csv", cells[source], "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    out = tmp_path / "a"
    written = pd.read_csv(out / "subjects.csv", dtype={"subject": str})
    assert list(written.columns) == ["subject", "label", "cells", "share_called_ALL", "mean_prob_ALL", "call", "right"]
    expected = by_subject_from_predictions(out / "predictions.csv", cells["subjects"] if source == "subject_csv" else None)
    assert sorted(written["subject"]) == sorted(expected.index) == ["7", "8", "9", "H1", "H2"]
    for column in ("label", "cells", "call", "right"):
        assert written.set_index("subject")[column].to_dict() == expected[column].to_dict(), column
    for column in ("share_called_ALL", "mean_prob_ALL"):
        np.testing.assert_allclose(written.set_index("subject")[column], expected[column].loc[written["subject"]], rtol=1e-12)
    assert written["label"].tolist() == sorted(written["label"])  # normal patients first
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["patients"] == 5 and metrics["patient_accuracy"] == pytest.approx(expected["right"].mean())
    assert Image.open(out / "subjects.png").format == "PNG"
    wrong = expected.index[expected["right"] == 0].tolist()
    assert f"patients: {5 - len(wrong)} of 5 called right by the majority of their cells" in result.stdout
    assert all(f"{subject} (" in result.stdout for subject in wrong)


def test_evaluate_without_subjects_writes_no_patient_files(trained_runs, tmp_path):
    result = run("evaluate.py", "--checkpoint", os.path.join(trained_runs[0], "last.pt"), "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "a" / "subjects.csv").exists() and "patient" not in (tmp_path / "a" / "metrics.json").read_text()
    assert "patients:" not in result.stdout


def test_a_subject_with_two_labels_is_refused_before_anything_is_written(trained_runs, cells, tmp_path):
    table = pd.read_csv(cells["subject_csv"])
    first_hem, first_all = table.index[table["label"] == 0][0], table.index[table["label"] == 1][0]
    table.loc[first_hem, "subject"] = "7"
    table.to_csv(tmp_path / "mixed.csv", index=False)
    result = run("evaluate.py", "--checkpoint", os.path.join(trained_runs[0], "last.pt"), "--csv", str(tmp_path / "mixed.csv"),
                 "--out-dir", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "subject 7 has cells labelled both 0 (hem) and 1 (ALL)" in result.stderr
    assert table.loc[first_hem, "Path"] in result.stderr and table.loc[first_all, "Path"] in result.stderr
    assert not (tmp_path / "out").exists()


def test_patient_table_without_labels_and_ties():
    import patients

    table = patients.subject_table(["a", "a", "b", "b", "b"], np.array([0.5, 0.1, 0.9, 0.8, 0.2]))
    assert table.to_dict("list") == {"subject": ["a", "b"], "cells": [2, 3], "share_called_ALL": [0.5, 2 / 3],
                                     "mean_prob_ALL": [0.3, pytest.approx(19 / 30)], "call": [1, 1]}  # half called ALL: ALL


# ----------------------------------------------------------------------------------------------------------
# predict.py --images


def test_predict_scores_a_nested_folder_of_mixed_images_in_path_order(trained_runs, demo_root, tmp_path):
    folder = tmp_path / "new"
    names = {"b/2.png": "0.bmp", "a/1.bmp": "1.bmp", "a/deeper/3.JPG": "2.bmp", "c.tif": "3.bmp", "a/0.jpeg": "4.bmp"}
    for name, source in names.items():
        os.makedirs(os.path.dirname(folder / name), exist_ok=True)
        image = Image.open(os.path.join(demo_root, "new_dataset", "test", source))
        image.save(folder / name, format={"png": "PNG", "bmp": "BMP", "jpg": "JPEG", "tif": "TIFF", "jpeg": "JPEG"}[name.rsplit(".", 1)[1].lower()])
    (folder / "a" / "notes.txt").write_text("not an image")
    out = tmp_path / "scores.csv"
    checkpoint = os.path.join(trained_runs[0], "best.pt")
    result = run("predict.py", "--checkpoint", checkpoint, "--images", str(folder), "--output", str(out))
    assert result.returncode == 0, result.stderr
    scored = pd.read_csv(out)
    assert list(scored.columns) == ["path", "label", "prob_ALL"]
    assert scored["path"].tolist() == sorted(str(folder / name) for name in names)
    assert (scored["label"] == (scored["prob_ALL"] >= 0.5)).all()
    model, preprocess = model_from_checkpoint(load_checkpoint(checkpoint), torch.device("cpu"))
    bmp = RetinopathyLoader(demo_root, "test", preprocess=preprocess, output="uint8", csv_path=os.path.join(demo_root, "resnet_18_test.csv"))
    reference = inference.dataset_logits(model, preprocess, bmp, torch.device("cpu"), workers=0).softmax(1)[:, 1]
    index = [os.path.normpath(p) for p in bmp.img_name].index(os.path.normpath(os.path.join(demo_root, "new_dataset", "test", "1.bmp")))
    assert scored.set_index("path").loc[str(folder / "a/1.bmp"), "prob_ALL"] == pytest.approx(float(reference[index]), abs=1e-5)
    assert "no per-patient file" not in result.stdout and not os.path.exists(tmp_path / "scores_subjects.csv")


def test_predict_by_subject_on_a_folder_matches_evaluate_on_its_csv(trained_runs, cells, tmp_path):
    checkpoint = os.path.join(trained_runs[0], "last.pt")
    assert run("evaluate.py", "--checkpoint", checkpoint, "--csv", cells["named_csv"], "--out-dir", str(tmp_path)).returncode == 0
    result = run("predict.py", "--checkpoint", checkpoint, "--images", cells["folder"], "--by-subject", "--output", str(tmp_path / "new.csv"))
    assert result.returncode == 0, result.stderr
    folder = pd.read_csv(tmp_path / "new_subjects.csv", dtype={"subject": str}).set_index("subject").sort_index()
    from_csv = pd.read_csv(tmp_path / "a" / "subjects.csv", dtype={"subject": str}).set_index("subject").sort_index()
    assert list(folder.columns) == ["cells", "share_called_ALL", "mean_prob_ALL", "call"]
    assert folder[["cells", "call"]].equals(from_csv[["cells", "call"]])
    np.testing.assert_allclose(folder[["share_called_ALL", "mean_prob_ALL"]], from_csv[["share_called_ALL", "mean_prob_ALL"]], atol=1e-5)
    assert "5 patients" in result.stdout and "H1" in result.stdout


def test_kaggle_submission_is_unchanged_by_by_subject_and_exact(trained_runs, demo_root, tmp_path):
    checkpoint = os.path.join(trained_runs[0], "best.pt")
    for name, extra in (("plain", []), ("by", ["--by-subject"])):
        result = run("predict.py", "--checkpoint", checkpoint, "--output", str(tmp_path / f"{name}.csv"), *extra)
        assert result.returncode == 0, result.stderr
    assert "the cells name no patient" in result.stdout and not (tmp_path / "by_subjects.csv").exists()
    model, preprocess = model_from_checkpoint(load_checkpoint(checkpoint), torch.device("cpu"))
    test_csv = os.path.join(demo_root, "resnet_18_test.csv")
    ids, _ = files.read_csv(test_csv, labelled=False)
    dataset = RetinopathyLoader(demo_root, "test", preprocess=preprocess, output="uint8", csv_path=test_csv)
    prob = inference.dataset_logits(model, preprocess, dataset, torch.device("cpu"), workers=0).softmax(1)[:, 1]
    expected = "ID,label\n" + "".join(f"{i},{int(p >= 0.5)}\n" for i, p in zip(ids, prob.tolist()))
    assert (tmp_path / "plain.csv").read_bytes() == (tmp_path / "by.csv").read_bytes() == expected.encode()


@pytest.mark.parametrize("content", ["empty", "not images", "unreadable"])
def test_predict_on_a_folder_without_readable_images_stops_with_its_path(trained_runs, tmp_path, content):
    folder = tmp_path / "new"
    folder.mkdir()
    if content == "not images":
        (folder / "notes.txt").write_text("hello")
    if content == "unreadable":
        Image.new("RGB", (40, 40)).save(folder / "a.png")
        (folder / "b.bmp").write_bytes(b"BM not really")
    result = run("predict.py", "--checkpoint", os.path.join(trained_runs[0], "best.pt"), "--images", str(folder), "--by-subject",
                 "--output", str(tmp_path / "out.csv"))
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    named = str(folder / "b.bmp") if content == "unreadable" else f"{folder}: no images under it"
    assert result.stderr.startswith(f"error: {named}")
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "out_subjects.csv").exists()


# ----------------------------------------------------------------------------------------------------------
# The release's preliminary test phase


def release_with_prelim(tmp_path, subjects: dict[str, int]):
    """A tiny release: training_data/fold_0/all|hem, and validation_data's preliminary test phase (<n>.bmp and the
    labels CSV, which names each cell by its original name)."""
    top = tmp_path / "C-NMC_Leukemia"
    cell = Image.new("RGB", (40, 40), (120, 60, 140))
    for subject, n in {"11": 6, "14": 4, "H10": 5, "H14": 3}.items():
        kind = "hem" if subject.startswith("H") else "all"
        (top / "training_data" / "fold_0" / kind).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            cell.save(top / "training_data" / "fold_0" / kind / f"UID_{subject}_{i + 1}_1_{kind}.bmp")
    images = top / "validation_data" / "C-NMC_test_prelim_phase_data"
    images.mkdir(parents=True)
    rows, k = [], 0
    for subject, n in subjects.items():
        kind = "hem" if subject.startswith("H") else "all"
        for i in range(n):
            k += 1
            cell.save(images / f"{k}.bmp")
            rows.append(f"UID_{subject}_{i + 1}_1_{kind}.bmp,{k}.bmp,{int(kind == 'all')}")
    (top / "validation_data" / "C-NMC_test_prelim_phase_data_labels.csv").write_text("Patient_ID,new_names,labels\n" + "\n".join(rows) + "\n")
    return top


@pytest.mark.parametrize("given", ["top", "training_data"])
def test_import_adds_the_preliminary_test_phase_as_its_own_unseen_patients(tmp_path, capsys, given):
    top = release_with_prelim(tmp_path, {"57": 4, "H49": 3, "60": 2})
    out = tmp_path / "out"
    split = datatools.import_cnmc(str(top if given == "top" else top / "training_data"), str(out))
    printed = capsys.readouterr().out
    assert "prelim_test.csv: the challenge's preliminary test phase, 9 cells of 3 patients" in printed and "H49 (3)" in printed
    table = pd.read_csv(out / "prelim_test.csv", dtype={"subject": str})
    assert list(table.columns) == ["Path", "label", "subject"] and len(table) == 9
    assert table.groupby("subject")["label"].unique().map(list).to_dict() == {"57": [1], "60": [1], "H49": [0]}
    assert all((out / p).is_file() for p in table["Path"])
    assert len(split) == 18 and not any(os.path.relpath(p, top).startswith("validation_data") for p in split)  # never in train, valid or test
    for name in ("train.csv", "valid.csv"):
        assert not set(files.read_csv(str(out / name), labelled=True)[0]) & set(table["Path"])


def test_import_without_the_preliminary_test_phase_says_so_and_goes_on(tmp_path, capsys):
    top = release_with_prelim(tmp_path, {"57": 2})
    shutil.rmtree(top / "validation_data")
    datatools.import_cnmc(str(top), str(tmp_path / "out"))
    lines = [line for line in capsys.readouterr().out.splitlines() if "preliminary test phase" in line]
    assert len(lines) == 1 and "prelim_test.csv not written" in lines[0]
    assert (tmp_path / "out" / "train.csv").exists() and not (tmp_path / "out" / "prelim_test.csv").exists()


def test_import_refuses_a_preliminary_test_phase_that_shares_a_training_patient(tmp_path):
    top = release_with_prelim(tmp_path, {"11": 2})
    with pytest.raises(files.DataError, match="subjects 11 are also in"):
        datatools.import_cnmc(str(top), str(tmp_path / "out"))


def test_import_refuses_a_broken_preliminary_phase_before_writing_anything(tmp_path):
    top = release_with_prelim(tmp_path, {"57": 2})
    (top / "validation_data" / "C-NMC_test_prelim_phase_data" / "2.bmp").unlink()
    with pytest.raises(files.DataError, match="line 3: its image .*2.bmp is missing"):
        datatools.import_cnmc(str(top), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
