"""Write the Kaggle submission: one row per test image, in the test CSV's order.

    python predict.py --model resnet18                          checkpoints/resnet18/best.pt on resnet_18_test.csv
    python predict.py --checkpoint checkpoints/demo/best.pt --tta --adapt-bn
    python predict.py --checkpoint checkpoints/a/best.pt checkpoints/b/best.pt    an ensemble, averaged in probability

The submission has the header ID,label: ID is the test CSV's Path string unchanged, label 0 (hem) or 1 (ALL).
It is written atomically: a missing or unreadable image stops the run and leaves no partial file.
"""
from __future__ import annotations

import argparse
import os

import torch

from checkpoints import (CheckpointError, checkpoint_data_root, find_runs, load_checkpoint, model_from_checkpoint, refuse_other_models,
                         run_name_of)
from cli import add_scoring_flags, run_main
from dataloader import RetinopathyLoader, find_test_csv
from devices import keep_freed_memory, resolve_device
from files import TEST_CSVS, read_csv, write_csv_atomic
from inference import adapt_to_dataset, dataset_logits, warn_if_class_balanced


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(TEST_CSVS), help="use checkpoints/<model>/best.pt (or the only run of this model); with --checkpoint, "
                        "every checkpoint must be of this model")
    parser.add_argument("--checkpoint", nargs="+", help="checkpoint file(s); several are averaged in probability")
    parser.add_argument("--checkpoints-dir", default="checkpoints", help="where the run folders are (default: checkpoints)")
    parser.add_argument("--data-root", help="dataset folder (default: the one the first run was trained on)")
    parser.add_argument("--test-csv", help="test CSV (default: the model's resnet_<n>_test.csv in the data root, or the only one)")
    parser.add_argument("--output", help="submission file (default: submissions/<run-name>.csv)")
    parser.add_argument("--probs", help="also write ID,prob_ALL to this file; the submission stays exact")
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
    device = resolve_device(args.device)
    keep_freed_memory(device)
    paths = pick_checkpoints(args)
    checkpoints = [load_checkpoint(p) for p in paths]
    if args.model:  # each model has its own Kaggle competition: a submission for one made by another is a mistake
        refuse_other_models(args.model, [(p, c["model_name"]) for p, c in zip(paths, checkpoints)],
                            " and the checkpoints choose the test CSV")
    root = checkpoint_data_root(checkpoints[0], args.data_root)
    test_csv = args.test_csv or find_test_csv(root, args.model or checkpoints[0]["model_name"])
    ids, _ = read_csv(test_csv, labelled=False)

    prob_all = torch.zeros(len(ids))
    for path, checkpoint in zip(paths, checkpoints):
        model, preprocess = model_from_checkpoint(checkpoint, device)
        dataset = RetinopathyLoader(root, "test", preprocess=preprocess, output="uint8", csv_path=test_csv)
        if args.adapt_bn:
            warn_if_class_balanced(checkpoint, path)
            model = adapt_to_dataset(model, preprocess, dataset, device, args.batch_size, args.workers)
        prob_all += dataset_logits(model, preprocess, dataset, device, args.batch_size, args.workers, args.tta).softmax(1)[:, 1]
        print(f"{path}: {checkpoint['model_name']}, epoch {checkpoint['epoch']}, best valid {checkpoint.get('metric', 'acc')} "
              f"{checkpoint.get('best_metric', float('nan')):.4f}")
    prob_all /= len(paths)
    labels = (prob_all >= 0.5).long().tolist()

    output = args.output or os.path.join("submissions", "+".join(run_name_of(p) for p in paths) + ".csv")
    write_csv_atomic(output, ["ID", "label"], [[i, y] for i, y in zip(ids, labels)])
    if args.probs:
        write_csv_atomic(args.probs, ["ID", "prob_ALL"], [[i, repr(p)] for i, p in zip(ids, prob_all.tolist())])
    print(f"wrote {output}: {len(ids)} rows from {test_csv} ({sum(labels)} ALL, {len(labels) - sum(labels)} hem)"
          + (f"; probabilities in {args.probs}" if args.probs else ""))
    return 0


if __name__ == "__main__":
    run_main(main, get_args_parser().parse_args)
