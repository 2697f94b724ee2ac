"""Patient-level cross-validation of one training recipe: the yardstick for patients the model has never seen.

    python dataloader.py --import-cnmc ../shared/cnmc --out data/cnmc-folds --folds 3
    python experiments/folds.py NAME --seeds 0 1 -- --image-size 128 --epochs 12 --cache ram [any train.py flags]
    python experiments/folds.py --table NAME [NAME ...] [--scorings plain adapt-bn]    the table of EXPERIMENTS.md

For every fold (data/cnmc-folds/fold_*) and seed, train.py trains on the fold's train subjects into
checkpoints/folds/NAME/fold_<k>-seed<s> (a finished run is skipped, an interrupted one resumed), and evaluate.py
scores its last.pt on the fold's held-out subjects six ways: plain, --tta, --adapt-bn, and both; and plain and with
--adapt-bn on the held-out cells thinned to the class mix of the fold's training cells (train-mix). Printed per
scoring: weighted F1, hem and ALL recall per fold (mean over seeds), the mean and the worst fold, the seed-to-seed
spread of the fold mean, the held-out patients called right by the majority of their cells (and which were not), and
the share of each held-out patient's cells called right.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import random
import statistics
import subprocess
import sys
from collections import defaultdict

from sklearn.metrics import f1_score, recall_score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from files import read_csv, write_csv_atomic  # noqa: E402
from patients import cell_subjects, share_called_right, subject_table  # noqa: E402

# evaluate.py's flags per scoring; the train-mix scorings score train_mix_csv's cells instead of the whole valid set
SCORINGS = {"plain": [], "tta": ["--tta"], "adapt-bn": ["--adapt-bn"], "adapt-bn+tta": ["--adapt-bn", "--tta"],
            "train-mix": [], "train-mix+adapt-bn": ["--adapt-bn"]}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="*", help="the recipe's name (with --table: the recipes to tabulate)")
    parser.add_argument("--folds-root", default=os.path.join("data", "cnmc-folds"), help="folder of fold_* datasets (default: data/cnmc-folds)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds, each run on every fold (default: 0)")
    parser.add_argument("--output-dir", default=os.path.join("checkpoints", "folds"), help="runs go to OUTPUT_DIR/NAME/ (default: checkpoints/folds)")
    parser.add_argument("--results-dir", default=os.path.join("results", "folds"), help="scores go to RESULTS_DIR/NAME/ (default: results/folds)")
    parser.add_argument("--workers", type=int, default=2, help="data-loading processes of evaluate.py (default: 2)")
    parser.add_argument("--table", action="store_true", help="print the Markdown table of the named recipes' scores, run nothing")
    parser.add_argument("--scorings", nargs="+", choices=list(SCORINGS), default=list(SCORINGS),
                        help="the scorings --table shows (default: all six)")
    return parser


def run(cmd: list[str], log: str) -> None:
    with open(log, "a") as f:
        print("$ " + " ".join(cmd), file=f, flush=True)
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode != 0:
            raise SystemExit(f"error: {' '.join(cmd)} failed; see {log}")


def train_and_score(name: str, fold: str, seed: int, train_flags: list[str], args: argparse.Namespace) -> None:
    """Train one fold and seed (unless finished), then score its last.pt every way not scored yet."""
    run_name = f"{os.path.basename(fold)}-seed{seed}"
    out = os.path.join(args.output_dir, name)
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, run_name + ".log")
    last = os.path.join(out, run_name, "last.pt")
    if os.path.isfile(last):  # train.py goes on to the run's --epochs, and stops at once if it is there
        run([sys.executable, "train.py", "--output-dir", out, "--run-name", run_name, "--resume"], log)
    else:
        run([sys.executable, "train.py", "--data-root", fold, "--output-dir", out, "--run-name", run_name, "--seed", str(seed),
             *train_flags], log)
    for scoring, flags in SCORINGS.items():
        if not os.path.isfile(os.path.join(args.results_dir, name, scoring, run_name, "metrics.json")):
            scored_csv = ["--csv", train_mix_csv(fold)] if scoring.startswith("train-mix") else []
            run([sys.executable, "evaluate.py", "--checkpoint", last, "--out-dir", os.path.join(args.results_dir, name, scoring),
                 "--workers", str(args.workers), "--gallery", "0", *flags, *scored_csv], log)


def train_mix_csv(fold: str) -> str:
    """FOLD/valid_train_mix.csv, written once: the held-out cells with the class they have too much of thinned at
    random (seed 0) to the class shares of the fold's training cells, those of every training batch unless a sampler
    balances the classes. --adapt-bn re-estimates BatchNorm on the batch it scores, so this is the batch it assumes."""
    path = os.path.join(fold, "valid_train_mix.csv")
    if not os.path.isfile(path):
        share = statistics.mean(read_csv(os.path.join(fold, "train.csv"), labelled=True)[1])  # of ALL
        paths, labels = read_csv(os.path.join(fold, "valid.csv"), labelled=True)
        cells = {c: [i for i, label in enumerate(labels) if label == c] for c in (0, 1)}
        n_all = min(len(cells[1]), round(len(cells[0]) * share / (1 - share)))
        n_hem = min(len(cells[0]), round(n_all * (1 - share) / share))
        rng = random.Random(0)
        kept = sorted(rng.sample(cells[0], n_hem) + rng.sample(cells[1], n_all))
        write_csv_atomic(path, ["Path", "label"], [[paths[i], labels[i]] for i in kept])
    return path


def load_scores(name: str, results_dir: str) -> dict:
    """{scoring: {fold: {seed: (metrics, patients)}}} from evaluate.py's files; patients is patients.subject_table's."""
    scores: dict = defaultdict(lambda: defaultdict(dict))
    for path in sorted(glob.glob(os.path.join(results_dir, name, "*", "fold_*-seed*", "metrics.json"))):
        folder = os.path.dirname(path)
        scoring, (fold, seed) = os.path.basename(os.path.dirname(folder)), os.path.basename(folder).rsplit("-seed", 1)
        with open(path) as f:
            metrics = json.load(f)
        cells, labels, _, probs = read_predictions(os.path.join(folder, "predictions.csv"))
        scores[scoring][fold][int(seed)] = (metrics, subject_table(cell_subjects(cells), probs, labels))
    return scores


def ensemble_scores(name: str, results_dir: str, scores_of_seeds: dict) -> dict:
    """load_scores' form, seed 0 standing for the ensemble of every seed in scores_of_seeds (load_scores' answer):
    each cell's P(ALL) averaged over the seeds, as predict.py averages checkpoints. Only scorings with two seeds or
    more on every fold."""
    scores: dict = defaultdict(lambda: defaultdict(dict))
    for scoring, by_fold in scores_of_seeds.items():
        if min(len(seeds) for seeds in by_fold.values()) < 2:
            continue
        for fold, seeds in by_fold.items():
            runs = [read_predictions(os.path.join(results_dir, name, scoring, f"{fold}-seed{seed}", "predictions.csv"))
                    for seed in sorted(seeds)]
            cells, labels, _, _ = runs[0]
            if any(other[0] != cells for other in runs[1:]):
                raise SystemExit(f"error: the seeds of {name}/{scoring}/{fold} scored different cells; score them again")
            probs = [statistics.mean(p) for p in zip(*(run[3] for run in runs))]
            preds = [int(p >= 0.5) for p in probs]
            metrics = {"weighted_f1": f1_score(labels, preds, average="weighted"),
                       "recall_hem": recall_score(labels, preds, pos_label=0), "recall_ALL": recall_score(labels, preds, pos_label=1)}
            scores[scoring][fold][0] = (metrics, subject_table(cell_subjects(cells), probs, labels))
    return scores


def read_predictions(path: str) -> tuple[list[str], list[int], list[int], list[float]]:
    """The cells, labels, predictions and P(ALL) of evaluate.py's predictions.csv."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return ([r["path"] for r in rows], [int(r["label"]) for r in rows], [int(r["pred"]) for r in rows],
            [float(r["prob_ALL"]) for r in rows])


