#!/usr/bin/env bash
# Issue 13's GPU ladder: the PyTorch reference and chinchax's train step, one device, one call.
#
#   benchmarks/gpu_ladder.sh PATH/TO/torch_gpt_peer.py [OUT_DIR]
#
# The reference script is not part of the project; pass its path. OUT_DIR (default: $OUT,
# else ./gpu_ladder_out) receives torch_reference.{json,txt}, chinchax_ladder.txt (both
# variants, ratios against the reference measured just before), moe.txt and
# compile_time.txt. PYTHON picks the interpreter (default: python). STEPS sets the timed
# steps per row (default 20). PARTS picks what runs (default: "reference ladder moe compile";
# "population" adds benchmarks/population.py's tokens/s for P = 1..16, vmap and loop);
# without "reference" the ladder compares against the issue's table.
set -euo pipefail
ref=${1:?usage: benchmarks/gpu_ladder.sh PATH/TO/torch_gpt_peer.py [OUT_DIR]}
out=${2:-${OUT:-gpu_ladder_out}}
py=${PYTHON:-python}
steps=${STEPS:-20}
parts=" ${PARTS:-reference ladder moe compile} "
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt" || true
"$py" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" | tee -a "$out/device.txt"
if [[ $parts == *" reference "* ]]; then
  "$py" "$ref" --steps 30 --out "$out/torch_reference.json" | tee "$out/torch_reference.txt"
fi
reference=()
[[ -f $out/torch_reference.json ]] && reference=(--reference-json "$out/torch_reference.json")
if [[ $parts == *" ladder "* ]]; then
  "$py" "$here/train_throughput.py" --full --steps "$steps" "${reference[@]}" | tee "$out/chinchax_ladder.txt"
fi
if [[ $parts == *" moe "* ]]; then
  "$py" "$here/train_throughput.py" --full --moe --sizes 0 --variants levers --steps "$steps" | tee "$out/moe.txt"
fi
if [[ $parts == *" population "* ]]; then  # issue 12: vmapped populations, P = 1..16 (not in the default PARTS)
  "$py" "$here/population.py" --no-sweep --steps "$steps" | tee "$out/population.txt"
fi
if [[ $parts == *" compile "* ]]; then
  "$py" "$here/compile_time.py" --repeats 1 | tee "$out/compile_time.txt"
fi
