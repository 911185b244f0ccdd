#!/usr/bin/env bash
# Unknown training lr / batch size: run a short reconstruction (1 x 50 steps, recons.py --grid_search 1)
# for every candidate and suggest the one with the lowest final loss (the paper's selection).
#
#   bash grid_search.sh                                   # the paper's sweep: lr 0.020 .. 0.001, bs 20
#   LR_LIST="0.01 0.005" BS_LIST="12 20 32" ARGS="--dataset fashion_mnist --model_name mlp" bash grid_search.sh
#   JOBS=2 bash grid_search.sh                            # 2 candidates at a time on the CPU
#   GPUS=0,1,2,3 bash grid_search.sh                      # one candidate per GPU (CUDA_VISIBLE_DEVICES)
#   LAUNCHER=submitit SLURM_PARTITION=gpu GPUS_PER_JOB=1 bash grid_search.sh   # a SLURM job array
#
# ARGS: flags naming the training run (default the paper's). GRID_DIR: where the short runs go (they are
# scratch and are replaced on every sweep). JOBS: parallel candidates on the CPU, each given
# OMP_NUM_THREADS = cores / JOBS unless set. GPUS: a comma list of device ids; one worker per GPU takes
# the candidates in turn. In parallel each run's output goes to $GRID_DIR/<run>.log.
# LAUNCHER=submitit: one submitit job per candidate (pip install submitit), on SLURM when submitit finds
# it, else as local processes (SUBMITIT_CLUSTER=local forces that); SLURM_PARTITION, GPUS_PER_JOB and
# TIMEOUT_MIN (default 60) set the jobs' resources; logs go to $GRID_DIR/submitit.
# Prints a table sorted by loss; exits 1 if any run failed.
set -u
here=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python}
LR_LIST=${LR_LIST:-$(LC_ALL=C seq 0.020 -0.001 0.001)}
BS_LIST=${BS_LIST:-20}
ARGS=${ARGS:---num_imgs_per_class 2 --tlr 1e-2 --bs 20 --steps 8 --rec_lr 1e-2}
GRID_DIR=${GRID_DIR:-ckpts/grid_search}
JOBS=${JOBS:-1}
GPUS=${GPUS:-}

if [ -n "$GPUS" ]; then
  IFS=, read -r -a slots <<< "$GPUS"
else
  case "$JOBS" in ''|*[!0-9]*|0) echo "grid_search.sh: JOBS must be a positive integer, got '$JOBS'" >&2; exit 2;; esac
  slots=()
  for ((i = 0; i < JOBS; i++)); do slots+=("cpu$i"); done
fi
nslots=${#slots[@]}
threads=$(( $(nproc) / nslots )); [ "$threads" -ge 1 ] || threads=1

candidates=()
for bs in $BS_LIST; do
  for lr in $LR_LIST; do candidates+=("$lr $bs"); done
done
echo "Candidate batch sizes: $BS_LIST; learning rates: $(echo $LR_LIST | tr '\n' ' ')"
echo "${#candidates[@]} short runs, $nslots at a time"
mkdir -p "$GRID_DIR"
failures="$GRID_DIR/failed.txt"
: > "$failures"

run_candidate() {  # run_candidate LR BS SLOT
  local dir="$GRID_DIR/rlr$1_rbs$2"
  local cmd=("$PYTHON" "$here/recons.py")
  # shellcheck disable=SC2086  # ARGS is a list of flags
  cmd+=($ARGS --rlr "$1" --rbs "$2" --grid_search 1 --recons_dir "$dir" --overwrite)
  local status=0
  if [ "$nslots" -eq 1 ] && [ -z "$GPUS" ]; then
    "${cmd[@]}" || status=$?
  elif [ -n "$GPUS" ]; then
    CUDA_VISIBLE_DEVICES="$3" "${cmd[@]}" > "$dir.log" 2>&1 || status=$?
  else
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-$threads} "${cmd[@]}" > "$dir.log" 2>&1 || status=$?
  fi
  if [ "$status" -ne 0 ]; then
    echo "grid_search.sh: the run with --rlr $1 --rbs $2 failed${GPUS:+ on GPU $3} (see ${dir}.log)" >&2
    echo "$dir" >> "$failures"
  fi
}

if [ "${LAUNCHER:-}" = submitit ]; then
  # shellcheck disable=SC2016  # the Python below reads its arguments, not the shell's variables
  PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -c '
import os, shlex, sys, recons, utils
from simudy.search import submit_grid_search
grid_dir, args, candidates = os.path.abspath(sys.argv[1]), shlex.split(sys.argv[2]), sys.argv[4:]
argvs = [args + ["--rlr", lr, "--rbs", bs, "--grid_search", "1", "--overwrite",
                 "--recons_dir", os.path.join(grid_dir, f"rlr{lr}_rbs{bs}")] for lr, bs in map(str.split, candidates)]
env = os.environ.get
failed = utils.run_main(lambda _: submit_grid_search(
    recons.run_argv, argvs, os.path.join(grid_dir, "submitit"), env("SUBMITIT_CLUSTER"), int(env("TIMEOUT_MIN", "60")),
    env("SLURM_PARTITION"), int(env("GPUS_PER_JOB", "0"))), lambda: None)
with open(sys.argv[3], "a") as f:
    f.writelines(sys.argv[1] + "/" + os.path.basename(argv[-1]) + "\n" for argv in failed)
' "$GRID_DIR" "$ARGS" "$failures" "${candidates[@]}" || echo "submitit" >> "$failures"
  nslots=0
fi

# Worker s takes candidates s, s + nslots, ... in turn (the short runs take about equally long).
for ((s = 0; s < nslots; s++)); do
  (
    for ((i = s; i < ${#candidates[@]}; i += nslots)); do
      # shellcheck disable=SC2086
      run_candidate ${candidates[$i]} "${slots[$s]}"
    done
  ) &
done
wait

dirs=()
for c in "${candidates[@]}"; do
  set -- $c
  dir="$GRID_DIR/rlr$1_rbs$2"
  grep -qxF "$dir" "$failures" || dirs+=("$dir")
done
failed=0
[ -s "$failures" ] && failed=1
rm -f "$failures"
if [ ${#dirs[@]} -gt 0 ]; then
  PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -c \
    'import sys; from simudy.search import summarise_grid_search; summarise_grid_search(sys.argv[1], sys.argv[2:])' "$GRID_DIR" "${dirs[@]}" \
    || failed=1
fi
exit $failed
