#!/usr/bin/env bash
# Issue 16 GPU checkpoint, one H200, run from the repo root; stops itself before 4 minutes
# (each step gets at most what is left of a 225 s budget). Logs go to $OUT.
#   bash benchmarks/gpu_check_fastpath.sh
# Steps, most important first: the GPU tests of issue 16 (fast launches bitwise, capacity mode
# under sync debug mode "error", graph replay == eager, capture_moe_layer), host_overhead.py,
# bench_permute at T=4096, the bench CLI at --nproc 1 (eager vs graphed all_to_all), the
# Mixtral layer bench's capacity / graphed rows, the permute tests marked gpu.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/gpu_check_fastpath}"
mkdir -p "$OUT"
START=$(date +%s)
BUDGET=225
{
  date -u; git rev-parse HEAD 2>/dev/null; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT/env.log" 2>&1

step() {  # name, timeout (s), command...
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  if [ "$limit" -lt 5 ]; then echo "$name: skipped (time budget)" | tee -a "$OUT/summary.log"; return; fi
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc ($(( $(date +%s) - t0 )) s, limit $limit s)" | tee -a "$OUT/summary.log"
}

step test_fastpath_gpu 90 python -m pytest -q -p no:cacheprovider -rA tests/test_fastpath_gpu.py
step host_overhead 40 python benchmarks/host_overhead.py --json "$OUT/host_overhead.json"
step bench_permute 35 python benchmarks/bench_permute.py --shapes 4096,4096,8,2 --json "$OUT/bench_permute.json"
step bench_cli_nproc1 45 python -m moe_dispatch.bench --nproc 1 --tokens 128 4096 --hidden 4096 --experts 8 --topk 2 \
  --backends all_to_all+triton all_to_all+capacity --out "$OUT/bench_cli.json"
step bench_mixtral_graphed 60 python benchmarks/bench_mixtral_layer.py --skip-hf --backends grouped_mm --iters 10 --warmup 3

step test_permute_gpu 80 python -m pytest -q -p no:cacheprovider -m gpu tests/test_permute_triton.py tests/test_permute.py tests/test_indices_converter.py
for f in test_fastpath_gpu host_overhead bench_permute test_permute_gpu bench_cli_nproc1 bench_mixtral_graphed; do
  [ -f "$OUT/$f.log" ] && { echo "===== $f (tail)"; tail -n 40 "$OUT/$f.log"; }
done
cat "$OUT/summary.log"
