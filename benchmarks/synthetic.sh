#!/usr/bin/env bash
# The same comparison on the generated SYNTHETIC sites of the main job (4 sites x 40 images,
# every image of each split), a smaller set of rows: writes results/synthetic/.
set -euo pipefail
cd "$(dirname "$0")/.."
python benchmarks/run.py --data-root synthetic --out "${OUT:-results/synthetic}" --max-train 0 --max-eval 0 \
  --methods pfedsam,fedavg,ditto,local "$@"