def share_right(patients) -> dict[str, float]:
    """{subject: the share of its cells called right} from a subject_table."""
    return dict(zip(patients["subject"], share_called_right(patients)))


def patients_right(scores_of_folds: dict, folds: list[str], seed: int) -> int:
    """Held-out patients of every fold called right by the majority of their cells, in one seed."""
    return sum(int(scores_of_folds[f][seed][1]["right"].sum()) for f in folds)


def count_range(counts: list[int], total: int) -> str:
    """'34 of 35', or '33–34 of 35' over seeds that differ."""
    low, high = min(counts), max(counts)
    return f"{low} of {total}" if low == high else f"{low}–{high} of {total}"


def summarise(scores_of_folds: dict, folds: list[str] | None = None) -> dict | None:
    """Fold-mean and worst-fold weighted F1 (per seed, then over seeds), mean hem and ALL recall, over the seeds scored
    on every fold of folds (default: those scored). None where a fold or every such seed is missing: a mean over
    fewer folds than the other rows would not compare with them."""
    folds = folds or sorted(scores_of_folds)
    if any(f not in scores_of_folds for f in folds):
        return None
    seeds = sorted(set.intersection(*(set(scores_of_folds[f]) for f in folds)))
    if not seeds:
        return None
    fold_means = [statistics.mean(scores_of_folds[f][s][0]["weighted_f1"] for f in folds) for s in seeds]
    worst = [min(scores_of_folds[f][s][0]["weighted_f1"] for f in folds) for s in seeds]
    per_fold = {f: statistics.mean(scores_of_folds[f][s][0]["weighted_f1"] for s in seeds) for f in folds}
    recall = {c: statistics.mean(scores_of_folds[f][s][0][f"recall_{c}"] for f in folds for s in seeds) for c in ("hem", "ALL")}
    patients = count_range([patients_right(scores_of_folds, folds, s) for s in seeds],
                           sum(len(scores_of_folds[f][seeds[0]][1]) for f in folds))
    return {"seeds": seeds, "mean": statistics.mean(fold_means), "spread": max(fold_means) - min(fold_means),
            "worst": statistics.mean(worst), "per_fold": per_fold, "recall": recall, "patients": patients}


