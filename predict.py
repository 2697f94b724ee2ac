"""Write the Kaggle submission (one row per test image, in the test CSV's order), or score a folder of new cells.

    python predict.py --model resnet18                          checkpoints/resnet18/best.pt on resnet_18_test.csv
    python predict.py --checkpoint checkpoints/demo/best.pt --tta --adapt-bn
    python predict.py --checkpoint checkpoints/a/best.pt checkpoints/b/best.pt    an ensemble, averaged in probability
    python predict.py --checkpoint checkpoints/cnmc-r18/last.pt --images new_cells/ --by-subject

The submission has the header ID,label: ID is the test CSV's Path string unchanged, label 0 (hem) or 1 (ALL). With
--images, every image under the folder is scored instead, and the output has the header path,label,prob_ALL. With
--by-subject, <output>_subjects.csv also gives each patient's verdict: the majority of its cells. Every file is written
atomically: a missing or unreadable image stops the run and leaves no partial file.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from checkpoints import (CheckpointError, checkpoint_data_root, find_runs, load_checkpoint, model_from_checkpoint, refuse_other_models,
                         run_name_of)
from cli import add_scoring_flags, run_main
from dataloader import ImageFiles, RetinopathyLoader, find_images, find_test_csv
from devices import keep_freed_memory, resolve_device
from files import TEST_CSVS, read_csv, write_csv_atomic
from inference import adapt_to_dataset, dataset_logits, warn_if_class_balanced
from patients import cell_subjects, subject_table


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(TEST_CSVS), help="use checkpoints/<model>/best.pt (or the only run of this model); with --checkpoint, "
                        "every checkpoint must be of this model")
    parser.add_argument("--checkpoint", nargs="+", help="checkpoint file(s); several are averaged in probability")
    parser.add_argument("--checkpoints-dir", default="checkpoints", help="where the run folders are (default: checkpoints)")
    parser.add_argument("--data-root", help="dataset folder (default: the one the first run was trained on)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--test-csv", help="test CSV (default: the model's resnet_<n>_test.csv in the data root, or the only one)")
    source.add_argument("--images", metavar="DIR",
                        help="score every image under DIR and its subfolders (.bmp .png .jpg .jpeg .tif), no CSV needed; "
                             "the output has the columns path,label,prob_ALL")
    parser.add_argument("--output", help="output CSV (default: submissions/<run-name>.csv)")
    parser.add_argument("--probs", help="also write ID,prob_ALL to this file; the submission stays exact (not with --images)")
    parser.add_argument("--by-subject", action="store_true",
                        help="also write <output>_subjects.csv and print it: each patient's cells, the share called ALL, the "
                             "mean P(ALL) and the verdict (ALL where at least half its cells are called ALL); patients from a "
                             "subject column of --test-csv or from C-NMC file names (UID_<subject>_...)")
    parser.add_argument("--tta", action="store_true", help="average over the four flips of each image (see README for what it gains)")
    add_scoring_flags(parser)
    return parser


def pick_checkpoints(args: argparse.Namespace) -> list[str]:
    if args.checkpoint:
        return args.checkpoint
    if args.model is None:
        raise CheckpointError("name a --model or one or more --checkpoint files")
    own = os.path.join(args.checkpoints_dir, args.model, "best.pt")
    if os.path.isfile(own):
        return [own]
    runs = find_runs(args.checkpoints_dir, args.model)
    if len(runs) == 1:
        return [os.path.join(runs[0], "best.pt")]
    if not runs:
        raise CheckpointError(f"no {args.model} run with a best.pt under {args.checkpoints_dir}/; train one: python train.py --model {args.model}")
    raise CheckpointError(f"several {args.model} runs ({', '.join(map(os.path.basename, runs))}): pick one with --checkpoint")


def main(args: argparse.Namespace) -> int:
    if args.images and args.probs:
        raise SystemExit("error: --probs is for the Kaggle submission: with --images the output has prob_ALL already")
    device = resolve_device(args.device)
    keep_freed_memory(device)
    images = find_images(args.images) if args.images else None  # before any checkpoint is read: a wrong folder fails fast
    paths = pick_checkpoints(args)
    checkpoints = [load_checkpoint(p) for p in paths]
    if args.model:  # each model has its own Kaggle competition: a submission for one made by another is a mistake
        refuse_other_models(args.model, [(p, c["model_name"]) for p, c in zip(paths, checkpoints)],
                            " and the checkpoints choose the test CSV")
    if images is not None:
        ids, test_csv, source = images, None, f"the {len(images)} images under {args.images}"
    else:
        root = checkpoint_data_root(checkpoints[0], args.data_root)
        test_csv = args.test_csv or find_test_csv(root, args.model or checkpoints[0]["model_name"])
        ids, _ = read_csv(test_csv, labelled=False)
        source = test_csv

    prob_all = torch.zeros(len(ids))
    for path, checkpoint in zip(paths, checkpoints):
        model, preprocess = model_from_checkpoint(checkpoint, device)
        dataset = (ImageFiles(images, preprocess) if images is not None else
                   RetinopathyLoader(root, "test", preprocess=preprocess, output="uint8", csv_path=test_csv))
        if args.adapt_bn:
            warn_if_class_balanced(checkpoint, path)
            model = adapt_to_dataset(model, preprocess, dataset, device, args.batch_size, args.workers)
        prob_all += dataset_logits(model, preprocess, dataset, device, args.batch_size, args.workers, args.tta).softmax(1)[:, 1]
        print(f"{path}: {checkpoint['model_name']}, epoch {checkpoint['epoch']}, best valid {checkpoint.get('metric', 'acc')} "
              f"{checkpoint.get('best_metric', float('nan')):.4f}")
    prob_all /= len(paths)
    labels = (prob_all >= 0.5).long().tolist()

    output = args.output or os.path.join("submissions", "+".join(run_name_of(p) for p in paths) + ".csv")
    if images is not None:
        write_csv_atomic(output, ["path", "label", "prob_ALL"], [[i, y, repr(p)] for i, y, p in zip(ids, labels, prob_all.tolist())])
    else:
        write_csv_atomic(output, ["ID", "label"], [[i, y] for i, y in zip(ids, labels)])
    if args.probs:
        write_csv_atomic(args.probs, ["ID", "prob_ALL"], [[i, repr(p)] for i, p in zip(ids, prob_all.tolist())])
    print(f"wrote {output}: {len(ids)} rows from {source} ({sum(labels)} ALL, {len(labels) - sum(labels)} hem)"
          + (f"; probabilities in {args.probs}" if args.probs else ""))
    if args.by_subject:
        write_subjects(ids, test_csv, prob_all.numpy(), output)
    return 0


def write_subjects(ids: list[str], test_csv: str | None, prob_all: np.ndarray, output: str) -> None:
    """--by-subject: <output stem>_subjects.csv, one row per patient, printed too; nothing where no patient is known."""
    subjects = cell_subjects(ids, test_csv)
    if subjects is None:
        print("--by-subject: the cells name no patient (no subject column in the test CSV, and not every file is named "
              "like the C-NMC release, UID_<subject>_<image>_<cell>_<all|hem>.bmp); no per-patient file written")
        return
    table = subject_table(subjects, prob_all)
    path = os.path.splitext(output)[0] + "_subjects.csv"
    write_csv_atomic(path, list(table.columns), table.astype(object).values.tolist())
    print(f"wrote {path}: {len(table)} patients, {int(table['call'].sum())} called ALL by the majority of their cells")
    print(table.to_string(index=False, formatters={"share_called_ALL": "{:.3f}".format, "mean_prob_ALL": "{:.3f}".format}))


if __name__ == "__main__":
    run_main(main, get_args_parser().parse_args)
