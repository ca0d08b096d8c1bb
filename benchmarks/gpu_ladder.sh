#!/usr/bin/env bash
# Issue 13's GPU ladder: the PyTorch reference and chinchax's train step, one device, one call.
#
#   benchmarks/gpu_ladder.sh PATH/TO/torch_gpt_peer.py [OUT_DIR]
#
# The reference script is not part of the project; pass its path. OUT_DIR (default: $OUT,
# else ./gpu_ladder_out) receives torch_reference.{json,txt}, chinchax_ladder.txt (both
# variants, ratios against the reference measured just before), moe.txt and
# compile_time.txt. PYTHON picks the interpreter (default: python). STEPS sets the timed
# steps per row (default 20).
set -euo pipefail
ref=${1:?usage: benchmarks/gpu_ladder.sh PATH/TO/torch_gpt_peer.py [OUT_DIR]}
out=${2:-${OUT:-gpu_ladder_out}}
py=${PYTHON:-python}
steps=${STEPS:-20}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt" || true
"$py" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" | tee -a "$out/device.txt"
"$py" "$ref" --steps 30 --out "$out/torch_reference.json" | tee "$out/torch_reference.txt"
"$py" "$here/train_throughput.py" --full --steps "$steps" --reference-json "$out/torch_reference.json" | tee "$out/chinchax_ladder.txt"
"$py" "$here/train_throughput.py" --full --moe --sizes 0 --variants levers --steps "$steps" | tee "$out/moe.txt"
"$py" "$here/compile_time.py" --repeats 1 | tee "$out/compile_time.txt"
