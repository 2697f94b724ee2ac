"""Training curves of runs, and all models compared, from each run's history.csv (also while it trains).

    python plot.py                                   every run under checkpoints/
    python plot.py checkpoints/resnet18 checkpoints/resnet50 --format pdf

Per run: results/<run-name>/curves.<fmt> (accuracy and loss per epoch, the epoch best.pt holds marked, learning rate).
All runs: results/comparison_valid_acc.<fmt>.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from files import save_figure  # noqa: E402

HISTORY_COLUMNS = {"epoch", "lr", "train_loss", "train_acc", "valid_loss", "valid_acc"}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="run folders holding history.csv (default: every one under --checkpoints-dir)")
    parser.add_argument("--checkpoints-dir", default="checkpoints", help="where the run folders are (default: checkpoints)")
    parser.add_argument("--out-dir", default="results", help="figures go to OUT_DIR/<run-name>/ (default: results)")
    parser.add_argument("--format", choices=["png", "pdf", "svg"], default="png", help="figure file format (default: png)")
    return parser


def read_history(run: str) -> pd.DataFrame:
    path = os.path.join(run, "history.csv")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no history.csv; is {run} a run folder written by train.py?")
    history = pd.read_csv(path)
    missing = HISTORY_COLUMNS - set(history.columns)
    if missing:
        raise ValueError(f"{path}: columns {', '.join(sorted(missing))} missing; not a history written by train.py")
    return history


def run_settings(run: str) -> dict:
    """The run's args.json, or {} where there is none (a copied history.csv alone)."""
    try:
        with open(os.path.join(run, "args.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def run_label(run: str) -> str:
    """'resnet50' or 'my-run (resnet50)', from the run's args.json."""
    name = os.path.basename(os.path.normpath(run))
    model = run_settings(run).get("model")
    return name if model in (None, name) else f"{name} ({model})"


def best_epoch(history: pd.DataFrame, metric: str = "acc") -> pd.Series:
    """The row of the epoch best.pt holds: the first with the highest valid accuracy, or weighted F1 for a run trained
    with --best-metric f1."""
    column = "valid_f1" if metric == "f1" and "valid_f1" in history else "valid_acc"
    return history.loc[history[column].idxmax()]


def plot_run(run: str, history: pd.DataFrame, path: str) -> None:
    metric = run_settings(run).get("best_metric", "acc")
    best = best_epoch(history, metric)
    fig, (acc, loss, lr) = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key in ((acc, "acc"), (loss, "loss")):
        ax.plot(history["epoch"], history[f"train_{key}"], label=f"train {key}")
        ax.plot(history["epoch"], history[f"valid_{key}"], label=f"valid {key}")
        ax.axvline(best["epoch"], color="grey", ls=":", lw=1)
        ax.set(xlabel="epoch", ylabel=key, yscale="log" if key == "loss" else "linear")
        ax.grid(alpha=0.3)
    acc.scatter([best["epoch"]], [best["valid_acc"]], color="C1", zorder=3, label=f"best.pt, epoch {int(best['epoch'])}")
    acc.legend()
    loss.legend()
    lr.plot(history["epoch"], history["lr"], color="C2")
    lr.set(xlabel="epoch", ylabel="learning rate (at epoch start)", yscale="log" if (history["lr"] > 0).all() else "linear")
    lr.grid(alpha=0.3)
    by_f1 = metric == "f1" and "valid_f1" in best
    best_valid = f"Best valid F1: {best['valid_f1']:.4f}" if by_f1 else f"Best valid acc: {best['valid_acc']:.2%}"
    fig.suptitle(f"{run_label(run)} - Best train acc: {history['train_acc'].max():.2%}, "
                 f"{best_valid} (epoch {int(best['epoch'])} of {int(history['epoch'].max())})")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def plot_comparison(histories: dict[str, pd.DataFrame], path: str) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    for run, history in histories.items():
        ax.plot(history["epoch"], history["valid_acc"], label=f"{run_label(run)}: best {history['valid_acc'].max():.2%}")
    ax.set(xlabel="epoch", ylabel="valid accuracy", title="Valid accuracy of every run")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    runs = args.runs or sorted(os.path.dirname(p) for p in glob.glob(os.path.join(args.checkpoints_dir, "*", "history.csv")))
    if not runs:
        print(f"error: no run with a history.csv under {args.checkpoints_dir}/; train one first (python train.py --demo)", file=sys.stderr)
        return 1
    histories = {}
    for run in runs:
        try:
            history = read_history(run)
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        if history.empty:
            print(f"{run}: no finished epoch yet, skipped")
            continue
        histories[run] = history
        out = os.path.join(args.out_dir, os.path.basename(os.path.normpath(run)))
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, f"curves.{args.format}")
        plot_run(run, history, path)
        print(f"wrote {path}")
    if histories:
        os.makedirs(args.out_dir, exist_ok=True)
        path = os.path.join(args.out_dir, f"comparison_valid_acc.{args.format}")
        plot_comparison(histories, path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(get_args_parser().parse_args()))
    except OSError as e:  # a full disk (DiskFullError names the file)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
