#!/bin/bash
# Issue 16 results, part 2 (the mixture idc+idm-noe2 was distilled by run.sh at d7d477e):
# IDC 5x2, IDM 5x2 and their 10x1 rows; ConvNet-3 with the three seeds trained together (evaluate.seeds_together=3)
set -e
cd /tmp/r26
export PYTHONPATH=/tmp/r26 PATH=/work/main/.venv/bin:$PATH MLFLOW_TRACKING_URI=sqlite:////tmp/r26/mlflow.db
S="-S scale=cpu -S experts.idc.iterations=2 -S experts.idc.inner_loop=15 -S distill.log_every=1 -S distill.checkpoint_every=1"
E="-S scale=cpu -S evaluate.seeds_together=3"
for x in "idc 2" "idm 2"; do set -- $x
  moedd distill --expert $1 --noe $2 --prepared data/prepared --partition data/partitions/noe$2.pt --out data/synthetic/$1-noe$2 \
    --metrics metrics/distill/$1-noe$2.json --device cpu $S
done
for x in idc+idm-noe2 idc-noe2 idm-noe2; do
  moedd evaluate --synthetic data/synthetic/$x --prepared data/prepared --metrics metrics/evaluate/$x.json --device cpu $E
done
for x in idc idm; do
  moedd distill --expert $x --noe 1 --prepared data/prepared --partition data/partitions/noe1.pt --out data/synthetic/$x-noe1 \
    --metrics metrics/distill/$x-noe1.json --device cpu $S
  moedd evaluate --synthetic data/synthetic/$x-noe1 --prepared data/prepared --metrics metrics/evaluate/$x-noe1.json --device cpu $E
done
for x in idc+idm-noe2 idc-noe2 idm-noe2; do
  moedd evaluate --synthetic data/synthetic/$x --prepared data/prepared --metrics metrics/evaluate-vgg11/$x.json --device cpu $E \
    --nets vgg11 --seeds 0
done
echo ALL DONE
