#!/usr/bin/env bash
# Issue 16 GPU checkpoint, one H200, run from the repo root (< 5 minutes). Logs go to $OUT.
#   bash benchmarks/gpu_check_fastpath.sh
# 1. GPU tests of the fast path, capacity mode (sync debug mode "error"), graph replay == eager
# 2. the permute tests marked gpu   3. host_overhead.py   4. bench_permute at T=4096
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/gpu_check_fastpath}"
mkdir -p "$OUT"
{
  date -u; git rev-parse HEAD 2>/dev/null; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT/env.log" 2>&1

step() {  # name, timeout (s), command...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc ($(( $(date +%s) - t0 )) s)" | tee -a "$OUT/summary.log"
}

step test_fastpath_gpu 110 python -m pytest -q -p no:cacheprovider -rA tests/test_fastpath_gpu.py
step test_permute_gpu 110 python -m pytest -q -p no:cacheprovider -m gpu tests/test_permute_triton.py tests/test_permute.py tests/test_indices_converter.py
step host_overhead 40 python benchmarks/host_overhead.py --json "$OUT/host_overhead.json"
step bench_permute 40 python benchmarks/bench_permute.py --shapes 4096,4096,8,2 --json "$OUT/bench_permute.json"

for f in test_fastpath_gpu test_permute_gpu host_overhead bench_permute; do
  echo "===== $f (tail)"; tail -n 40 "$OUT/$f.log"
done
cat "$OUT/summary.log"
