#!/usr/bin/env bash
# Reproduces results/polyp-48rounds (docs/results.md, "Budget study: 48 rounds"): the rows at 48 rounds
# (1168 steps per site) with the settings the 12-round search chose (results/polyp/results.json), no new
# search. One row per run.py call, so each is saved as it finishes; a recorded row is never rerun and a
# federated row resumes from its round checkpoint, so the script can be stopped and started at will.
# Order: the rows already recorded, then what is still missing, the deciding pair first. On a 2-core CPU a
# row took 24 to 52 min (without the encoder LoRA, Intel Xeon with AMX) to 2.4 h (pFedSAM with the encoder LoRA; 3.5 h
# on a Zen 4 CPU without AMX, the feature cache's refill included): the whole script is days.
# COMMIT=1 commits results/polyp-48rounds after every row (for sessions that run it across days).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/polyp}
OUT=${OUT:-results/polyp-48rounds}
LORA=lora.encoder_blocks=1,train.global_from_embedding=false
row() {  # row METHODS SEEDS [VARIANT] (comma lists)
    python benchmarks/run.py --data-root "$DATA" --out "$OUT" --rounds 48 --tuned-from results/polyp/results.json \
        --cache-dir results/polyp/feature_cache --no-overlays --methods "$1" --seeds "$2" ${3:+--variant "$3"}
    if [[ "${COMMIT:-0}" == 1 ]] && [[ -n "$(git status --porcelain -- "$OUT")" ]]; then
        git add -- "$OUT" && git commit -q -m "results(polyp-48rounds): $1 seed $2${3:+ ($3)}" -- "$OUT"
    fi
}
row fedavg,pfedsam,centralized,local-plain 0,1,2  # recorded: one call skips them all
# the deciding pair: the strongest baseline and pFedSAM's best design, both with the encoder LoRA
for seed in 0 1 2; do row fedavg "$seed" "$LORA"; row pfedsam "$seed" "$LORA"; done
# issue 11's other main rows (three seeds) and the one-seed rows
for seed in 0 1 2; do row local "$seed"; row ditto "$seed"; done
for method in fedprox fedavg-ft fedrep pfedsam-nokd pfedsam-nolmoe pfedsam-joint; do row "$method" 0; done
