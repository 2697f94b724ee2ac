"""The dataset tools behind `python dataloader.py --check / --make-demo / --import-cnmc`.

check_dataset: decode every image a dataset names and report each problem before a long run starts.
make_demo:     a synthetic dataset in exactly the course layout, for trying everything without the course data.
import_cnmc:   the public C-NMC 2019 release (fold_*/all|hem/UID_*.bmp) in the course layout, split by subject.
"""
from __future__ import annotations

import csv
import os
import random
import re
import shutil
from collections import Counter, defaultdict
from multiprocessing import Pool

import numpy as np
from PIL import Image

from files import CLASSES, IMAGE_EXTENSIONS, TEST_CSVS, DataError, check_both_classes, check_not_empty, read_csv, write_csv_atomic


def parallel_map(function, items: list, workers: int, chunksize: int) -> list:
    """Pool.map whose workers end by closing the pool, not by a SIGTERM (a caller may handle that signal)."""
    pool = Pool(max(1, workers))
    try:
        results = pool.map(function, items, chunksize=chunksize)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
    return results


# ----------------------------------------------------------------------------------------------------------
# --check


def inspect_image(path: str) -> tuple[str, tuple[int, int] | None, str | None, str | None]:
    """(path, size, mode, problem) after decoding the whole file."""
    if not os.path.isfile(path):
        return path, None, None, "missing"
    try:
        with Image.open(path) as img:
            img.load()
            return path, img.size, img.mode, None
    except Exception as e:  # any decoder error is a problem to report, not a crash
        return path, None, None, f"unreadable ({type(e).__name__}: {e})"


def check_dataset(root: str, workers: int = 1) -> int:
    """Print a summary of the dataset at root and every problem found; 0 if there is none, else 1."""
    problems: list[str] = []
    splits: dict[str, tuple[str, list[str], list[int] | None]] = {}  # name -> (its CSV, paths, labels)
    for name in ("train", "valid"):
        try:
            csv_path = os.path.join(root, f"{name}.csv")
            splits[name] = (csv_path, *read_csv(csv_path, labelled=True, problems=problems))
        except DataError as e:
            problems.append(str(e))
    test_csvs = [name for name in TEST_CSVS.values() if os.path.isfile(os.path.join(root, name))]
    if not test_csvs:
        problems.append(f"{root}: no test CSV ({', '.join(TEST_CSVS.values())})")
    for name in test_csvs:
        try:
            csv_path = os.path.join(root, name)
            splits[name] = (csv_path, *read_csv(csv_path, labelled=False))
        except DataError as e:
            problems.append(str(e))

    print(f"dataset at {os.path.abspath(root)}")
    for name, (csv_path, paths, labels) in splits.items():
        counts = Counter(labels or [])
        by_class = ", ".join(f"{counts[i]} {c}" for i, c in enumerate(CLASSES)) if labels is not None else "no labels"
        print(f"  {name:<20} {len(paths):>6} rows ({by_class})")
        try:
            check_not_empty(paths, csv_path)
            if name == "train":
                check_both_classes(labels, csv_path)
        except DataError as e:
            problems.append(str(e))
        duplicates = [p for p, n in Counter(paths).items() if n > 1]
        if duplicates:
            problems.append(f"{name}: {len(duplicates)} paths listed twice, e.g. {duplicates[0]}")

    files = sorted({os.path.normpath(os.path.join(root, p)) for _, paths, _ in splits.values() for p in paths})
    results = parallel_map(inspect_image, files, workers, chunksize=64)
    sizes = Counter(f"{s[0]}x{s[1]}" for _, s, _, _ in results if s)
    modes = Counter(m for _, _, m, _ in results if m)
    print(f"  {len(files)} image files: sizes {dict(sizes.most_common(5))}, modes {dict(modes)}")
    problems += [f"{path}: {problem}" for path, _, _, problem in results if problem]

    if problems:
        print(f"{len(problems)} problem{'s' if len(problems) > 1 else ''}:")
        for p in problems:
            print(f"  {p}")
        return 1
    print("no problems found")
    return 0


# ----------------------------------------------------------------------------------------------------------
# --make-demo


def smooth_noise(rng: np.random.Generator, side: int, cells: int) -> np.ndarray:
    """A random field with about `cells` blobs across, in [-1, 1]."""
    small = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(small, mode="F").resize((side, side), Image.BICUBIC)).clip(-1, 1)


