#!/usr/bin/env bash
# Every GPU check in one call (about 10 minutes on one H100/H200):
#   1. every test marked cuda (CPU/CUDA agreement, no host sync in any method's step, bf16 run)
#   2. scripts/bench_loss_overhead.py on CUDA (Zipf/CE and Zipf/LS step-time and memory ratios)
#   3. scripts/bench_train.py on CUDA (images/s synthetic vs real loader; ResNet-50 224 px bf16)
#   4. scripts/bench_methods.py on CUDA (Table 1's cost columns: every method vs CE)
#   5. the quick_tinyimagenet protocol (CE vs Zipf x 2 seeds, four runs sharing the GPU) + its table
# Usage: bash scripts/gpu_check.sh [OUT_DIR]
# Data: $ZIPFLS_DATA (a folder holding tinyimagenet-32/), default .gpu_data, else ../shared/data.
# Python packages the GPU image lacks (hydra-core, omegaconf, antlr4) may be carried in .gpu_site/.
# Budgets (seconds) can be shrunk for a dry run: T_TESTS T_LOSS T_TRAIN T_METHODS T_QUICK, QUICK_EXTRA (overrides).
set -u
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
[ -d .gpu_site ] && export PYTHONPATH="$PYTHONPATH:$PWD/.gpu_site"
PY=${PY:-python3}
data=${ZIPFLS_DATA:-}
if [ -z "$data" ]; then
  if [ -d .gpu_data/tinyimagenet-32 ]; then data=$PWD/.gpu_data; else data=$(cd .. && pwd)/shared/data; fi
fi
export ZIPFLS_SHARED_DATA="$data"
log() { echo "[$(date +%T)] $*" | tee -a "$out/gpu_check.log"; }

log "start; data=$data"
{ nvidia-smi; $PY -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)"; } >> "$out/gpu_check.log" 2>&1

log "1/5 CUDA tests"
timeout "${T_TESTS:-120}" $PY -m pytest -m cuda -q -p no:cacheprovider tests/ > "$out/cuda_tests.txt" 2>&1
log "    exit $? ($(tail -1 "$out/cuda_tests.txt"))"

log "2/5 loss overhead"
timeout "${T_LOSS:-90}" $PY scripts/bench_loss_overhead.py --device cuda --precision bf16 > "$out/bench_loss_overhead.txt" 2>&1
log "    exit $?"

log "3/5 training throughput"
timeout "${T_TRAIN:-140}" $PY scripts/bench_train.py --device cuda --data "$data" ${TRAIN_ARGS:-} > "$out/bench_train.txt" 2>&1
log "    exit $?"

log "4/5 method costs (Table 1)"
timeout "${T_METHODS:-60}" $PY scripts/bench_methods.py --device cuda --precision bf16 --width 64 --batch 128 --classes 100 --dataset cifar100 > "$out/bench_methods.txt" 2>&1
log "    exit $?"

log "5/5 quick_tinyimagenet (4 runs at once)"
sweep=$PWD/outputs/gpu_check_quick
rm -rf "$sweep"
pids=()
for loss in ce zipf; do
  for seed in 0 1; do
    timeout "${T_QUICK:-170}" $PY train.py experiment=quick_tinyimagenet "dataset.root=$data" "loss=$loss" "seed=$seed" \
      trainer.progress_bar=false "hydra.run.dir=$sweep/${loss}_seed${seed}" ${QUICK_EXTRA:-} > "$sweep.$loss.$seed.log" 2>&1 &
    pids+=($!)
  done
done
for pid in "${pids[@]}"; do wait "$pid"; done
tail -n 3 "$sweep".*.log > "$out/quick_runs.log" 2>&1
$PY -m zipfls_train.tables "$sweep" --out "$sweep/table.md" >> "$out/quick_runs.log" 2>&1
(cd "$sweep" && tar czf "$out/quick_runs.tgz" table.md */config.yaml */metrics.jsonl */summary.json */zipf_fit.png)
log "done"