def report(name: str, scores: dict) -> None:
    folds = sorted({f for by_fold in scores.values() for f in by_fold})
    for scoring in SCORINGS:
        if scoring not in scores:
            continue
        s = summarise(scores[scoring], folds)
        if s is None:
            print(f"\n{name}, scored {scoring}: {unfinished(scores[scoring], folds)}")
            continue
        print(f"\n{name}, scored {scoring} (seeds {', '.join(map(str, s['seeds']))}): weighted F1 fold mean {s['mean']:.3f} "
              f"(seed spread {s['spread']:.3f}), worst fold {s['worst']:.3f}; recall hem {s['recall']['hem']:.3f} ALL {s['recall']['ALL']:.3f}; "
              f"patients called right {s['patients']}")
        for fold, by_seed in sorted(scores[scoring].items()):
            seeds = sorted(by_seed)
            metrics = [by_seed[seed][0] for seed in seeds]
            subjects, wrong = defaultdict(list), defaultdict(int)
            for seed in seeds:
                patients = by_seed[seed][1]
                for subject, share in share_right(patients).items():
                    subjects[subject].append(share)
                for subject in patients["subject"][patients["right"] == 0]:
                    wrong[subject] += 1
            called = count_range([int(by_seed[seed][1]["right"].sum()) for seed in seeds], len(by_seed[seeds[0]][1]))
            missed = ", ".join(f"{sub} in {n} of {len(seeds)} seeds" for sub, n in sorted(wrong.items()))
            print(f"  {fold}: weighted F1 {statistics.mean(m['weighted_f1'] for m in metrics):.3f}  "
                  f"recall hem {statistics.mean(m['recall_hem'] for m in metrics):.3f} ALL {statistics.mean(m['recall_ALL'] for m in metrics):.3f}  "
                  f"patients right {called}" + (f" (wrong: {missed})" if missed else "") + "\n    cells right per patient: "
                  + " ".join(f"{sub} {statistics.mean(a):.2f}" for sub, a in sorted(subjects.items())))


