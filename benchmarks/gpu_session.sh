#!/usr/bin/env bash
# One prepared GPU session: the CUDA path of every stage on real CIFAR-10, then the benchmark
# table on CUDA next to the reference code. Written for a lent machine with a time limit: steps
# run in priority order, each under what is left of BUDGET_S; a step that fails is logged and
# the next one runs; everything worth keeping (metrics JSON, MLflow store, synthetic sets, logs,
# benchmark JSON) is packed into $OUT/gpu-session.tar.gz after every step, so a cut-off session
# still returns what it finished.
#
#   OUT=/tmp/gpu-out bash benchmarks/gpu_session.sh            # real sizes (what docs/results.md reports)
#   PHASES="bench xarch" OUT=... bash benchmarks/gpu_session.sh  # a subset of: graphtests bench profile layout rows more xarch long
#   SIZE=tiny DEVICE=cpu OUT=/tmp/gs bash benchmarks/gpu_session.sh   # rehearsal of the script itself
#
# Inputs (not in git; copied into .gpu/ by the caller): .gpu/cifar10-jpeg.tar.xz (../shared/data),
# .gpu/refs/{dc,idm,idc,mtt} (reference checkouts for bench.py), optionally .whl/ (wheels of the
# Python packages the machine lacks: pydantic, mlflow and their needs). The set that worked on
# the H200 image (Python 3.12, torch 2.11; mlflow-skinny + mlflow-tracing install the `mlflow`
# package without the UI), fetched with `pip download --no-deps --only-binary=:all:
# --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform
# manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl NAME==VERSION`:
#   alembic==1.20.1 annotated_types==0.8.0 cachetools==7.3.3 cffi==2.1.1 cryptography==50.0.2
#   databricks_sdk==0.162.0 fastapi==0.165.0 gitdb==4.0.12 gitpython==3.2.1 importlib_metadata==9.1.0
#   mako==1.4.3 mlflow_skinny==3.17.2 mlflow_tracing==3.17.2 opentelemetry_api==1.45.2
#   opentelemetry_proto==1.45.2 opentelemetry_sdk==1.45.2 opentelemetry_semantic_conventions==0.66b2
#   pydantic==2.14.4 pydantic_core==2.50.5 smmap==5.0.3 sqlalchemy==2.1.9 sqlparse==0.6.1
#   starlette==1.10.0 typing_extensions==4.16.0 typing_inspection==0.4.5
# and, for the graphtests phase, pytest with its needs (pytest, pluggy, iniconfig, packaging, pygments).
# Device-tool call used here: carry [".gpu", ".whl"], command `BUDGET_S=540 bash benchmarks/gpu_session.sh`.
set -uo pipefail
export PYTHONUNBUFFERED=1 DVC_NO_ANALYTICS=1
[[ -z ${MOEDD_GIT_COMMIT:-} && -f ${CARRY:-.gpu}/COMMIT ]] && export MOEDD_GIT_COMMIT=$(cat "${CARRY:-.gpu}/COMMIT")
OUT=${OUT:-/tmp/gpu-out}
SIZE=${SIZE:-real}
DEVICE=${DEVICE:-cuda}
BUDGET_S=${BUDGET_S:-540}
CARRY=${CARRY:-.gpu}
T0=$SECONDS
W=$PWD
mkdir -p "$OUT" "$W/logs"
log() { echo "[$(date -u +%H:%M:%S) +$((SECONDS - T0))s] $*" | tee -a "$W/logs/session.log"; }
left() { echo $((BUDGET_S - (SECONDS - T0))); }
pack() {  # what the session made, in three archives (the tool returns at most 8 files of <= 16 MB)
  tar -czf "$OUT/gpu-session.tar.gz.part" logs metrics mlflow.db mlartifacts bench-cuda.json profile-cuda.json bench-cuda-contiguous.json 2>/dev/null
  mv "$OUT/gpu-session.tar.gz.part" "$OUT/gpu-session.tar.gz"
  for n in 1 2; do  # synthetic sets (float32, ~1.2 MB per 100 images; they do not compress)
    if compgen -G "data/synthetic/*-noe$n" >/dev/null; then
      tar -cf "$OUT/synthetic-noe$n.tar.part" data/synthetic/*-noe$n && mv "$OUT/synthetic-noe$n.tar.part" "$OUT/synthetic-noe$n.tar"
    fi
  done
  cp logs/session.log "$OUT/session.log"
}
step() {  # step NAME NEED MAX CMD...: run CMD if NEED seconds are left, for at most MAX seconds
  local name=$1 need=$2 max=$3; shift 3
  local l; l=$(left)
  if (( l < need )); then log "SKIP $name (needs ~${need}s, ${l}s left)"; return 1; fi
  (( max > l )) && max=$l
  log "START $name (limit ${max}s)"
  local t=$SECONDS
  timeout --signal=INT --kill-after=20 "$max" "$@" >"$W/logs/$name.log" 2>&1
  local rc=$?
  log "END $name rc=$rc $((SECONDS - t))s | $(grep -v '^\s*$' "$W/logs/$name.log" | tail -n 1 | cut -c1-160)"
  pack
  return $rc
}

# ---- environment ---------------------------------------------------------------------------
log "session: SIZE=$SIZE DEVICE=$DEVICE BUDGET_S=$BUDGET_S"
if ! python3 -c "import pydantic, mlflow" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { log "FATAL: wheel install failed"; exit 2; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! command -v moedd >/dev/null; then  # a launcher for this tree (moedd.cli lives in cli/)
  mkdir -p /tmp/moedd-bin
  printf '#!/bin/sh\nexec python3 -c "import sys, cli, moedd; sys.modules[\\"moedd.cli\\"] = cli; from moedd.cli.main import run; sys.argv[0] = \\"moedd\\"; run()" "$@"\n' >/tmp/moedd-bin/moedd
  chmod +x /tmp/moedd-bin/moedd
  export PYTHONPATH=$W${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/moedd-bin:$PATH
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import torch, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))"
  python3 -c "import mlflow, pydantic; print('mlflow', mlflow.__version__, 'pydantic', pydantic.VERSION)"
  echo "commit ${MOEDD_GIT_COMMIT:-$(cat "$CARRY/COMMIT" 2>/dev/null)}"; nproc; } 2>&1 | tee -a logs/session.log
moedd --help >/dev/null || { log "FATAL: moedd CLI does not start"; moedd --help 2>&1 | tail -n 20; exit 2; }

# ---- data ----------------------------------------------------------------------------------
DATA=/tmp/c10
if [[ ! -d $DATA/train ]]; then
  mkdir -p $DATA && python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$CARRY/cifar10-jpeg.tar.xz" $DATA
fi
# The tarball may hold a top-level folder: point data.root at the folder with train/ and test/.
ROOT=$(dirname "$(find $DATA -maxdepth 3 -type d -name train | head -n 1)")
if [[ $SIZE == tiny ]]; then  # rehearsal: 40 train / 20 test images per class
  for split in train:40 test:20; do
    for d in "$ROOT/${split%%:*}"/*/; do
      t=/tmp/c10-tiny/${split%%:*}/$(basename "$d"); mkdir -p "$t"
      find "$d" -name '*.jpg' | sort | head -n "${split##*:}" | xargs cp -t "$t"
    done
  done
  ROOT=/tmp/c10-tiny
fi
S=(-S data.source=imagefolder -S "data.root=$ROOT" -S data.download=false
   -S "distill.device=$DEVICE" -S "evaluate.device=$DEVICE" -S "trajectories.device=$DEVICE"
   -S distill.log_every=10 -S distill.checkpoint_every=50 -S evaluate.epochs=300)
if [[ $SIZE == tiny ]]; then  # rehearsal: same steps, seconds each
  S+=(-S evaluate.epochs=2 -S experts.idm.batch_real=16 -S experts.idc.n_data=64 -S experts.idc.batch_real=8
      -S trajectories.batch_size=64)
  SEED_EPOCHS=2; IT_DM=2; IT_DM_LONG=3; IT_IDM=2; IT_IDC=1; IN_IDC=2; IT_IDC_LONG=2; IT_MTT=2; MTT_STEPS=2
  BENCH=(--quick --only dm --dm-reps 1 --no-noe2 --no-bf16)
  SMALL_IDC_MTT=(--idc-batch-real 8 --idc-n-data 64 --mtt-ipc 2 --mtt-syn-steps 3)  # profile/layout phases
else
  IT_DM=400; IT_DM_LONG=2500; IT_IDM=50; IT_IDC=3; IN_IDC=100; IT_IDC_LONG=10; IT_MTT=20; MTT_STEPS=20; BENCH=(); SMALL_IDC_MTT=()
fi
MTT_S=(-S experts.mtt.preset=cifar10 -S "experts.mtt.iterations=$IT_MTT" -S "experts.mtt.syn_steps=$MTT_STEPS"
       -S experts.mtt.max_start_epoch=2 -S experts.mtt.expert_epochs=2 -S experts.mtt.lr_teacher=0.01
       -S trajectories.num_teachers=1)
[[ $SIZE == tiny ]] && MTT_S+=(-S experts.mtt.zca=false)
step prepare 20 120 moedd prepare --out data/prepared "${S[@]}" || { log "FATAL: prepare failed"; exit 2; }
for n in 1 2; do step "partition$n" 5 60 moedd partition --noe $n --out data/partitions/noe$n.pt "${S[@]}"; done

# distill_eval NAME EXPERT NOE NEED [extra -S ...]: distill, then ConvNet-3 x seeds 0,1,2
distill_eval() {
  local name=$1 expert=$2 noe=$3 need=$4 max=$5; shift 5
  local extra=("$@") traj=()
  [[ $expert == mtt ]] && traj=(--trajectories data/trajectories/noe$noe)
  step "distill-$name" "$need" "$max" moedd distill --expert "$expert" --noe "$noe" --partition data/partitions/noe$noe.pt \
    --out "data/synthetic/$name" --metrics "metrics/distill/$name.json" "${traj[@]}" "${S[@]}" "${extra[@]}" \
    && step "eval-$name" 30 120 moedd evaluate --synthetic "data/synthetic/$name" --nets convnet3 --seeds 0,1,2 \
      --metrics "metrics/evaluate/$name.json" "${S[@]}" "${extra[@]}"
}
cross_eval() {  # cross_eval NAME: VGG11, ResNet18, AlexNet x seeds 0,1,2 on an existing set
  [[ -d data/synthetic/$1 ]] && step "xeval-$1" 60 150 moedd evaluate --synthetic "data/synthetic/$1" \
    --nets vgg11,resnet18,alexnet --seeds "${XSEEDS:-0,1,2}" --metrics "metrics/evaluate/$1-xarch.json" "${S[@]}"
}

# ---- phases (PHASES="graphtests bench seeds profile layout rows more xarch long" by default; a later session can run a subset) -----
R=$CARRY/refs
phase_bench() {  # the benchmark table on this device, next to the reference code
  step bench 120 240 python3 benchmarks/bench.py --device "$DEVICE" --reference-dc $R/dc --reference-idm $R/idm \
    --reference-idc $R/idc --reference-mtt $R/mtt --json bench-cuda.json "${BENCH[@]}" ${BENCH_ARGS:-}
}
phase_seeds() {  # issue 18 item 5: five ConvNet-3 seeds on 100 images trained together vs one by one (goal >= 3x)
  step seeds 60 180 python3 -m benchmarks.seeds_together --prepared data/prepared --device "$DEVICE" --images 100 \
    --seeds 5 --epochs ${SEED_EPOCHS:-300} --reps 3
}
phase_graphtests() {  # the CUDA-only tests: MTT's captured graph replays its eager body (needs pytest in .whl)
  step graphtests 60 180 python3 -m pytest -q -p no:cacheprovider tests/test_graphs.py tests/test_mtt.py tests/test_idc.py -k cuda_graph -rs
}
phase_profile() {  # where one IDC inner step and one MTT iteration spend their time (GPU busy share, launches)
  step profile 90 200 python3 benchmarks/bench.py --device "$DEVICE" --only none --profile idc,mtt \
    --reference-idc $R/idc --reference-mtt $R/mtt --json profile-cuda.json "${SMALL_IDC_MTT[@]}"
}
phase_layout() {  # the IDC/MTT rows again with every net in NCHW (MOEDD_LAYOUT; the default on CUDA is channels_last)
  step bench-contiguous 120 240 env MOEDD_LAYOUT=contiguous python3 benchmarks/bench.py --device "$DEVICE" --only idc,mtt \
    --reference-idc $R/idc --reference-mtt $R/mtt --json bench-cuda-contiguous.json "${SMALL_IDC_MTT[@]}"
}
phase_rows() {  # the rows the issues' done-when needs: IDC 10x1/5x2, MTT 10x1
  distill_eval idc-noe1 idc 1 100 240 -S "experts.idc.iterations=$IT_IDC" -S "experts.idc.inner_loop=$IN_IDC"
  step traj-noe1 40 120 moedd trajectories --noe 1 --partition data/partitions/noe1.pt --out data/trajectories/noe1 \
    --metrics metrics/trajectories/noe1.json "${S[@]}" "${MTT_S[@]}" \
    && distill_eval mtt-noe1 mtt 1 40 150 "${MTT_S[@]}"
  distill_eval idc-noe2 idc 2 120 240 -S "experts.idc.iterations=$IT_IDC" -S "experts.idc.inner_loop=$IN_IDC"
}
phase_more() {  # the other methods on the same device (same protocol), MTT 5x2
  for n in 1 2; do distill_eval dm-noe$n dm $n 40 120 -S "experts.dm.iterations=$IT_DM" -S experts.dm.batch_real=128; done
  for n in 1 2; do distill_eval idm-noe$n idm $n 50 150 -S "experts.idm.iterations=$IT_IDM"; done
  for n in 1 2; do distill_eval random-noe$n random $n 30 60; done
  step traj-noe2 40 120 moedd trajectories --noe 2 --partition data/partitions/noe2.pt --out data/trajectories/noe2 \
    --metrics metrics/trajectories/noe2.json "${S[@]}" "${MTT_S[@]}" \
    && distill_eval mtt-noe2 mtt 2 40 150 "${MTT_S[@]}"
}
phase_xarch() {  # VGG11, ResNet18, AlexNet on every set made so far (or carried in $CARRY/synthetic)
  if [[ -d $CARRY/synthetic ]]; then mkdir -p data/synthetic && cp -rn "$CARRY"/synthetic/* data/synthetic/; fi
  for name in idc-noe1 idc-noe2 idm-noe1 idm-noe2 dm-noe1 dm-noe2 mtt-noe1 mtt-noe2 random-noe1 random-noe2; do
    cross_eval $name
  done
}
phase_long() {  # a CPU hour of DM (2,500 iterations) and 1,000 IDC matching steps, 10x1
  distill_eval dm-long-noe1 dm 1 60 150 -S "experts.dm.iterations=$IT_DM_LONG" -S experts.dm.batch_real=128
  distill_eval idc-long-noe1 idc 1 200 300 -S "experts.idc.iterations=$IT_IDC_LONG" -S "experts.idc.inner_loop=$IN_IDC"
}
for ph in ${PHASES:-graphtests bench seeds profile layout rows more xarch long}; do log "phase $ph"; "phase_$ph"; done

step report 10 60 moedd report --metrics-dir metrics/evaluate --out metrics/report.md "${S[@]}"
log "session done"
pack