def wobbly_radius(rng: np.random.Generator, phi: np.ndarray, radius: float, roughness: float, harmonics: int) -> np.ndarray:
    """A closed contour r(phi): radius modulated by random harmonics 2..harmonics, looked up per pixel."""
    table = np.linspace(-np.pi, np.pi, 1024, endpoint=False)
    r = np.ones_like(table)
    for k in range(2, harmonics + 1):
        r += rng.uniform(0, roughness) / k ** 0.5 * np.cos(k * table + rng.uniform(0, 2 * np.pi))
    index = ((phi + np.pi) * (1024 / (2 * np.pi))).astype(np.int32) % 1024
    return (radius * r).astype(np.float32)[index]


def draw_cell(seed: int, label: int, side: int = 450) -> np.ndarray:
    """One stained cell on black, (side, side, 3) uint8.

    The class shows in morphology, as in real smears, with every cue overlapping between classes:
    ALL blasts have a larger nucleus-to-cytoplasm ratio, a more irregular nuclear contour and fine chromatin
    with nucleoli; normal cells have more cytoplasm, an eccentric smooth nucleus and clumped chromatin.
    Stain colour, cell size and position vary per image and say nothing of the class.
    """
    rng = np.random.default_rng(seed)
    s = side / 450
    blast = label == 1
    w = min(side, int(360 * s))  # the window that holds any cell; the rest stays black
    top = (side - w) // 2
    yy, xx = np.mgrid[0:w, 0:w].astype(np.float32)
    cy, cx = w / 2 + np.clip(rng.normal(0, 12 * s, 2), -30 * s, 30 * s)
    dy, dx = yy - cy, xx - cx
    r, phi = np.hypot(dy, dx), np.arctan2(dy, dx)

    cell_radius = rng.uniform(70, 115) * s
    cell_edge = wobbly_radius(rng, phi, cell_radius, 0.10 if blast else 0.06, 6)
    nc_ratio = rng.uniform(0.74, 0.92) if blast else rng.uniform(0.52, 0.76)
    shift = rng.uniform(0, 0.10 if blast else 0.22) * cell_radius
    angle = rng.uniform(0, 2 * np.pi)
    ny, nx = dy - shift * np.sin(angle), dx - shift * np.cos(angle)
    nucleus_edge = wobbly_radius(rng, np.arctan2(ny, nx), nc_ratio * cell_radius, 0.22 if blast else 0.08, 9 if blast else 4)
    in_cell = np.clip((cell_edge - r) / (3 * s), 0, 1)
    in_nucleus = np.clip((nucleus_edge - np.hypot(ny, nx)) / (2 * s), 0, 1) * in_cell

    grain = 60 if blast else 14  # fine versus clumped chromatin
    chromatin = 1 + (0.10 if blast else 0.28) * smooth_noise(rng, w, round(grain * w / side))
    if blast:
        for _ in range(rng.integers(1, 4)):
            t, rad = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.5) * nc_ratio * cell_radius
            spot = np.hypot(ny - rad * np.sin(t), nx - rad * np.cos(t)) < rng.uniform(5, 11) * s
            chromatin = np.where(spot, chromatin * 1.35, chromatin)
    stain = (rng.uniform(0.75, 1.2) * rng.uniform(0.9, 1.1, 3)).astype(np.float32)
    cytoplasm = np.array([150, 120, 175], np.float32) * stain * (1 + 0.05 * smooth_noise(rng, w, 8))[..., None]
    nucleus = np.array([95, 42, 115], np.float32) * stain * chromatin[..., None]
    cell = in_cell[..., None] * ((1 - in_nucleus[..., None]) * cytoplasm + in_nucleus[..., None] * nucleus)
    cell += rng.standard_normal(cell.shape, dtype=np.float32) * 2 * in_cell[..., None]
    img = np.zeros((side, side, 3), np.uint8)
    img[top : top + w, top : top + w] = np.clip(cell, 0, 255)
    return img


def write_cell(job: tuple[str, int, int, int]) -> None:
    path, seed, label, side = job
    Image.fromarray(draw_cell(seed, label, side)).save(path)


