#!/usr/bin/env bash
# Reproduces results/polyp/results.json, results.md and the plots (docs/results.md quotes them).
# Budget (run.py's defaults): six centres of ../shared/data/polyp with their split.json, 100 training
# images per centre, every validation and test image; 12 rounds of 8 local + 16 global steps and 16
# final steps (304 steps, 1216 images per site for every method), batch 4, LiteMedSAM, prompt-free.
# On the 2-core CPU one run takes about half an hour: the whole script is tens of hours. Every run
# is saved as it finishes and never rerun, so the script can be stopped and started again at will.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/polyp}
OUT=${OUT:-results/polyp}
run() { python benchmarks/run.py --data-root "$DATA" --out "$OUT" "$@"; }
# 1. the tuning search of the main rows (seed 0): lr x {0.3, 1, 3} (and beyond while the best is at
#    the edge), then each method's own knob
run --search --methods pfedsam,fedavg,local-plain,local,ditto,fedprox
# 2. the main rows with their chosen settings, three seeds (seed 0 is the search run itself)
run --seeds 0,1,2 --methods pfedsam,fedavg,local-plain,local,ditto,centralized
# 3. the other rows, one seed: the reference, FedAvg + fine-tune, FedRep, the ablations
run --methods zero-shot,fedprox,fedavg-ft,fedrep,pfedsam-nokd,pfedsam-nolmoe,pfedsam-joint
# 4. every centre left out once: pFedSAM and FedAvg on the other five, adapted at the left-out one
run --methods '' --unseen all
