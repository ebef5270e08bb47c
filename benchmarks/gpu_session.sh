#!/usr/bin/env bash
# One device session: every GPU check and benchmark of the project, step by step, each under its
# own time limit, logs under $OUT (or ./gpu_logs). A failing step never stops the next one.
#
#   bash benchmarks/gpu_session.sh [STEP ...]      # default: every step, in the order of `steps=` at the end
#
# Steps: build (the optional CUDA extension of csrc/, when moe_dispatch._C does not import yet; a copy of
#        the .so goes to $OUT/ext) info core permute models deepep nvlink modeldisp ep bench layer permute_bench nvlink_bench host
#        gputests (every test marked gpu: the permute and models steps and the rest), bench1 (the bench CLI at --nproc 1:
#        eager vs graphed all_to_all), qwen3_layer, sweep (fused tile configs), shapes (experts
#        alone per model shape). One GPU: bash benchmarks/gpu_session.sh info gputests host
#        permute_bench bench1 layer qwen3_layer shapes
# TransformerEngine / DeepEP are used when importable (see ../shared/DEVICE.md and
# install_hybridep.sh); the steps that need them say so and skip otherwise.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || tail -n 3 "$OUT/install.log"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # also works where the editable install cannot build
# Fused-expert tile configs tuned once per machine, shared by every step (kept while the machine is warm).
export MOE_FUSED_TUNE_CACHE=${MOE_FUSED_TUNE_CACHE:-$PWD/.gpu/tune_cache.json}; mkdir -p "$(dirname "$MOE_FUSED_TUNE_CACHE")"

step() {  # step NAME SECONDS COMMAND...
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  timeout --kill-after=10 "$secs" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name rc=$rc $((SECONDS - t0))s"
  grep -E "PASS|FAIL|passed|failed|error|Error|SKIP" "$OUT/$name.log" | grep -v "^  " | tail -n 12
}

