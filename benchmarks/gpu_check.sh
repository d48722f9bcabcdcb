#!/usr/bin/env bash
# The GPU check, prepared for a session lent the H200 (see /work/.library/device/): ONE call of the device
# tool, from the repository root, about 8 minutes:
#
#     run(command="bash benchmarks/gpu_check.sh", timeout_s=600)
#
# 1. parity: benchmarks/device_check.py on the GPU (tiny checkpoints; float32 with TF32 off, float16, bfloat16)
# 2. speed: benchmarks/engine_speed.py at the released sizes on random weights, ours against transformers:
#    opt-2.7b float16 (greedy 30 new tokens at batch 1 and 64, encode-only, and captioning 128 JPEG files
#    with and without the decode pool), itm-vit-g float16 (encode-only), flan-t5-xl bfloat16 (greedy 30,
#    encode-only; bfloat16 because ours keeps T5 in bfloat16 when asked for float16, as T5 overflows in it,
#    and transformers would then run a different dtype), then, if time is left, transformers' static cache
#    + compile at opt-2.7b.
# Writes $OUT/gpu_check.log, $OUT/device_check.log and one JSON per step; prints the tables last.
#
# The machine has torch and transformers (5.17 as last seen, not the pinned 5.24: device_check then compares
# against 5.17) and no package registry: blip2 runs from source (PYTHONPATH=src). Nothing here installs.
#
# How the ~8 minutes were estimated (not measured: no GPU was lent when this was written). Writing a
# random checkpoint is the largest cost: transformers initialises the model on the CPU, blip2.testing
# redraws every weight with one CPU generator (~3.8e9 normals for opt-2.7b, ~20 s) and save_pretrained
# writes 15 GB of float32 (~20-40 s); ~60-90 s each for opt-2.7b and flan-t5-xl, ~20 s for itm-vit-g.
# Loading both engines reads that back from the page cache (~15-30 s per size). The timed calls are short
# next to that: transformers' reference figures (H200, float16) are 0.76 s per batch-1 caption and 0.43 s
# per batch of 64 at opt-2.7b, ~1.2 s per batch of 64 at flan-t5-xl, so 2 repeats + 1 warm-up of every cell
# take ~20 s per size. Each step also has its own time limit under an overall deadline of 480 s, so a slow
# step cuts the ones after it short (they are logged as skipped) instead of losing the whole call.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
export PYTHONPATH=src:benchmarks PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
CKPT=/tmp/blip2-gpu-checkpoints
DEADLINE=$((SECONDS + 480))
DEVICE=${DEVICE:-cuda}  # cpu: a dry run of this script's plumbing (engine_speed refuses the sizes there)
BENCH=(--device "$DEVICE" --repeats 2 --checkpoint-dir "$CKPT")

exec > >(tee -a "$OUT/gpu_check.log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv || true
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

# step NAME MAX_SECONDS COMMAND...: runs COMMAND with at most MAX_SECONDS, or what is left before DEADLINE
step() {
    local name=$1 max=$2
    shift 2
    local left=$((DEADLINE - SECONDS))
    local limit=$((max < left ? max : left))
    if ((limit < 30)); then
        echo "== $name: skipped, ${left}s left"
        return
    fi
    echo "== $name (at most ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@"
    echo "== $name: exit $?, $((SECONDS - start))s"
}

step parity 90 $PY benchmarks/device_check.py --device "$DEVICE" > >(tee "$OUT/device_check.log")
step opt-2.7b 190 $PY benchmarks/engine_speed.py "${BENCH[@]}" --dtype float16 --sizes opt-2.7b \
    --batches 1 64 --new-tokens 30 --beams 1 --encode-batches 64 --files-batches 64 --json-out "$OUT/opt-2.7b.json"
step itm-vit-g 60 $PY benchmarks/engine_speed.py "${BENCH[@]}" --dtype float16 --sizes itm-vit-g \
    --encode-batches 1 64 --json-out "$OUT/itm-vit-g.json"
step flan-t5-xl 170 $PY benchmarks/engine_speed.py "${BENCH[@]}" --dtype bfloat16 --sizes flan-t5-xl \
    --batches 1 64 --new-tokens 30 --beams 1 --encode-batches 64 --json-out "$OUT/flan-t5-xl.json"
# Last, as it may not fit: transformers compiles its static-cache decode step once per batch shape.
step hf-compile 150 $PY benchmarks/engine_speed.py "${BENCH[@]}" --dtype float16 --sizes opt-2.7b \
    --batches 1 64 --new-tokens 30 --beams 1 --encode-batches 1 --hf-compile --json-out "$OUT/opt-2.7b-compile.json"
echo "== done in ${SECONDS}s"
