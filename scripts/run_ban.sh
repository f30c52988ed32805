#!/usr/bin/env bash
# Born-again networks (Table 2's BAN row): train generations 1..G one after the other, generation k
# distilling from generation k-1's best checkpoint (src/zipfls_train/losses/ban.py).
#
#   scripts/run_ban.sh [-g GENERATIONS] [-o OUTPUT_ROOT] [hydra overrides...]
#   scripts/run_ban.sh -g 3 -o outputs/ban/tinyimagenet_r18_seed0 dataset=tinyimagenet model=cifar_resnet18 seed=0
#
# Generation k runs in OUTPUT_ROOT/gen<k> (hydra.run.dir) with loss.generation=k and, for k > 1,
# loss.teacher_checkpoint=OUTPUT_ROOT/gen<k-1>/checkpoints/best.pt. The report row is the last
# generation's run. Rerunning the same command resumes: finished generations return at once
# (trainer.resume=auto), an interrupted one continues from its last.pt.
# Environment: PYTHON (default: .venv/bin/python if present, else python).
set -euo pipefail

generations=3
root=""
while getopts "g:o:h" option; do
  case "$option" in
    g) generations="$OPTARG" ;;
    o) root="$OPTARG" ;;
    h) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "usage: $0 [-g GENERATIONS] [-o OUTPUT_ROOT] [hydra overrides...]" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))

if ! [[ "$generations" =~ ^[1-9][0-9]*$ ]]; then
  echo "run_ban.sh: -g must be a positive integer, got '$generations'" >&2
  exit 2
fi
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
root="${root:-outputs/ban/default}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python; fi
fi

for ((k = 1; k <= generations; k++)); do
  teacher=null
  if ((k > 1)); then
    teacher="$root/gen$((k - 1))/checkpoints/best.pt"
    if [[ ! -f "$teacher" ]]; then
      echo "run_ban.sh: generation $((k - 1)) left no checkpoint at $teacher" >&2
      exit 1
    fi
  fi
  echo "[run_ban] generation $k/$generations -> $root/gen$k (teacher: $teacher)"
  "$PYTHON" "$repo/train.py" loss=ban "loss.generation=$k" "loss.teacher_checkpoint=$teacher" \
    "hydra.run.dir=$root/gen$k" "$@"
done
