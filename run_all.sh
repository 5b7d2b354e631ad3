#!/usr/bin/env bash
# Every DCASE Task 2 year end to end: data (download, or check what is there), train, test on
# the development and evaluation sets, evaluate, and package the evaluation scores and
# decisions as the year's submission folder with a short system description.
#
#   bash run_all.sh [--years "2020 2021"] [--machines "fan valve"] [--systems "ae"]
#                   [--device auto|cpu|cuda] [--out DIR] [--data-root DIR] [--quick]
#                   [--label Lastname_Institute_task2_1]
#
# Machine types come from `python asd.py list` (none is named here); --machines keeps only
# those of the listed ones it names. Outputs: OUT/runs/dcase<Y>/<system>/{dev,eval}/ (models,
# result CSVs, results.json/.csv/.md), OUT/submissions/dcase<Y>/<system>/; OUT is . by
# default, as for the single commands (data in data/). Every step is skipped when its output
# is there, so a second run does nothing and an interrupted one resumes (an interrupted
# training from its last epoch). A network that a system's machine types share (shinmura2020's
# pre-training, midea2024's classifier) is trained once a year, by the first machine type's
# train, in OUT/runs/dcase<Y>/<system>/shared/; the other machine types and parts reuse it.
#
# --quick: the same steps on a small synthetic set (OUT/data; OUT quick/ by default), one
# development and one evaluation machine type per year, 2 epochs: minutes on a CPU (CI runs it).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
PYTHON="${PYTHON:-python}"
YEARS=""                                     # default: every year `asd.py list years` gives
MACHINES=""
SYSTEMS="auto"
DEVICE="auto"
OUT=""                                       # default: . (runs/, submissions/); quick: quick/
DATA_ROOT=""
QUICK=0
LABEL=""                                     # the submission label; default: package's placeholder
QUICK_TRAIN=(--quick)                       # each system's smoke-run settings
QUICK_SYNTH=(--n-train 10 --n-test 2)       # clips per section; test: per domain and label

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --years) YEARS="$2"; shift 2 ;;
    --machines) MACHINES="$2"; shift 2 ;;
    --systems) SYSTEMS="$2"; shift 2 ;;
    --device) DEVICE="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --data-root) DATA_ROOT="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --label) LABEL="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "run_all.sh: unknown option '$1'" >&2; usage 2 >&2 ;;
  esac
done
if [ -z "$OUT" ]; then
  if [ "$QUICK" = 1 ]; then OUT="quick"; else OUT="."; fi
fi
if [ -z "$DATA_ROOT" ]; then
  if [ "$QUICK" = 1 ]; then DATA_ROOT="$OUT/data"; else DATA_ROOT="data"; fi
fi
if [ "$QUICK" = 1 ]; then
  # tiny models: starting threads costs more than it saves (on a busy 2-core machine, 2 threads
  # made a quick training 50 times slower than 1)
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
RUNS="$OUT/runs"
asd() { "$PYTHON" "$HERE/asd.py" "$@"; }
if [ -z "$YEARS" ]; then YEARS=$(asd list years | xargs); fi
START=$(date +%s)
say() { echo "== [$(( $(date +%s) - START )) s] $*"; }

