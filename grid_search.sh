#!/usr/bin/env bash
# Unknown training lr / batch size: run a short reconstruction (1 x 50 steps, recons.py --grid_search 1)
# for every candidate and suggest the one with the lowest final loss (the paper's selection).
#
#   bash grid_search.sh                                   # the paper's sweep: lr 0.020 .. 0.001, bs 20
#   LR_LIST="0.01 0.005" BS_LIST="12 20 32" ARGS="--dataset fashion_mnist --model_name mlp" bash grid_search.sh
#
# ARGS: flags naming the training run (default the paper's). GRID_DIR: where the short runs go (they are
# scratch and are replaced on every sweep). Prints a table sorted by loss; exits 1 if any run failed.
set -u
here=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python}
LR_LIST=${LR_LIST:-$(LC_ALL=C seq 0.020 -0.001 0.001)}
BS_LIST=${BS_LIST:-20}
ARGS=${ARGS:---num_imgs_per_class 2 --tlr 1e-2 --bs 20 --steps 8 --rec_lr 1e-2}
GRID_DIR=${GRID_DIR:-ckpts/grid_search}

echo "Candidate batch sizes: $BS_LIST; learning rates: $(echo $LR_LIST | tr '\n' ' ')"
failed=0
dirs=()
for bs in $BS_LIST; do
  for lr in $LR_LIST; do
    dir="$GRID_DIR/rlr${lr}_rbs${bs}"
    # shellcheck disable=SC2086  # ARGS is a list of flags
    if "$PYTHON" "$here/recons.py" $ARGS --rlr "$lr" --rbs "$bs" --grid_search 1 \
         --recons_dir "$dir" --overwrite; then
      dirs+=("$dir")
    else
      echo "grid_search.sh: the run with --rlr $lr --rbs $bs failed" >&2
      failed=1
    fi
  done
done
if [ ${#dirs[@]} -gt 0 ]; then
  PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -c \
    'import sys, utils; utils.summarise_grid_search(sys.argv[1], sys.argv[2:])' "$GRID_DIR" "${dirs[@]}" \
    || failed=1
fi
exit $failed
