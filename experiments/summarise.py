"""Print the Markdown table of EXPERIMENTS.md from evaluate.py's metrics.json files.

    python experiments/summarise.py results/cnmc-valid results/cnmc-valid-tta results/cnmc-test results/cnmc-test-tta
"""
import json
import os
import sys


def main(folders: list[str]) -> None:
    metrics = {folder: {run: json.load(open(os.path.join(folder, run, "metrics.json")))
                        for run in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, run, "metrics.json"))}
               for folder in folders}
    runs = list(metrics[folders[0]])
    first = os.path.basename(folders[0])
    print("| run | " + " | ".join(f"{os.path.basename(f)} wF1 / acc" for f in folders) + f" | {first} recall hem / ALL |")
    print("|---|" + "---|" * (len(folders) + 1))
    for run in runs:
        cells = [f"{m[run]['weighted_f1']:.3f} / {m[run]['accuracy']:.3f}" if run in m else "" for m in metrics.values()]
        m = metrics[folders[0]][run]
        print(f"| {run} | " + " | ".join(cells) + f" | {m['recall_hem']:.3f} / {m['recall_ALL']:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
