#!/bin/bash
# Issue 16 results (session 27), part 2: once IDC 10x1's ConvNet-3 metrics exist, stop run.sh and go on
# in priority order: IDM 10x1 (ConvNet-3), then VGG11 for the three 5x2 sets, then VGG11 for the 10x1 sets.
cd /tmp/r27
while [ ! -f metrics/evaluate/idc-noe1.json ]; do sleep 10; done
pkill -f /tmp/r27/run.sh; sleep 2; pkill -f "moedd evaluate --synthetic data/synthetic/idc-noe1"; sleep 3
set -e
export PYTHONPATH=/tmp/r27 PATH=/work/main/.venv/bin:$PATH MLFLOW_TRACKING_URI=sqlite:////tmp/r27/mlflow.db
S="-S scale=cpu -S experts.idc.iterations=2 -S experts.idc.inner_loop=15 -S distill.log_every=1 -S distill.checkpoint_every=1"
E="-S scale=cpu -S evaluate.seeds_together=3"
ev() { moedd evaluate --synthetic data/synthetic/$1 --prepared data/prepared --metrics metrics/$2/$1.json --device cpu $E "${@:3}"; }
di() { moedd distill --expert $1 --noe $2 --prepared data/prepared --partition data/partitions/noe$2.pt --out data/synthetic/$3-noe$2 \
    --metrics metrics/distill/$3-noe$2.json --device cpu $S; }
date; di idm 1 idm; date; ev idm-noe1 evaluate
for x in "idc,idm idc+idm" "idc idc" "idm idm"; do set -- $x
  date; di $1 2 $2; date; ev $2-noe2 evaluate-vgg11 --nets vgg11 --seeds 0
done
for x in idc idm; do date; ev $x-noe1 evaluate-vgg11 --nets vgg11 --seeds 0; done
date; echo ALL DONE