# The machine types of one year's part: the table's, kept to --machines; --quick: the first.
machines_of() {
  local listed chosen=() m
  listed=$(asd list machines --year "$1" --part "$2")
  for m in $listed; do
    if [ -z "$MACHINES" ] || [[ " $MACHINES " == *" $m "* ]]; then chosen+=("$m"); fi
  done
  if [ "$QUICK" = 1 ] && [ ${#chosen[@]} -gt 0 ]; then chosen=("${chosen[0]}"); fi
  echo "${chosen[@]:-}"
}

get_data() {   # year, machine types of both parts
  local year="$1"; shift
  if [ "$QUICK" = 1 ]; then
    local done="$DATA_ROOT/dcase$year/.synth_done"
    if [ ! -e "$done" ]; then
      asd synth --year "$year" --out "$DATA_ROOT" --machines "$@" "${QUICK_SYNTH[@]}"
      touch "$done"
    fi
  else
    local m
    for m in "$@"; do       # verified archives are not fetched again; 2020: the labels too
      asd download --year "$year" --machine "$m" --part all --data-root "$DATA_ROOT"
    done
  fi
}

train_and_test() {   # year, system, part, machine
  local year="$1" system="$2" part="$3" machine="$4"
  local run="$RUNS/dcase$year/$system/$part"
  local flags=(--year "$year" --system "$system" --part "$part" --machine "$machine"
               --data-root "$DATA_ROOT" --out "$RUNS")
  if [ ! -e "$run/models/$machine/model.pt" ]; then
    say "train $year $system $part $machine"
    local extra=(); if [ "$QUICK" = 1 ]; then extra=("${QUICK_TRAIN[@]}"); fi
    asd train "${flags[@]}" --device "$DEVICE" --cache-dir "$OUT/cache" "${extra[@]}"
  fi
  if [ ! -e "$run/logs/test_$machine.json" ]; then   # written last by test: its done mark
    say "test $year $system $part $machine"
    asd test "${flags[@]}" --device "$DEVICE" --cache-dir "$OUT/cache" --force
  fi
}

evaluate() {   # year, system, part: again whenever a result CSV is newer than the score
  local run="$RUNS/dcase$1/$2/$3"
  if [ ! -e "$run/results.json" ] || [ -n "$(find "$run/results" -newer "$run/results.json")" ]
  then
    say "evaluate $1 $2 $3"
    asd evaluate --year "$1" --system "$2" --part "$3" --data-root "$DATA_ROOT" --out "$RUNS" \
      --force
  fi
}

package() {   # year, system: again whenever a result CSV is newer than the package
  local meta=""
  if [ -d "$OUT/submissions/dcase$1/$2" ]; then
    meta=$(find "$OUT/submissions/dcase$1/$2" -name '*.meta.yaml' | head -n 1)
  fi
  local results="$RUNS/dcase$1/$2/eval/results"
  if [ -z "$meta" ] || [ -n "$(find "$results" -newer "$meta")" ]; then
    asd package --year "$1" --system "$2" --out "$RUNS" --dest "$OUT/submissions" \
      --data-root "$DATA_ROOT" ${LABEL:+--label "$LABEL"}
  fi
}

# the organisers' ground truth of the eval set, where someone has put it beside the data
has_eval_truth() {
  local eval_dir="$DATA_ROOT/dcase$1/eval_data"
  [ -e "$eval_dir/ground_truth_data" ] || [ -e "$eval_dir/eval_data_list.csv" ]
}

for year in $YEARS; do
  read -r -a dev <<< "$(machines_of "$year" dev)"
  read -r -a evl <<< "$(machines_of "$year" eval)"
  read -r -a both <<< "$(printf '%s\n' "${dev[@]}" "${evl[@]}" | awk 'NF && !seen[$0]++' | xargs)"
  say "dcase$year: dev ${dev[*]:-none}; eval ${evl[*]:-none}"
  if [ ${#both[@]} -eq 0 ]; then continue; fi
  get_data "$year" "${both[@]}"
  for system in $SYSTEMS; do
    if [ "$system" = auto ]; then system=$(asd list default-system --year "$year"); fi
    for m in "${dev[@]}"; do train_and_test "$year" "$system" dev "$m"; done
    if [ ${#dev[@]} -gt 0 ]; then evaluate "$year" "$system" dev; fi
    for m in "${evl[@]}"; do train_and_test "$year" "$system" eval "$m"; done
    if [ ${#evl[@]} -gt 0 ]; then
      if has_eval_truth "$year"; then
        evaluate "$year" "$system" eval
      else
        say "dcase$year eval: no ground truth in $DATA_ROOT/dcase$year/eval_data; not scored"
      fi
      package "$year" "$system"
    fi
  done
done
say "done: $OUT/submissions"
