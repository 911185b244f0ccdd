#!/usr/bin/env bash
# The device check of issue 12, as one script for one lease of a GPU machine (README, "Running at the
# paper's scale on a GPU"): the test suite on CUDA, and config B at the paper's full width (ResNet-18
# width 64, 20 CIFAR-10 images, lr 1e-2, bs 20) reconstructed side by side with --preset paper, --preset
# resnet and the resnet preset as it was before its pyramid and BN warm start (session 15's first GPU
# run used that one, plain and with --coarse 16 and the warm start), each for at most $MINUTES minutes.
# NAMES picks some of the three; SUITE_DELAY starts the suite that many seconds after the runs.
#
#   OUT=/tmp/out DATA=path/to/cifar10-jpg bash benchmarks/gpu_check.sh
#   OUT=/tmp/out DATA=... WIDTH=4 PRETRAIN_IMGS=3 MINUTES=0.3 DEVICE=cpu TESTS=0 bash benchmarks/gpu_check.sh  # dry run
#
# DATA: an ImageFolder root holding train/<class>/*.jpg (at least 2 + PRETRAIN_IMGS images per class).
# WHEELS: a folder of wheels to install first (packages the GPU machine's image lacks: opacus, submitit,
# lpips). Writes to $OUT: env.txt, tests.log, curves.json (every snapshot's SSIM and the seconds of every
# iteration of each run) and one picture per run.
set -u
OUT=${OUT:?set OUT to the folder for the results}
DATA=${DATA:?set DATA to an ImageFolder root with train/<class>/*.jpg}
WIDTH=${WIDTH:-64}
PRETRAIN_IMGS=${PRETRAIN_IMGS:-500}
MINUTES=${MINUTES:-6.5}
DEVICE=${DEVICE:-cuda}
TESTS=${TESTS:-1}
SUITE_DELAY=${SUITE_DELAY:-0}  # seconds the runs have the GPU to themselves before the suite starts
NAMES=${NAMES:-paper resnet resnet_before_pyramid}
WORK=${WORK:-/tmp/gpu_check}
PY=${PY:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$OUT" "$WORK"
if [ -n "${WHEELS:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    && export PYTHONPATH=/tmp/site
fi
{ date; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1; nproc
  $PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"; } > "$OUT/env.txt" 2>&1

if [ "$TESTS" = 1 ]; then  # the suite on CUDA, beside the runs (their seconds say when it ended)
  (sleep "$SUITE_DELAY"; start=$(date +%s); SIMUDY_TEST_DEVICE=$DEVICE PYTHON=$PY timeout 480 $PY -m pytest tests -q -p no:cacheprovider \
     -o addopts="" > "$OUT/tests.log" 2>&1; echo "exit $? after $(( $(date +%s) - start )) s" >> "$OUT/tests.log") &
fi

B="--dataset folder --data_root $DATA --model_name resnet18 --width $WIDTH --num_imgs_per_class 2 --bs 20"
start=$(date +%s)
$PY train.py $B --lr 1e-2 --pretrain_imgs "$PRETRAIN_IMGS" --device "$DEVICE" --run_dir "$WORK/train" \
  --overwrite > "$WORK/train.log" 2>&1 || { cat "$WORK/train.log" >> "$OUT/env.txt"; exit 1; }
echo "train.py: $(( $(date +%s) - start )) s; $(tail -n 1 "$WORK/train.log")" >> "$OUT/env.txt"

declare -A PRESET=([paper]=paper [resnet]=resnet [resnet_before_pyramid]=resnet)
declare -A EXTRA=([paper]="" [resnet]="" [resnet_before_pyramid]="--pyramid 0 --bn_prior 0")
pids=()
for name in $NAMES; do
  $PY recons.py $B --tlr 1e-2 --preset ${PRESET[$name]} ${EXTRA[$name]} --train_dir "$WORK/train" \
    --recons_dir "$WORK/$name" --device "$DEVICE" --max_minutes "$MINUTES" --overwrite > "$WORK/$name.log" 2>&1 &
  pids+=($!)
done
wait "${pids[@]}"
echo "reconstructions ended at $(( $(date +%s) - start )) s" >> "$OUT/env.txt"

for name in $NAMES; do  # the last snapshot scored and drawn (metrics.py's greedy SSIM matching)
  flags="$B --tlr 1e-2 --preset ${PRESET[$name]} --train_dir $WORK/train --recons_dir $WORK/$name --snapshot last --device $DEVICE"
  { $PY metrics.py $flags && $PY draw_pics.py $flags --sort ssim; } > "$WORK/$name.metrics.log" 2>&1
  tail -n 4 "$WORK/$name.log" "$WORK/$name.metrics.log" >> "$OUT/env.txt"
  cp "$WORK/$name"/metrics/*/reconstruction.png "$OUT/$name.png" 2>/dev/null
done

$PY - "$WORK" "$OUT" $NAMES <<'EOF2' >> "$OUT/env.txt" 2>&1
import csv, json, os, sys
sys.path.insert(0, "benchmarks")
from quality import ssim_curve
work, out, names = sys.argv[1], sys.argv[2], sys.argv[3:]
curves = {}
for name in names:
    run = os.path.join(work, name)
    if not os.path.isfile(os.path.join(run, "log.csv")):
        curves[name] = {"error": open(os.path.join(work, name + ".log")).read()[-2000:]}
        continue
    with open(os.path.join(run, "log.csv")) as f:
        rows = list(csv.DictReader(f))
    curves[name] = {"ssim_curve": ssim_curve(run), "iterations": len(rows),
                    "seconds": [float(r["seconds"]) for r in rows], "match": [float(r["cos"]) for r in rows]}
    print(name, "iterations", len(rows), "SSIM curve", curves[name]["ssim_curve"])
json.dump(curves, open(os.path.join(out, "curves.json"), "w"))
EOF2
wait
echo "done at $(( $(date +%s) - start )) s" >> "$OUT/env.txt"
