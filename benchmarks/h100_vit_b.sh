#!/usr/bin/env bash
# GPU preset (one H100): SAM ViT-B at its native 1024 input, every image of each centre's split,
# 10 rounds of 20 local + 40 global steps, batch 8. Needs the official SAM checkpoint
# (sam_vit_b_01ec64.pth; nothing is downloaded at run time):
#   SAM_VIT_B=/path/to/sam_vit_b_01ec64.pth bash benchmarks/h100_vit_b.sh
# Not run yet: no GPU machine was lent to the session that wrote it (see docs/results.md).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${SAM_VIT_B:?set SAM_VIT_B to the official sam_vit_b_01ec64.pth}"
DATA=${DATA:-../shared/data/polyp}
OUT=${OUT:-results/polyp-h100-vit_b}
run() {
  python benchmarks/run.py --data-root "$DATA" --out "$OUT" --backbone vit_b --checkpoint "$SAM_VIT_B" \
    --image-size 1024 --batch-size 8 --device cuda --max-train 0 --max-eval 0 --rounds 10 \
    --local-steps 20 --global-steps 40 --threads 1 "$@"
}
run
run --methods '' --unseen cvc-clinicdb,kvasir-seg,polypgen-c1
run --prompt box --methods pfedsam,fedavg,local
run --seeds 1,2 --methods pfedsam,local,fedavg
