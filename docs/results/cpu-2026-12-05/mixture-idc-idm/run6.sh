#!/bin/bash
# Issue 16 results (session 27), part 4: IDC 5x2 distilled again (same settings as C15) and its VGG11 (seed 0).
set -e
cd /tmp/r27
export PYTHONPATH=/tmp/r27 PATH=/work/main/.venv/bin:$PATH MLFLOW_TRACKING_URI=sqlite:////tmp/r27/mlflow.db
S="-S scale=cpu -S experts.idc.iterations=2 -S experts.idc.inner_loop=15 -S distill.log_every=1 -S distill.checkpoint_every=1"
date; moedd distill --expert idc --noe 2 --prepared data/prepared --partition data/partitions/noe2.pt --out data/synthetic/idc-noe2 \
  --metrics metrics/distill/idc-noe2.json --device cpu $S
date; moedd evaluate --synthetic data/synthetic/idc-noe2 --prepared data/prepared --metrics metrics/evaluate-vgg11/idc-noe2.json \
  --device cpu -S scale=cpu --nets vgg11 --seeds 0
date; echo ALL DONE
