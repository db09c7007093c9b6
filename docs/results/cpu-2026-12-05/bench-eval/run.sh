#!/bin/bash
# Session 27 measurements on an otherwise idle CPU, one after another (issue 17 benchmark row, issue 18 items 2-3).
cd /tmp/m27/repo
export PYTHONPATH=/tmp/m27/repo
. /work/main/.venv/bin/activate
P=/tmp/r27/data/prepared
git log --oneline | head -1 > /tmp/m27/commit.txt
# ranks: measured in the first pass (ranks.md)
for i in 1 2 3; do
  date; python benchmarks/bench.py --only train,test --reference-dc /tmp/dc-ref --json /tmp/m27/bench$i.json > /tmp/m27/bench$i.md 2>&1
done
date; python -m benchmarks.seeds_together --prepared $P --images 100 --epochs 20 > /tmp/m27/seeds.md 2>&1
date; python -m benchmarks.bf16_test_pass --prepared $P --train-images 1000 --epochs 10 --reps 1 > /tmp/m27/bf16.md 2>&1
date; echo MEASURED
