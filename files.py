"""The course's files: their names and columns, reading its CSVs, and writing any file so that a kill or a full disk
never leaves a broken one (atomic_write). What dataloader.py, datatools.py and the scripts share of files on disk."""
from __future__ import annotations

import csv
import errno
import io
import os
import shutil
import tempfile
from typing import Callable

CLASSES = ("hem", "ALL")
TEST_CSVS = {"resnet18": "resnet_18_test.csv", "resnet50": "resnet_50_test.csv", "resnet152": "resnet_152_test.csv"}
IMAGE_EXTENSIONS = (".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff")


class DataError(Exception):
    """A problem with the dataset on disk; the message says which file or row and what to do."""


def read_csv(csv_path: str, labelled: bool, problems: list[str] | None = None) -> tuple[list[str], list[int] | None]:
    """The Path strings of a course CSV, unchanged, and its labels (None for a test CSV).

    A bad label raises DataError naming the row; with a problems list, bad rows are reported there and skipped.
    """
    if not os.path.isfile(csv_path):
        raise DataError(f"{csv_path}: file not found")
    expected = ["Path", "label"] if labelled else ["Path"]
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    header = [h.strip() for h in rows[0]] if rows else []
    if header[: len(expected)] != expected:
        raise DataError(
            f"{csv_path}: header is {','.join(header) or '(empty file)'}, expected {','.join(expected)}. "
            "Use the CSV files handed out with the lab, unchanged."
        )
    paths: list[str] = []
    labels: list[int] = []
    for line_no, row in enumerate(rows[1:], start=2):
        if not row or not row[0].strip():
            continue
        if labelled:
            value = row[1].strip() if len(row) > 1 else ""
            if value not in ("0", "1"):
                message = f"{csv_path}, line {line_no} ({row[0]}): label {value!r} is not 0 (hem) or 1 (ALL); fix that row"
                if problems is None:
                    raise DataError(message)
                problems.append(message)
                continue
            labels.append(int(value))
        paths.append(row[0].strip())
    return paths, (labels if labelled else None)


def read_column(csv_path: str, name: str) -> list[str] | None:
    """The values of one more column of a course CSV (a `subject` column beside Path and label), row for row as
    read_csv reads the paths; None where the CSV has no such column."""
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    header = [h.strip() for h in rows[0]] if rows else []
    if name not in header:
        return None
    column = header.index(name)
    return [row[column].strip() if len(row) > column else "" for row in rows[1:] if row and row[0].strip()]


def check_not_empty(paths: list[str], source: str) -> None:
    if not paths:
        raise DataError(f"{source}: no images listed under its header. Use the CSV files handed out with the lab, unchanged.")


def check_both_classes(labels: list[int], source: str) -> None:
    """Training needs cells of both classes: a split with one class alone makes class weights infinite."""
    absent = [f"{i} ({name})" for i, name in enumerate(CLASSES) if i not in labels]
    if absent:
        raise DataError(f"{source}: no image labelled {' or '.join(absent)}; training needs both classes. "
                        "Use the lab's train.csv, or add cells of the missing class.")


class DiskFullError(OSError):
    """A write that the disk has no room for; the message names the file, what it needed and what is free."""

    def __init__(self, path: str, needed: int | None, free: int, kept: str):
        need = f"needs {megabytes(needed)}" if needed else "did not fit"
        super().__init__(errno.ENOSPC, f"disk full: {path} {need}, and {megabytes(free)} is free there; {kept}")
        self.path, self.needed, self.free = path, needed, free

    def __str__(self) -> str:
        return self.strerror


def megabytes(n: int) -> str:
    return f"{n / 1e6:,.0f} MB" if n >= 1e6 else f"{n / 1e6:.2f} MB"


def free_space(path: str) -> int:
    """Bytes free on the file system that holds path (a folder, or a file's folder)."""
    return shutil.disk_usage(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))).free


def atomic_write(path: str, write: Callable[[io.BufferedWriter], None], size: int | None = None) -> None:
    """Write path through a temporary file in the same folder, fsync it, then os.replace it over path.

    A kill or a full disk at any moment leaves either the old file or the new one, never a broken one. A full
    disk raises DiskFullError: before anything is written when the expected size is given and does not fit,
    else once the write fails, whichever layer raised the error (torch.save's zip writer raises RuntimeError).
    The file gets the permissions the umask gives any new file.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    kept = "the previous version is intact" if os.path.exists(path) else "nothing was written"
    if size is not None and free_space(folder) < size:
        raise DiskFullError(path, size, free_space(folder), kept)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException as e:
        full = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or (
            isinstance(e, RuntimeError) and free_space(folder) < 1_000_000)
        if os.path.exists(tmp):
            os.remove(tmp)
        if full:
            raise DiskFullError(path, size, free_space(folder), kept) from e
        raise


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_csv_atomic(path: str, header: list[str], rows: list[list]) -> None:
    """A CSV file with Unix line ends, written through atomic_write."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    data = text.getvalue().encode()
    atomic_write(path, lambda f: f.write(data), size=len(data))


def save_figure(fig, path: str, dpi: int) -> None:
    """A matplotlib figure written through atomic_write, in the format its file name ends with."""
    atomic_write(path, lambda f: fig.savefig(f, format=os.path.splitext(path)[1][1:], dpi=dpi))
