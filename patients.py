"""Patients, not only cells: the subject each cell comes from, and a verdict per subject.

The C-NMC release labels a subject, not a cell: every cell of an ALL patient is ALL. A patient's verdict here is the
majority of its cells (ALL where at least half are called ALL): a summary of what the network says about those cells,
not a diagnosis. evaluate.py, predict.py and experiments/folds.py all count patients with these functions.
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd

from datatools import parse_cnmc_name
from files import CLASSES, DataError, read_column

SUBJECT_COLUMNS = ["subject", "label", "cells", "share_called_ALL", "mean_prob_ALL", "call", "right"]


def cell_subjects(paths: list[str], csv_path: str | None = None) -> list[str] | None:
    """The subject of each cell: the CSV's `subject` column where it has one, else the C-NMC file name
    (UID_<subject>_<image>_<cell>_<all|hem>.bmp); None where neither names the subject of every cell."""
    if csv_path is not None:
        column = read_column(csv_path, "subject")
        if column is not None:
            blank = [path for path, subject in zip(paths, column) if not subject]
            if blank:
                raise DataError(f"{csv_path}: the subject column is empty for {len(blank)} rows, e.g. {blank[0]}; "
                                "fill it in, or drop the column to take subjects from C-NMC file names")
            return column
    parsed = [parse_cnmc_name(os.path.basename(path)) for path in paths]
    return None if any(p is None for p in parsed) else [p[0] for p in parsed]


def subject_table(subjects: list[str], prob_all: np.ndarray, labels: list[int] | np.ndarray | None = None,
                  paths: list[str] | None = None) -> pd.DataFrame:
    """One row per subject: its cells, the share called ALL (P(ALL) >= 0.5), the mean P(ALL) and the verdict (call: 1,
    ALL, where that share is at least 0.5); with labels, also its label and whether the call is right. Sorted by true
    class (hem first), and within a class from the patient called worst to the best (by share without labels).

    A subject whose cells carry both labels is an error in the input, named with those cells' paths: the release
    labels subjects, not cells."""
    cells = pd.DataFrame({"subject": subjects, "prob_ALL": np.asarray(prob_all, dtype=float)})
    cells["called_ALL"] = (cells["prob_ALL"] >= 0.5).astype(float)
    if labels is not None:
        cells["label"] = np.asarray(labels, dtype=int)
        refuse_mixed_labels(cells, paths)
    table = cells.groupby("subject", sort=False).agg(
        **({"label": ("label", "first")} if labels is not None else {}),
        cells=("prob_ALL", "size"), share_called_ALL=("called_ALL", "mean"), mean_prob_ALL=("prob_ALL", "mean")).reset_index()
    table["call"] = (table["share_called_ALL"] >= 0.5).astype(int)
    if labels is None:
        return table.sort_values(["share_called_ALL", "subject"]).reset_index(drop=True)
    table["right"] = (table["call"] == table["label"]).astype(int)
    return table.assign(called_right=share_called_right(table)).sort_values(["label", "called_right", "subject"]) \
        .drop(columns="called_right").reset_index(drop=True)[SUBJECT_COLUMNS]


def share_called_right(table: pd.DataFrame) -> pd.Series:
    """Each patient's share of cells called right, from a labelled subject_table."""
    return table["share_called_ALL"].where(table["label"] == 1, 1 - table["share_called_ALL"])


def refuse_mixed_labels(cells: pd.DataFrame, paths: list[str] | None) -> None:
    mixed = cells.groupby("subject")["label"].nunique()
    mixed = mixed[mixed > 1].index.tolist()
    if mixed:
        rows = cells[cells["subject"] == mixed[0]]
        example = [rows.index[rows["label"] == label][0] for label in (0, 1)]
        named = [f"{paths[i]} (label {label})" if paths else f"cell {i + 1} (label {label})" for i, label in zip(example, (0, 1))]
        raise DataError(f"subject {mixed[0]} has cells labelled both 0 (hem) and 1 (ALL), e.g. {' and '.join(named)}; "
                        f"{len(mixed)} subject{'s' if len(mixed) > 1 else ''} like it ({', '.join(map(str, mixed[:10]))}). "
                        "A patient's cells all carry the patient's label: fix the labels or the subject column")


def describe(table: pd.DataFrame) -> str:
    """One line: how many patients were called right by the majority of their cells, and which were not."""
    wrong = table[table["right"] == 0]
    line = f"patients: {len(table) - len(wrong)} of {len(table)} called right by the majority of their cells"
    if len(wrong):
        line += "; wrong: " + ", ".join(f"{r.subject} ({CLASSES[r.label]}, {r.share_called_ALL:.0%} of {r.cells} "
                                        f"cell{'s' if r.cells > 1 else ''} called ALL)" for r in wrong.itertuples())
    return line
