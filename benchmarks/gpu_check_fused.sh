#!/usr/bin/env bash
# GPU check of the fused expert backend on one H200, < 4 minutes, logs under $OUT (or ./gpu_logs).
# Each step has its own time limit; a failing step never stops the next one. The tuned tile configs
# are shared between the steps through $OUT/tune_cache.json (MOE_FUSED_TUNE_CACHE), so each
# (kernel, sizes, rows bucket) is timed once; Triton's compile cache is shared too.
#
#   bash benchmarks/gpu_check_fused.sh
#
# Steps: info (versions, GPU); sweep (every candidate config's time per kernel at the Mixtral
# shape T=4096, torch._grouped_mm candidates included); tests (the GPU tests: bf16 vs the fp32
# loop reference at the Mixtral shape, all grads; empty experts and padding); layer (the Mixtral
# layer table: hf, ours[grouped_mm], ours[fused] (tokens straight to the fused experts at EP=1),
# experts alone, tokens rows); shapes (experts alone vs torch._grouped_mm at the Mixtral /
# Qwen3-MoE / DeepSeek expert shapes, T = 512, 4096, 16384, peak memory, bound; keys not tuned
# by the earlier steps take the first candidate of their list untimed: MOE_FUSED_TUNE=0).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export MOE_FUSED_TUNE_CACHE=$OUT/tune_cache.json
T0=$SECONDS

step() {  # step NAME SECONDS COMMAND...
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  timeout --kill-after=5 "$secs" "$@" >"$OUT/$name.log" 2>&1
  echo "== $name rc=$? $((SECONDS - t0))s (total $((SECONDS - T0))s)"
}

step info 10 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv;
  python3 -c "import torch, triton; print(\"torch\", torch.__version__, \"triton\", triton.__version__)"'
cat "$OUT/info.log"
step sweep 75 python3 benchmarks/sweep_fused_tiles.py --shapes mixtral:4096 --json "$OUT/sweep.json"
cat "$OUT/sweep.log"
step tests 40 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_fused_experts.py -x -s
grep -E "rel err|passed|failed|Error|error" "$OUT/tests.log" | tail -n 20
step layer 50 python3 benchmarks/bench_mixtral_layer.py --backends grouped_mm,fused --warmup 3 --iters 10 \
  --json "$OUT/layer.json"
tail -n 14 "$OUT/layer.log"
step shapes 60 env MOE_FUSED_TUNE=0 python3 benchmarks/bench_mixtral_layer.py --skip-layer --skip-hf \
  --backends grouped_mm,fused --expert-shapes --shape-tokens 512,4096,16384 --warmup 2 --iters 5 --json "$OUT/shapes.json"
tail -n 32 "$OUT/shapes.log"
echo "== done in $((SECONDS - T0))s"
