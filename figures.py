"""The figures evaluate.py writes and train.py logs to TensorBoard: confusion matrices, ROC curves, galleries of cells,
and each patient's share of cells called ALL. Drawing only: each function takes what was scored and returns or saves
a matplotlib figure."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from dataloader import decode_image  # noqa: E402
from files import CLASSES, save_figure  # noqa: E402

CLASS_COLORS = ("tab:blue", "tab:red")  # hem, ALL


def confusion_matrix_figure(cm: np.ndarray, title: str):
    """Counts and row-normalised recall side by side (train.py logs the same figure to TensorBoard)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    normalised = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    for ax, values, fmt, name in ((axes[0], cm, "d", "counts"), (axes[1], normalised, ".2f", "row-normalised (recall)")):
        image = ax.imshow(values, cmap="Blues", vmin=0)
        fig.colorbar(image, ax=ax, fraction=0.046)
        for i in range(2):
            for j in range(2):
                ax.text(j, i, format(values[i, j], fmt), ha="center", va="center", fontsize=13,
                        color="white" if values[i, j] > values.max() / 2 else "black")
        ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=CLASSES, yticklabels=CLASSES,
               xlabel="Predicted label", ylabel="True label", title=name)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_confusion_matrix(cm: np.ndarray, title: str, path: str) -> None:
    fig = confusion_matrix_figure(cm, title)
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def plot_roc(labels: np.ndarray, prob_all: np.ndarray, title: str, path: str) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    if len(set(labels.tolist())) == 2:
        fpr, tpr, _ = skm.roc_curve(labels, prob_all)
        ax.plot(fpr, tpr, label=f"AUC {skm.roc_auc_score(labels, prob_all):.4f}")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="False positive rate (hem called ALL)", ylabel="True positive rate (ALL found)", title=title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def pick_cells(labels: np.ndarray, prob_all: np.ndarray, errors: int, right: int) -> list[int]:
    """The most confidently wrong cells, then the most confidently right of each class."""
    pred = (prob_all >= 0.5).astype(int)
    confidence = np.abs(prob_all - 0.5)
    wrong = np.flatnonzero(pred != labels)
    picked = wrong[np.argsort(-confidence[wrong])][:errors].tolist()
    for c in (0, 1):
        good = np.flatnonzero((pred == labels) & (labels == c))
        picked += good[np.argsort(-confidence[good])][:right].tolist()
    return picked


def cell_title(path: str, label: int, prob_all: float) -> str:
    """A gallery panel's title: the file, the true and predicted class, P(ALL)."""
    return f"{os.path.basename(path)}\ntrue {CLASSES[label]}, pred {CLASSES[int(prob_all >= 0.5)]}\nP(ALL) {prob_all:.3f}"


def plot_worst_errors(paths: list[str], labels: np.ndarray, prob_all: np.ndarray, crop: int | None, title: str, path: str, k: int) -> int:
    """A gallery of the k most confidently wrong cells; returns how many it shows."""
    wrong = pick_cells(labels, prob_all, errors=k, right=0)
    cols = max(1, min(4, len(wrong)))
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong):
        ax.imshow(decode_image(paths[i], crop, None).numpy())
        ax.set_title(cell_title(paths[i], labels[i], prob_all[i]), fontsize=9)
    if len(wrong) == 0:
        axes[0, 0].text(0.5, 0.5, "no errors", ha="center", va="center", fontsize=14)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return len(wrong)


def plot_heat_maps(images: np.ndarray, cams: np.ndarray, paths: list[str], labels: np.ndarray, prob_all: np.ndarray, title: str,
                   path: str) -> None:
    """A gallery of cells (uint8, N x H x W x 3) under their heat maps (N x H x W, 0 to 1), titled as cell_title; the
    titles of wrong calls in red."""
    cols = 4
    rows = max(1, -(-len(images) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, cam, cell, label, p in zip(axes.flat, images, cams, paths, labels, prob_all):
        ax.imshow(image)
        ax.imshow(cam, cmap="jet", alpha=0.4, vmin=0, vmax=1)
        ax.set_title(cell_title(cell, label, p), fontsize=9, color="black" if label == int(p >= 0.5) else "red")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def plot_subjects(table: pd.DataFrame, title: str, path: str) -> None:
    """One bar per patient (patients.subject_table's rows, in its order): the share of its cells called ALL, coloured
    by its true class, with the 0.5 line that its verdict turns on; the patients called wrong have their names in red.
    The figure grows with the patients, so that 2 or 40 read alike."""
    fig, ax = plt.subplots(figsize=(8, 1.3 + 0.28 * len(table)))
    y = np.arange(len(table))[::-1]
    ax.barh(y, table["share_called_ALL"], color=[CLASS_COLORS[label] for label in table["label"]], height=0.7)
    ax.axvline(0.5, color="black", lw=1, ls="--")
    ax.set_yticks(y, [f"{s} ({n})" for s, n in zip(table["subject"], table["cells"])], fontsize=9)
    for tick, right in zip(ax.get_yticklabels(), table["right"]):
        tick.set_color("black" if right else "red")
    ax.set(xlim=(0, 1), ylim=(-0.6, len(table) - 0.4), xlabel="share of the patient's cells called ALL",
           ylabel="patient (cells)", title=title)
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in CLASS_COLORS], labels=[f"true {c}" for c in CLASSES],
              loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
