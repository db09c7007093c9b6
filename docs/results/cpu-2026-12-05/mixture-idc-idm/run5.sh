#!/bin/bash
# Issue 16 results (session 27), part 3: VGG11 (seed 0) for the two 10x1 sets while they exist.
set -e
cd /tmp/r27
export PYTHONPATH=/tmp/r27 PATH=/work/main/.venv/bin:$PATH MLFLOW_TRACKING_URI=sqlite:////tmp/r27/mlflow.db
E="-S scale=cpu -S evaluate.seeds_together=3"
for x in idm idc; do
  date; moedd evaluate --synthetic data/synthetic/$x-noe1 --prepared data/prepared --metrics metrics/evaluate-vgg11/$x-noe1.json \
    --device cpu $E --nets vgg11 --seeds 0
done
date; echo ALL DONE
