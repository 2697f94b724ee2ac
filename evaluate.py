"""Metrics, confusion matrices, ROC curves and the worst mistakes of trained runs, on the valid set.

    python evaluate.py                                   every run under checkpoints/ that has a best.pt
    python evaluate.py --model resnet50                  the runs of one model
    python evaluate.py --checkpoint checkpoints/demo/best.pt
    python evaluate.py --csv data/cnmc/test_labels.csv   any labelled CSV (e.g. held-out patients)
    python evaluate.py --adapt-bn                        BatchNorm statistics re-estimated on the scored images first
    python evaluate.py --cam                             also cam.png: Grad-CAM heat maps of errors and right calls

Each run gets results/<run-name>/ (<run-name>-last/ and -best/ when both of its checkpoints are scored at once): metrics.json,
predictions.csv, confusion_matrix.png, roc.png, errors.png (and cam.png). Where the scored cells name their patients (a
subject column in the CSV, or C-NMC file names), also subjects.csv and subjects.png: a verdict per patient, the majority
of its cells. Several runs also get results/comparison.md and .csv. Preprocessing comes from the checkpoint: no flag
repeats it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
from sklearn import metrics as skm

from checkpoints import (CheckpointError, checkpoint_data_root, find_runs, load_checkpoint, model_from_checkpoint, refuse_other_models,
                         run_name_of)
from cli import add_scoring_flags, non_negative_int, require, run_main
from dataloader import BatchTransform, Preprocess, RetinopathyLoader, decode_image
from devices import keep_freed_memory, resolve_device
from figures import pick_cells, plot_confusion_matrix, plot_heat_maps, plot_roc, plot_subjects, plot_worst_errors
from files import CLASSES, atomic_write, read_csv, write_csv_atomic
from inference import adapt_to_dataset, dataset_logits, warn_if_class_balanced
from patients import SUBJECT_COLUMNS, cell_subjects, describe, subject_table
from resnet import MODELS


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", nargs="+", help="checkpoint files to evaluate (default: every checkpoints/*/best.pt)")
    parser.add_argument("--model", choices=list(MODELS),
                        help="only the runs of this model; with --checkpoint, every checkpoint must be of it")
    parser.add_argument("--checkpoints-dir", default="checkpoints", help="where the run folders are (default: checkpoints)")
    parser.add_argument("--split", choices=["valid", "train"], default="valid", help="split to evaluate on (default: valid)")
    parser.add_argument("--csv", help="a labelled CSV (Path,label) to evaluate on instead of --split")
    parser.add_argument("--data-root", help="dataset folder (default: the one each run was trained on)")
    parser.add_argument("--out-dir", default="results", help="results go to OUT_DIR/<run-name>/ (default: results)")
    parser.add_argument("--tta", action="store_true", help="average the predictions over the four flips of each image")
    parser.add_argument("--cam", action="store_true",
                        help="also draw Grad-CAM heat maps (captum) of the worst errors and of confidently right cells of each class "
                             "in cam.png: where the network looked")
    add_scoring_flags(parser)
    parser.add_argument("--gallery", type=non_negative_int, default=16, help="most confidently wrong cells to show (default: 16)")
    return parser


def compute_metrics(labels: np.ndarray, prob_all: np.ndarray) -> dict:
    """The lab's and the C-NMC challenge's metrics from true labels and P(ALL); predicted label = P(ALL) >= 0.5."""
    pred = (prob_all >= 0.5).astype(int)
    precision, recall, f1, support = skm.precision_recall_fscore_support(labels, pred, labels=[0, 1], zero_division=0)
    result = {
        "images": int(len(labels)),
        "accuracy": skm.accuracy_score(labels, pred),
        "balanced_accuracy": skm.balanced_accuracy_score(labels, pred),
        "weighted_f1": skm.f1_score(labels, pred, average="weighted", zero_division=0),
        "macro_f1": skm.f1_score(labels, pred, average="macro", zero_division=0),
        "roc_auc": skm.roc_auc_score(labels, prob_all) if len(set(labels.tolist())) == 2 else None,
        "sensitivity_ALL": recall[1],
        "specificity_ALL": recall[0],
        "confusion_matrix": skm.confusion_matrix(labels, pred, labels=[0, 1]).tolist(),
    }
    for i, name in enumerate(CLASSES):
        result[f"precision_{name}"], result[f"recall_{name}"], result[f"f1_{name}"], result[f"support_{name}"] = (
            precision[i], recall[i], f1[i], int(support[i]))
    return {k: float(v) if isinstance(v, (np.floating, float)) else v for k, v in result.items()}


def grad_cam(model: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, H, W) Grad-CAM maps (Selvaraju et al. 2017) of class `target` at `layer`, upsampled to x's size and scaled
    to a peak of 1, by captum."""
    from captum.attr import LayerAttribution, LayerGradCam

    cam = LayerGradCam(model, layer).attribute(x, target=target, relu_attributions=True)
    cam = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear")[:, 0].detach()
    return cam / cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)