run_info() {
  step info 60 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nvidia-smi topo -m;
    python3 -c "import torch, triton; print(\"torch\", torch.__version__, \"triton\", triton.__version__, \"gpus\", torch.cuda.device_count())";
    python3 -c "import transformer_engine.pytorch as te; print(\"TE ok\")" || true;
    python3 -c "import deep_ep; print(\"deep_ep ok\")" || true'
  cat "$OUT/info.log" | head -20
}
run_build() {
  python3 -c "import moe_dispatch._C" 2>/dev/null && { echo "== build: moe_dispatch._C already imports"; return; }
  step build ${BUILD_SECS:-400} env MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
    MOE_DISPATCH_BUILD_CUDA=1 python3 setup.py build_ext --inplace
  tail -n 3 "$OUT/build.log"
  mkdir -p "$OUT/ext" && cp moe_dispatch/_C*.so "$OUT/ext/" 2>/dev/null
  python3 -c "import moe_dispatch._C as c; print('moe_dispatch._C imports:', c.__file__)"
}
run_core() { [ "$NGPU" -ge 2 ] && step core 150 torchrun --standalone --nproc-per-node 2 tests/distributed/all_to_all_equivalence.py; }
run_permute() { step permute 150 python3 -m pytest -q -m gpu tests/test_permute.py tests/test_permute_triton.py tests/test_permute_cuda.py -x; }
run_models() { step models 200 python3 -m pytest -q -m gpu tests/models; }
run_deepep() {
  python3 -c "import deep_ep" 2>/dev/null || { [ -d .deepep ] && step deepep_build 200 bash install_hybridep.sh --src .deepep --intranode-only --work-dir /tmp/deepep-build; }
  [ "$NGPU" -ge 2 ] && step deepep 150 torchrun --standalone --nproc-per-node 2 tests/distributed/deepep_equivalence.py
}
run_nvlink() { [ "$NGPU" -ge 2 ] && step nvlink 200 torchrun --standalone --nproc-per-node 2 tests/distributed/nvlink_equivalence.py; }
run_modeldisp() { [ "$NGPU" -ge 2 ] && step modeldisp 200 torchrun --standalone --nproc-per-node 2 tests/distributed/model_dispatchers_equivalence.py; }
run_ep() { [ "$NGPU" -ge 2 ] && step ep 200 torchrun --standalone --nproc-per-node "$NGPU" tests/distributed/mixtral_ep_equivalence.py; }
run_bench() {
  step bench 240 python3 -m moe_dispatch.bench --nproc 2 --out "$OUT/bench.json" ${BENCH_ARGS:-}
  sed -n '/^# moe_dispatch bench/,$p' "$OUT/bench.log"
}
run_layer() { step layer ${LAYER_SECS:-150} python3 benchmarks/bench_mixtral_layer.py --json "$OUT/layer.json" ${LAYER_ARGS:-}; tail -n 15 "$OUT/layer.log"; }
run_qwen3_layer() { step qwen3_layer 90 python3 benchmarks/bench_mixtral_layer.py --qwen3-moe --json "$OUT/qwen3_layer.json"; tail -n 8 "$OUT/qwen3_layer.log"; }
run_gputests() { step gputests ${GPUTESTS_SECS:-300} python3 -m pytest -q -p no:cacheprovider -m gpu -rfE tests; }
run_bench1() {
  step bench1 90 python3 -m moe_dispatch.bench --nproc 1 --tokens 128 4096 16384 --hidden 4096 --experts 8 --topk 2 \
    --backends all_to_all+torch all_to_all+triton all_to_all+cuda all_to_all+te all_to_all+capacity --out "$OUT/bench1.json"
  sed -n '/^# moe_dispatch bench/,$p' "$OUT/bench1.log"
}
run_sweep() { step sweep 90 python3 benchmarks/sweep_fused_tiles.py --shapes mixtral:4096 --json "$OUT/sweep.json"; tail -n 30 "$OUT/sweep.log"; }
run_shapes() {
  step shapes ${SHAPES_SECS:-120} python3 benchmarks/bench_mixtral_layer.py --skip-layer --skip-hf --backends grouped_mm,fused ${SHAPES_ARGS:-} \
    --expert-shapes --shape-tokens 512,4096,16384 --warmup 2 --iters 5 --json "$OUT/shapes.json"
  tail -n 32 "$OUT/shapes.log"
}
run_permute_bench() { step permute_bench 150 python3 benchmarks/bench_permute.py --json "$OUT/permute_bench.json" ${PERMUTE_BENCH_ARGS:-}; tail -n 20 "$OUT/permute_bench.log"; }
run_host() { step host 120 python3 benchmarks/host_overhead.py --json "$OUT/host.json"; tail -n 25 "$OUT/host.log"; }
run_nvlink_bench() { [ "$NGPU" -ge 2 ] && { step nvlink_bench 240 torchrun --standalone --nproc-per-node 2 benchmarks/bench_nvlink.py --json "$OUT/nvlink_bench.json" ${NVLINK_BENCH_ARGS:-}; tail -n 30 "$OUT/nvlink_bench.log"; }; }

# (gputests runs every test marked gpu, the permute and models steps included)
steps=${*:-build info gputests core deepep nvlink modeldisp ep bench bench1 layer qwen3_layer permute_bench host nvlink_bench sweep shapes}
for s in $steps; do "run_$s"; done

# The device tool returns at most 8 files: pack every log and JSON into one archive.
if [ -n "${PACK_LOGS:-1}" ] && [ "$OUT" != "gpu_logs" ]; then
  tar czf "$OUT/logs_$(date +%H%M%S).tgz" -C "$OUT" $(cd "$OUT" && ls *.log *.json 2>/dev/null) && (cd "$OUT" && rm -f *.log *.json)
  [ -d "$OUT/ext" ] && tar czf "$OUT/ext.tgz" -C "$OUT" ext && rm -rf "$OUT/ext"
fi