def unfinished(scores_of_folds: dict, folds: list[str]) -> str:
    """What keeps a scoring out of the summaries, and what to do."""
    scored = ", ".join(f"{f} seeds {' '.join(map(str, sorted(scores_of_folds[f])))}" for f in folds if f in scores_of_folds)
    return (f"not scored on every fold with one seed (scored: {scored or 'none'}); run the recipe again with "
            "experiments/folds.py NAME --seeds ... to finish its runs and scorings")


def table(names: list[str], results_dir: str, scorings: list[str] | None = None) -> None:
    """One row per recipe and scoring: fold mean (± half the seed-to-seed range of it), worst fold, each fold, recall;
    and, for a recipe run with several seeds, the same for the ensemble of its seeds."""
    scores = {name: load_scores(name, results_dir) for name in names}
    folds = sorted({f for by_scoring in scores.values() for by_fold in by_scoring.values() for f in by_fold})
    missing = [name for name in names if not scores[name]]
    if missing:
        raise SystemExit(f"error: no scores under {results_dir}/ for {', '.join(missing)}; run them first: "
                         "python experiments/folds.py NAME -- [train.py flags]")
    print("| recipe | scored | weighted F1: fold mean ± seed spread | worst fold | " + " | ".join(folds)
          + " | recall hem / ALL | patients called right |")
    print("|---|---|---|---|" + "---|" * len(folds) + "---|---|")
    for name in names:
        ensemble = ensemble_scores(name, results_dir, scores[name])
        for label, by_scoring in ((name, scores[name]), (f"{name}, ensemble of its seeds", ensemble)):
            for scoring in scorings or SCORINGS:
                if scoring not in by_scoring:
                    continue
                s = summarise(by_scoring[scoring], folds)
                if s is None:
                    print(f"note: no row for {label}, {scoring}: {unfinished(by_scoring[scoring], folds)}", file=sys.stderr)
                    continue
                spread = f" ± {s['spread'] / 2:.3f}" if len(s["seeds"]) > 1 else ""
                print(f"| {label} | {scoring} | {s['mean']:.3f}{spread} | {s['worst']:.3f} | "
                      + " | ".join(f"{s['per_fold'][f]:.3f}" for f in folds)
                      + f" | {s['recall']['hem']:.3f} / {s['recall']['ALL']:.3f} | {s['patients']} |")


def main(argv: list[str]) -> int:
    own, train_flags = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = get_args_parser().parse_args(own)
    if args.table:
        table(args.name, args.results_dir, args.scorings)
        return 0
    if len(args.name) != 1:
        raise SystemExit("error: name one recipe to run (or --table NAME ...)")
    folds = sorted(glob.glob(os.path.join(args.folds_root, "fold_*")))
    if not folds:
        raise SystemExit(f"error: no fold_* under {args.folds_root}; make them with\n"
                         f"  python dataloader.py --import-cnmc ../shared/cnmc --out {args.folds_root} --folds 3")
    name = args.name[0]
    for seed in args.seeds:
        for fold in folds:
            train_and_score(name, fold, seed, train_flags, args)
    report(name, load_scores(name, args.results_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