def plot_cams(model: torch.nn.Module, preprocess: Preprocess, paths: list[str], labels: np.ndarray, prob_all: np.ndarray,
              device: torch.device, title: str, path: str, errors: int = 8, right: int = 2) -> None:
    """Grad-CAM of the predicted class at the last convolutional stage, over each cell as the network saw it
    (after crop and resize)."""
    cells = pick_cells(labels, prob_all, errors, right)
    images = torch.stack([decode_image(paths[i], preprocess.crop, preprocess.size) for i in cells])
    x = BatchTransform(preprocess)(images.to(device))
    pred = torch.as_tensor((prob_all[cells] >= 0.5).astype(int), device=device)
    cams = grad_cam(model, model.layer4, x, pred).cpu().numpy()
    plot_heat_maps(images.numpy(), cams, [paths[i] for i in cells], labels[cells], prob_all[cells], title, path)


# ----------------------------------------------------------------------------------------------------------


def warn_if_one_class(labels: list[int], csv_path: str, share: float = 0.9) -> None:
    """--adapt-bn on a set of mostly one class describes that class, not the mix the network was trained on: on the
    patient folds it cost 0.10 to 0.18 weighted F1 on a held-out set of 97% ALL (EXPERIMENTS.md)."""
    counts = np.bincount(labels, minlength=2)
    major = int(counts.argmax())
    if counts[major] > share * counts.sum():
        print(f"warning: {csv_path} is {counts[major] / counts.sum():.0%} {CLASSES[major]}: --adapt-bn re-estimates BatchNorm "
              "on one class, which can cost more than it corrects. Adapt to a batch that holds both classes.", file=sys.stderr)


def results_names(checkpoint_paths: list[str]) -> list[str]:
    """The folder under --out-dir of each checkpoint: its run's name, and the file's too (cnmc-r18-last, cnmc-r18-best)
    where one command evaluates several checkpoints of a run, so that none overwrites another's results."""
    runs = [run_name_of(p) for p in checkpoint_paths]
    names = [f"{r}-{os.path.splitext(os.path.basename(p))[0]}" if runs.count(r) > 1 else r for r, p in zip(runs, checkpoint_paths)]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise CheckpointError(f"several checkpoints would write their results to {', '.join(clashes)} under the same --out-dir: "
                              "evaluate them one at a time, each with its own --out-dir")
    return names


