#!/bin/bash
# Issue 16 results (session 27): the 10x1 rows and VGG11 for all five sets (CIFAR-10 budget 10, CPU).
# The 5x2 sets of C15 were lost with their machine; they are distilled again here at the same settings.
set -e
cd /tmp/r27
export PYTHONPATH=/tmp/r27 PATH=/work/main/.venv/bin:$PATH MLFLOW_TRACKING_URI=sqlite:////tmp/r27/mlflow.db
S="-S scale=cpu -S experts.idc.iterations=2 -S experts.idc.inner_loop=15 -S distill.log_every=1 -S distill.checkpoint_every=1"
E="-S scale=cpu -S evaluate.seeds_together=3"
date
moedd prepare --out data/prepared -S data.source=imagefolder -S data.root=/tmp/c10 -S data.download=false
moedd partition --noe 2 --prepared data/prepared --out data/partitions/noe2.pt
moedd partition --noe 1 --prepared data/prepared --out data/partitions/noe1.pt
ev() { moedd evaluate --synthetic data/synthetic/$1 --prepared data/prepared --metrics metrics/$2/$1.json --device cpu $E "${@:3}"; }
for x in idc idm; do
  date; moedd distill --expert $x --noe 1 --prepared data/prepared --partition data/partitions/noe1.pt --out data/synthetic/$x-noe1 \
    --metrics metrics/distill/$x-noe1.json --device cpu $S
  date; ev $x-noe1 evaluate
  date; ev $x-noe1 evaluate-vgg11 --nets vgg11 --seeds 0
done
for x in "idc,idm idc+idm" "idc idc" "idm idm"; do set -- $x
  date; moedd distill --expert $1 --noe 2 --prepared data/prepared --partition data/partitions/noe2.pt --out data/synthetic/$2-noe2 \
    --metrics metrics/distill/$2-noe2.json --device cpu $S
  date; ev $2-noe2 evaluate-vgg11 --nets vgg11 --seeds 0
done
date; echo VGG DONE
for x in idc+idm idc idm; do date; ev $x-noe2 evaluate; done
date; echo ALL DONE
