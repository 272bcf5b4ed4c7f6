#!/bin/bash
# device helper: assemble the SmolLM2 GGUF (part.ab carried now, part.aa copied by an earlier call), then run
# the given sweep config files in parallel on the GPU (cpu_like). Usage: bash experiments/sweeps/run3.sh CFG...
# Make the parts here with: split -b 50M SmolLM2-135M-Instruct.Q4_1.gguf .carry/smol/part.
# First call: carry [".carry/smol/part.aa"] and run `mkdir -p /tmp/smol && cp .carry/smol/part.aa /tmp/smol/`;
# then carry [".carry/smol/part.ab", ".carry/whl"] (the gguf wheel) and run this script.
set -e
if [ ! -f /tmp/smol/smollm2.gguf ]; then cp .carry/smol/part.ab /tmp/smol/ && cat /tmp/smol/part.aa /tmp/smol/part.ab > /tmp/smol/smollm2.gguf || { echo "no GGUF: carry .carry/smol/part.aa first"; exit 1; }; fi
pip install -q --no-deps --target /tmp/site .carry/whl/gguf-*.whl >/dev/null 2>&1 || true
export PYTHONPATH=/tmp/site LORAKIT_CACHE=/tmp/lkc PYTHONUNBUFFERED=1
for cfg in "$@"; do
  n=$(basename $cfg .json)
  python bench/identity_sweep.py --model /tmp/smol/smollm2.gguf --device cuda --torch_dtype float32 --cpu_like \
    --configs "$(cat $cfg)" --results $OUT/$n.json --out /tmp/sw-$n > $OUT/$n.log 2>&1 &
  sleep ${SWEEP_STAGGER:-45}
done
wait
grep -h "SWEEP\|Error\|error" $OUT/*.log | tail -60