def evaluate_run(checkpoint_path: str, run: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Score one checkpoint and write its metrics, predictions and figures to --out-dir/<run>/."""
    checkpoint = load_checkpoint(checkpoint_path)
    model, preprocess = model_from_checkpoint(checkpoint, device)
    root = checkpoint_data_root(checkpoint, args.data_root)
    split = "custom" if args.csv else args.split
    dataset = RetinopathyLoader(root, "valid" if args.csv else args.split, preprocess=preprocess, output="uint8", csv_path=args.csv)
    if args.adapt_bn:
        warn_if_one_class(dataset.label, dataset.csv_path)
        warn_if_class_balanced(checkpoint, checkpoint_path)
        model = adapt_to_dataset(model, preprocess, dataset, device, args.batch_size, args.workers)
    logits = dataset_logits(model, preprocess, dataset, device, args.batch_size, args.workers, args.tta)
    prob_all = logits.softmax(1)[:, 1].numpy()
    labels = np.asarray(dataset.label)
    names, _ = read_csv(dataset.csv_path, labelled=True)
    subjects = cell_subjects(names, dataset.csv_path)
    patients = subject_table(subjects, prob_all, labels, names) if subjects is not None else None
    out = os.path.join(args.out_dir, run)
    os.makedirs(out, exist_ok=True)

    result = compute_metrics(labels, prob_all)
    result["loss"] = torch.nn.functional.cross_entropy(logits, torch.as_tensor(labels)).item()
    if patients is not None:
        result.update(patient_accuracy=float(patients["right"].mean()), patients=len(patients))
    history = checkpoint.get("history") or []
    result.update({
        "run": run, "model": checkpoint["model_name"], "checkpoint": checkpoint_path, "epoch": checkpoint["epoch"],
        "split": split, "csv": dataset.csv_path, "tta": args.tta, "adapt_bn": args.adapt_bn,
        "best_train_acc": max((h["train_acc"] for h in history), default=None),
        "best_valid_acc": max((h["valid_acc"] for h in history), default=None),
    })
    atomic_write(os.path.join(out, "metrics.json"), lambda f: f.write(json.dumps(result, indent=2).encode()))
    write_csv_atomic(os.path.join(out, "predictions.csv"), ["path", "label", "pred", "prob_ALL"],
                     [[n, int(y), int(p >= 0.5), repr(float(p))] for n, y, p in zip(names, labels, prob_all)])
    title = f"{run} ({checkpoint['model_name']}, epoch {checkpoint['epoch']}), {split}: acc {result['accuracy']:.4f}"
    plot_confusion_matrix(np.array(result["confusion_matrix"]), title, os.path.join(out, "confusion_matrix.png"))
    plot_roc(labels, prob_all, title, os.path.join(out, "roc.png"))
    plot_worst_errors(dataset.img_name, labels, prob_all, preprocess.crop, f"{run}: most confidently wrong", os.path.join(out, "errors.png"), args.gallery)
    written = ["metrics.json", "predictions.csv", "confusion_matrix.png", "roc.png", "errors.png"]
    if patients is not None:
        write_csv_atomic(os.path.join(out, "subjects.csv"), SUBJECT_COLUMNS, patients.astype(object).values.tolist())
        plot_subjects(patients, f"{run}, {split}: {patients['right'].sum()} of {len(patients)} patients called right",
                      os.path.join(out, "subjects.png"))
        written += ["subjects.csv", "subjects.png"]
    if args.cam:
        plot_cams(model, preprocess, dataset.img_name, labels, prob_all, device, f"{run}: Grad-CAM of the predicted class",
                  os.path.join(out, "cam.png"))
        written.append("cam.png")
    print_metrics(result)
    if patients is not None:
        print(f"  {describe(patients)}")
    print(f"  wrote {out}/: {' '.join(written)}")
    return result


def print_metrics(m: dict) -> None:
    cm = m["confusion_matrix"]
    auc = f"{m['roc_auc']:.4f}" if m["roc_auc"] is not None else "n/a"
    print(f"\n{m['run']} ({m['model']}, epoch {m['epoch']}) on {m['split']}: {m['images']} images")
    print(f"  accuracy {m['accuracy']:.4f}  balanced {m['balanced_accuracy']:.4f}  weighted F1 {m['weighted_f1']:.4f}  "
          f"macro F1 {m['macro_f1']:.4f}  ROC-AUC {auc}  loss {m['loss']:.4f}")
    print(f"  sensitivity (ALL) {m['sensitivity_ALL']:.4f}  specificity {m['specificity_ALL']:.4f}")
    print(f"  {'class':<6}{'precision':>10}{'recall':>8}{'F1':>8}{'support':>9}    confusion (rows true, cols pred)")
    for i, c in enumerate(CLASSES):
        print(f"  {c:<6}{m[f'precision_{c}']:>10.4f}{m[f'recall_{c}']:>8.4f}{m[f'f1_{c}']:>8.4f}{m[f'support_{c}']:>9}"
              f"    {c:<4}{cm[i][0]:>6}{cm[i][1]:>6}")


COMPARISON_COLUMNS = ["run", "model", "epoch", "best_train_acc", "best_valid_acc", "accuracy", "balanced_accuracy",
                      "weighted_f1", "macro_f1", "roc_auc", "sensitivity_ALL", "specificity_ALL", "images"]


def write_comparison(results: list[dict], out_dir: str) -> None:
    """results/comparison.csv and .md: one row per run, as the report's table of train/valid accuracy."""
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else "" if v is None else str(v)

    rows = [[cell(r[c]) for c in COMPARISON_COLUMNS] for r in results]
    write_csv_atomic(os.path.join(out_dir, "comparison.csv"), COMPARISON_COLUMNS, rows)
    lines = ["| " + " | ".join(COMPARISON_COLUMNS) + " |", "|" + "---|" * len(COMPARISON_COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    atomic_write(os.path.join(out_dir, "comparison.md"), lambda f: f.write(("\n".join(lines) + "\n").encode()))
    print("\n" + "\n".join(lines))
    print(f"\nwrote {os.path.join(out_dir, 'comparison.md')} and comparison.csv")


def main(args: argparse.Namespace) -> int:
    if args.cam:
        require("captum", "captum==0.9.0", "--cam")
    device = resolve_device(args.device)
    keep_freed_memory(device)
    checkpoints = args.checkpoint or [os.path.join(r, "best.pt") for r in find_runs(args.checkpoints_dir, args.model)]
    if not checkpoints:
        print(f"error: no run with a best.pt under {args.checkpoints_dir}/{' for ' + args.model if args.model else ''}; "
              "train one first (python train.py --demo) or pass --checkpoint", file=sys.stderr)
        return 1
    names = results_names(checkpoints)
    if args.checkpoint and args.model:  # checked before any is scored: a comparison of one model holds no other
        refuse_other_models(args.model, [(p, load_checkpoint(p)["model_name"]) for p in checkpoints])
    results = [evaluate_run(path, run, args, device) for path, run in zip(checkpoints, names)]
    if len(results) > 1:
        write_comparison(results, args.out_dir)
    return 0


if __name__ == "__main__":
    run_main(main, get_args_parser().parse_args)
