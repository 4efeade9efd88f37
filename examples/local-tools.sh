#!/usr/bin/env bash
# fed-eval top to bottom on phantom data: phantoms -> summary -> train -> predict -> evaluate.
# Sizes follow the one convention of every size option: D,H,W = z,y,x (slices, rows, columns).
# Every value below can be overridden from the environment, e.g. EPOCHS=2 STEPS=20 bash examples/local-tools.sh
set -euo pipefail
SIZE=${SIZE:-64,64,64}        # phantom grid at 2 mm
PATCH=${PATCH:-64,64,64}      # training patch (multiples of 16)
CASES=${CASES:-4}             # phantom cases per site
EPOCHS=${EPOCHS:-10}
STEPS=${STEPS:-100}           # optimiser steps per epoch
SCALE=${SCALE:-4}             # feature scale: 4 is the paper's network, 8 or 16 train faster on a CPU
WORK=${WORK:-local-tools}     # everything is written in this folder (git-ignored)
mkdir -p "$WORK" && cd "$WORK"

# three phantom sites (site-3 annotates only pancreas and liver) and a validation set, MSD layout
fed-eval phantoms --out data --sites 3 --cases-per-site "$CASES" --val-cases 2 --size "$SIZE" --partial-site
# the network's parameters, GFLOPs and training memory at the patch size
fed-eval summary --feature-scale "$SCALE" --input "$PATCH"
# centralised training on the three sites, validated every epoch: best.pt, last.pt, metrics.csv
fed-eval train --data data/site-1 --data data/site-2 --data data/site-3 --val data/validation \
    --out runs/central --feature-scale "$SCALE" --patch "$PATCH" --epochs "$EPOCHS" --steps-per-epoch "$STEPS"
# label maps in each input's exact geometry: pred/val_000_seg.nii.gz, ...
fed-eval predict --model runs/central/best.pt --input data/validation/imagesTr --out pred
# scored against the references by case id (val_000_seg.nii.gz pairs with labelsTr/val_000.nii.gz)
fed-eval evaluate --pred pred --ref data/validation/labelsTr --json report.json --csv report.csv
# a site's own label scheme: its manifest maps the values as training does; only its annotated classes count
fed-eval predict --model runs/central/best.pt --input data/site-3/imagesTr --out pred-site-3
fed-eval evaluate --pred pred-site-3 --ref data/site-3/labelsTr --labels data/site-3/labels.toml