def make_demo(out: str, sizes: tuple[int, int, int] = (600, 150, 150), seed: int = 0, side: int = 450, workers: int = 1) -> None:
    """Write a synthetic dataset at out in the course layout: CSVs, ./new_dataset/<split>/<i>.bmp, ~68% ALL."""
    rng = random.Random(seed)
    jobs, labelled = [], {}
    for split_index, (split, n) in enumerate(zip(("train", "valid", "test"), sizes)):
        os.makedirs(os.path.join(out, "new_dataset", split), exist_ok=True)
        labels = [1] * round(0.68 * n) + [0] * (n - round(0.68 * n))
        rng.shuffle(labels)
        labelled[split] = [(f"./new_dataset/{split}/{i}.bmp", label) for i, label in enumerate(labels)]
        for i, label in enumerate(labels):
            jobs.append((os.path.join(out, "new_dataset", split, f"{i}.bmp"), seed * 10_000_019 + split_index * 1_000_003 + i, label, side))
    parallel_map(write_cell, jobs, workers, chunksize=8)
    write_csv_atomic(os.path.join(out, "train.csv"), ["Path", "label"], labelled["train"])
    write_csv_atomic(os.path.join(out, "valid.csv"), ["Path", "label"], labelled["valid"])
    for name in TEST_CSVS.values():
        rows = [[path] for path, _ in labelled["test"]]
        rng.shuffle(rows)
        write_csv_atomic(os.path.join(out, name), ["Path"], rows)
    print(f"wrote {sum(sizes)} synthetic {side}x{side} cells to {out} ({sizes[0]} train, {sizes[1]} valid, {sizes[2]} test)")


# ----------------------------------------------------------------------------------------------------------
# --import-cnmc

CNMC_NAME = re.compile(r"^UID_(H?\d+)_(\d+)_(\d+)_(all|hem)\.(bmp|png|jpe?g)$", re.IGNORECASE)


def parse_cnmc_name(name: str) -> tuple[str, int] | None:
    """(subject, label) of a release file name such as UID_H10_43_1_hem.bmp, or None if it does not parse."""
    m = CNMC_NAME.match(name)
    if m is None:
        return None
    return m.group(1).upper(), int(m.group(4).lower() == "all")


def find_cnmc_cells(src: str) -> tuple[list[tuple[str, str, int]], list[str]]:
    """(path, subject, label) of every cell image under an all/ or hem/ folder of src, and the unparsed files."""
    cells, unparsed = [], []
    for folder, _, names in sorted(os.walk(src)):
        kind = os.path.basename(folder).lower()
        if kind not in ("all", "hem"):
            continue
        for name in sorted(names):
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            parsed = parse_cnmc_name(name)
            path = os.path.join(folder, name)
            if parsed is None or parsed[1] != int(kind == "all"):
                unparsed.append(path)
            else:
                cells.append((path, *parsed))
    return cells, unparsed


