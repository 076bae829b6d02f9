#!/usr/bin/env bash
# Reproduces results/polyp/results.json, results.md and the plots (docs/results.md quotes them).
# CPU budget (2 cores): 6 centres x 24 training / 16 val / 16 test images, 3 rounds of
# 6 local + 10 global steps, batch 4, LiteMedSAM, one shared disk cache of encoder features.
# Each call adds rows; rows already in results.json are kept (add --force to rerun them).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/polyp}
OUT=${OUT:-results/polyp}
run() { python benchmarks/run.py --data-root "$DATA" --out "$OUT" "$@"; }
run                                                     # main table: every method, prompt-free, seed 0
run --methods '' --unseen cvc-clinicdb,kvasir-seg,polypgen-c1   # leave-one-centre-out, pFedSAM
run --prompt box --methods pfedsam,fedavg,local         # box-prompt table
run --seeds 1,2 --methods pfedsam,local,fedavg          # extra seeds: pFedSAM and the two main baselines
