#!/usr/bin/env bash
# The recipe comparison of EXPERIMENTS.md: ResNet18 at 128 px on the 2,589 real cells of ../shared/cnmc,
# split by subject, on 2 CPU cores. Each run's last epoch (no selection on held-out subjects) is scored on
# the valid subjects and the test subjects, with and without flip TTA. Finished runs are skipped.
# Usage: bash experiments/cnmc_cpu.sh [EPOCHS]   (about 80 minutes for 14 runs of 10 epochs)
set -euo pipefail
cd "$(dirname "$0")/.."
epochs=${1:-10}
data=data/cnmc
out=checkpoints/cnmc
[ -f $data/train.csv ] || python dataloader.py --import-cnmc ../shared/cnmc --out $data
common="--data-root $data --output-dir $out --image-size 128 --epochs $epochs --workers 2 --cache ram"
run() {  # name, flags...
    name=$1; shift
    if [ -f $out/$name/history.csv ] && [ $(($(wc -l < $out/$name/history.csv) - 1)) -ge "$epochs" ]; then
        :  # finished
    elif [ -f $out/$name/last.pt ]; then  # interrupted: continue it
        python train.py --output-dir $out --run-name "$name" --resume --epochs $epochs
    else
        python train.py $common --run-name "$name" "$@"
    fi >> $out.$name.log 2>&1
    for split in valid test; do
        csv=$([ $split = valid ] && echo $data/valid.csv || echo $data/test_labels.csv)
        for tta in "" "-tta"; do
            [ -f results/cnmc-$split$tta/$name/metrics.json ] || python evaluate.py --checkpoint $out/$name/last.pt --csv $csv \
                --out-dir results/cnmc-$split$tta --workers 2 ${tta:+--tta} > /dev/null
        done
    done
}
mkdir -p $out
run default
run seed --recipe seed --crop 0
run no-crop --crop 0
run flips-only --rotation 0 --scale-jitter 0
run strong-color --color-jitter 0.3
run no-smoothing --label-smoothing 0
run no-balance --class-balance none
run sampler-balance --class-balance sampler
run no-ema --ema 0
run adamw --optimizer adamw --lr 1e-3 --weight-decay 0.05
run default-seed1 --seed 1
run default-seed2 --seed 2
run size-96 --image-size 96
run step-schedule --scheduler step --lr-step 4
python experiments/summarise.py results/cnmc-valid results/cnmc-valid-tta results/cnmc-test results/cnmc-test-tta