def assign_subjects(cells: list[tuple[str, str, int]], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """subject -> split, every subject in one split, each class spread over the splits in the given fractions.

    Greedy per class: subjects from largest to smallest go to the split furthest below its target (on a tie, the
    split with fewer cells so far), which is as balanced as whole subjects allow and puts the largest subjects
    of a class in different splits.
    """
    count = Counter((subject, label) for _, subject, label in cells)
    rng = random.Random(seed)
    assignment: dict[str, str] = {}
    cells_in = dict.fromkeys(fractions, 0)
    for label in (0, 1):
        subjects = [s for (s, l) in count if l == label]
        rng.shuffle(subjects)
        subjects.sort(key=lambda s: -count[s, label])
        total = sum(count[s, label] for s in subjects)
        have = dict.fromkeys(fractions, 0)
        for subject in subjects:
            split = max(fractions, key=lambda k: (fractions[k] * total - have[k], -cells_in[k]))
            assignment[subject] = split
            have[split] += count[subject, label]
            cells_in[split] += count[subject, label]
    return assignment


def place(src: str, dst: str) -> None:
    """Hard link, else symbolic link, else copy."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    for link in (os.link, lambda a, b: os.symlink(os.path.abspath(a), b)):
        try:
            link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def import_cnmc(src: str, out: str, split: str = "subject", valid_frac: float = 0.2, test_frac: float = 0.2, seed: int = 0) -> dict:
    """Write the release at src in the course layout under out; returns {path: split}."""
    if not (0 <= valid_frac and 0 <= test_frac and valid_frac + test_frac < 1):
        raise DataError(f"--valid-frac {valid_frac} and --test-frac {test_frac}: each is a share of the cells, at least 0, "
                        "and the two must leave some for train (add up to less than 1)")
    cells = read_release(src, out)
    fractions = {"train": 1 - valid_frac - test_frac, "valid": valid_frac, "test": test_frac}
    if split == "subject":
        subject_split = assign_subjects(cells, fractions, seed)
        split_of = {path: subject_split[subject] for path, subject, _ in cells}
    else:
        rng = random.Random(seed)
        split_of = {}
        for label in (0, 1):
            paths = [p for p, _, l in cells if l == label]
            rng.shuffle(paths)
            n_valid, n_test = round(valid_frac * len(paths)), round(test_frac * len(paths))
            split_of.update({p: "valid" if i < n_valid else "test" if i < n_valid + n_test else "train" for i, p in enumerate(paths)})
    prelim = read_prelim_test(src, {subject for _, subject, _ in cells})  # before anything is written: it may be refused
    print(f"imported {len(cells)} cells of {len({s for _, s, _ in cells})} subjects from {src} to {out} ({split} split)")
    write_layout(out, cells, split_of, seed)
    print(f"  subjects per split: {os.path.join(out, 'subjects.csv')}; test labels: {os.path.join(out, 'test_labels.csv')}")
    if prelim is None:
        print(f"  no preliminary test phase beside {src} ({PRELIM_LABELS} and its images): prelim_test.csv not written")
    else:
        write_prelim_test(out, prelim)
    return split_of


PRELIM_IMAGES = os.path.join("validation_data", "C-NMC_test_prelim_phase_data")
PRELIM_LABELS = os.path.join("validation_data", "C-NMC_test_prelim_phase_data_labels.csv")


def read_prelim_test(src: str, training_subjects: set[str]) -> list[tuple[str, str, int]] | None:
    """(image, subject, label) of the release's preliminary test phase (validation_data/: 1,867 cells of 28 subjects
    that training_data does not hold, named <n>.bmp, labelled in C-NMC_test_prelim_phase_data_labels.csv by their
    original names): the challenge's own unseen patients. src is the release's top folder or its training_data; None
    where the copy lacks that folder."""
    top = next((d for d in (src, os.path.dirname(os.path.abspath(src))) if os.path.isfile(os.path.join(d, PRELIM_LABELS))), None)
    if top is None:
        return None
    labels_csv = os.path.join(top, PRELIM_LABELS)
    with open(labels_csv, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if [h.strip() for h in reader.fieldnames or []][:3] != ["Patient_ID", "new_names", "labels"]:
            raise DataError(f"{labels_csv}: header is {','.join(reader.fieldnames or []) or '(empty file)'}, expected "
                            "Patient_ID,new_names,labels as in the C-NMC release")
        rows = []
        for line, row in enumerate(reader, start=2):
            parsed = parse_cnmc_name(row["Patient_ID"].strip())
            image = os.path.join(top, PRELIM_IMAGES, row["new_names"].strip())
            if parsed is None or row["labels"].strip() != str(parsed[1]):
                raise DataError(f"{labels_csv}, line {line}: {row['Patient_ID']!r} with label {row['labels']!r} is not a C-NMC "
                                "name (UID_<subject>_<image>_<cell>_<all|hem>.bmp) whose class is its label (1 all, 0 hem)")
            if not os.path.isfile(image):
                raise DataError(f"{labels_csv}, line {line}: its image {image} is missing")
            rows.append((image, *parsed))
    shared = sorted({subject for _, subject, _ in rows} & training_subjects)
    if shared:
        raise DataError(f"{labels_csv}: subjects {', '.join(shared)} are also in {src}'s training cells; the preliminary test "
                        "phase holds other patients, so this is not the release's own copy")
    return rows


def write_prelim_test(out: str, rows: list[tuple[str, str, int]]) -> None:
    """The preliminary test phase linked under out/new_dataset/prelim_test/ and listed in out/prelim_test.csv
    (Path,label,subject), its patients printed."""
    table = []
    for image, subject, label in rows:
        name = f"./new_dataset/prelim_test/{os.path.basename(image)}"
        place(image, os.path.join(out, name))
        table.append([name, label, subject])
    write_csv_atomic(os.path.join(out, "prelim_test.csv"), ["Path", "label", "subject"], table)
    subjects = Counter((subject, label) for _, subject, label in rows)
    print(f"  prelim_test.csv: the challenge's preliminary test phase, {len(rows)} cells of {len(subjects)} patients that are in "
          f"no other split ({sum(1 for _, l in subjects if l == 0)} normal: "
          f"{sum(n for (_, l), n in subjects.items() if l == 0)} cells; {sum(1 for _, l in subjects if l == 1)} ALL: "
          f"{sum(n for (_, l), n in subjects.items() if l == 1)} cells)")
    for label in (0, 1):
        print(f"    {CLASSES[label]}: " + ", ".join(f"{s} ({n})" for (s, l), n in sorted(subjects.items()) if l == label))


def import_folds(src: str, out: str, folds: int, seed: int = 0) -> dict[str, list[str]]:
    """Patient-level cross-validation: out/fold_0 .. fold_<folds-1>, each in the course layout, whose valid split
    holds one group of subjects and whose train split holds every other subject. Each subject is held out in
    exactly one fold. The test CSVs list the valid cells without labels, so predict.py runs on a fold too.
    Returns {fold name: its held-out subjects}."""
    if folds < 2:
        raise DataError(f"--folds {folds}: patient-level cross-validation needs at least 2 folds")
    cells = read_release(src, out)
    names = [f"fold_{k}" for k in range(folds)]
    fold_of = assign_subjects(cells, dict.fromkeys(names, 1 / folds), seed)
    held_out = {name: sorted({s for s, f in fold_of.items() if f == name}) for name in names}
    if any(not subjects for subjects in held_out.values()):
        raise DataError(f"{src}: {len(fold_of)} subjects cannot fill {folds} folds; use fewer --folds")
    print(f"imported {len(cells)} cells of {len(fold_of)} subjects from {src} to {out} as {folds} patient-level folds")
    for name in names:
        split_of = {path: "valid" if fold_of[subject] == name else "train" for path, subject, _ in cells}
        print(f"{name} (valid: the subjects {', '.join(held_out[name])})")
        write_layout(os.path.join(out, name), cells, split_of, seed)
    write_csv_atomic(os.path.join(out, "folds.csv"), ["fold", "subject", "label", "cells"],
                     [[fold_of[s], s, CLASSES[label], n] for (s, label), n in sorted(Counter((s, l) for _, s, l in cells).items(),
                                                                                     key=lambda item: (fold_of[item[0][0]], item[0]))])
    print(f"  held-out subjects per fold: {os.path.join(out, 'folds.csv')}")
    return held_out


def read_release(src: str, out: str) -> list[tuple[str, str, int]]:
    """(path, subject, label) of every cell of the release at src, after listing unparsed names in out/unparsed.txt;
    refuses an out that already holds a dataset."""
    cells, unparsed = find_cnmc_cells(src)
    if not cells:
        raise DataError(f"{src}: no cell images under all/ or hem/ folders named like UID_11_10_1_all.bmp")
    if os.path.exists(os.path.join(out, "train.csv")) or os.path.exists(os.path.join(out, "fold_0", "train.csv")):
        raise DataError(f"{out} already holds a dataset (train.csv); choose another --out or delete it first")
    if unparsed:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "unparsed.txt"), "w") as f:
            f.write("\n".join(unparsed) + "\n")
        print(f"{len(unparsed)} files not imported: name not UID_<subject>_<image>_<cell>_<all|hem> or not matching "
              f"its folder, e.g. {unparsed[0]} (all listed in {os.path.join(out, 'unparsed.txt')})")
    return cells


def write_layout(out: str, cells: list[tuple[str, str, int]], split_of: dict[str, str], seed: int) -> None:
    """Link the cells into out/new_dataset/<split>/ and write train.csv, valid.csv, the test CSVs (the test split,
    else the valid cells, unlabelled), test_labels.csv when there is a test split, and subjects.csv; print the table."""
    rows: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for path, subject, label in cells:
        name = f"./new_dataset/{split_of[path]}/{os.path.basename(path)}"
        place(path, os.path.join(out, name))
        rows[split_of[path]].append((name, label))
    write_csv_atomic(os.path.join(out, "train.csv"), ["Path", "label"], rows["train"])
    write_csv_atomic(os.path.join(out, "valid.csv"), ["Path", "label"], rows["valid"])
    if rows["test"]:
        write_csv_atomic(os.path.join(out, "test_labels.csv"), ["Path", "label"], rows["test"])
    test_rows = [[p] for p, _ in rows["test"] or rows["valid"]]
    random.Random(seed).shuffle(test_rows)
    for name in TEST_CSVS.values():
        write_csv_atomic(os.path.join(out, name), ["Path"], test_rows)

    table = Counter((split_of[path], subject, label) for path, subject, label in cells)
    write_csv_atomic(os.path.join(out, "subjects.csv"), ["split", "subject", "label", "cells"],
                     [[sp, subject, CLASSES[label], n] for (sp, subject, label), n in sorted(table.items())])
    print(f"  {'split':<6} {'hem cells':>9} {'hem subj':>8} {'ALL cells':>9} {'ALL subj':>8}")
    for sp in ("train", "valid", "test"):
        stats = []
        for label in (0, 1):
            stats += [sum(n for (s, _, l), n in table.items() if s == sp and l == label),
                      len({subj for (s, subj, l) in table if s == sp and l == label})]
        if any(stats):
            print(f"  {sp:<6} {stats[0]:>9} {stats[1]:>8} {stats[2]:>9} {stats[3]:>8}")
