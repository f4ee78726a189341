#!/usr/bin/env bash
# The checks a session runs when it is lent a GPU, as one script (device time is short):
# environment, the CUDA extension build, the gpu-marked tests, selftest, the throughput bench
# (ViT-B/16 bf16 at batch 256 and 32, every provider) and the attention profile (forward, then backward).
# Everything lands in $OUT (default gpu_out/): one log per step and results.tar.gz with the
# CSV/JSON/PNG files. Each step has its own time limit so one failure does not stop the rest.
#   OUT=gpu_out bash benchmarks/gpu_checks.sh
# STEPS="gpu_tests bench_b256 ..." runs only the named steps (default: all but bench_large; a second
# visit to a GPU reruns what changed); not in the default: bench_large (ViT-L/16 and ViT-H/14 bf16 at
# batch 32), profile_attention_bwd_fp32 (the fp32 attention backward, 9 dots per tile pair since
# its delta is taken from P, against SDPA's fp32 backends), bench_b1 (ViT-B/16 bf16 at batch 1),
# host_time_gpu (a ViT-B/16 block's op calls at batch 1 with Triton's real launches: host us per call
# beside GPU us per call), hard_inputs (the NaN/Inf and GELU-edge tests and the layout gradients on the
# device: tests/ otherwise runs there only its gpu-marked tests) and tma_gemm (tests/test_triton_gemm_tma.py
# on the device, sm_90).
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT/files"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 VIT_KERNELS_CACHE=${VIT_KERNELS_CACHE:-/tmp/vkcache}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} TRITON_INTERPRET=0
PY=${PY:-python3}
LOG="$OUT/steps.log"

STEPS=${STEPS:-gpu_tests bench_b256 bench_b32 selftest profile_attention profile_attention_bwd bench_train_b128}
step() {  # step NAME SECONDS CMD...: run with a time limit, log to files/NAME.log, summary to steps.log
  local name=$1 limit=$2; shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/files/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0)) s (limit $limit)" | tee -a "$LOG"
  tail -n 25 "$OUT/files/$name.log" | tee -a "$LOG"
}

{ date -u; echo "commit ${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}"; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv;
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"; } \
  > "$OUT/files/env.log" 2>&1
cat "$OUT/files/env.log" | tee -a "$LOG"

# The CUDA extension builds in the background while the Triton steps run (minutes on a cold cache).
( timeout 300 $PY -c "import vit_kernels.cuda as c; c.gpu_module(); print('cuda extension built')" \
    > "$OUT/files/cuda_build.log" 2>&1; echo "rc=$?" >> "$OUT/files/cuda_build.log" ) &
BUILD=$!

# tests/ and benchmarks/ each have a conftest.py: run them as two sessions
step gpu_tests ${T_TESTS:-180} $PY -m pytest -q -m gpu -p no:cacheprovider tests -rs --durations=15
step bench_b256 ${T_B256:-140} $PY -m vit_kernels bench vit_base_patch16_224 --dtype bf16 --batch-size 256 \
  --mode inference --providers ${B256_PROVIDERS:-eager,sdpa,compile,triton,tuned} --out "$OUT/files/bench_b256" --no-progress
step bench_b32 ${T_B32:-60} $PY -m vit_kernels bench vit_base_patch16_224 --dtype bf16 --batch-size 32 \
  --mode inference --providers ${B32_PROVIDERS:-eager,sdpa,triton,cuda,tuned} --out "$OUT/files/bench_b32" --no-progress
step selftest ${T_SELFTEST:-50} $PY -m vit_kernels selftest vit_base_patch16_224 --dtype bf16 --backend triton \
  --no-sanitizer --json-out "$OUT/files/selftest.json"
step profile_attention ${T_PROFILE:-40} $PY -m vit_kernels profile-attention --out "$OUT/files/attention" --no-progress
step profile_attention_bwd ${T_PROFILE_BWD:-40} $PY -m vit_kernels profile-attention --mode bwd --tokens 197,577,1025 \
  --providers vk_flash:triton,sdpa:flash,sdpa:efficient,sdpa:cudnn,sdpa:math,eager --no-breakdown \
  --out "$OUT/files/attention_bwd" --no-progress
step profile_attention_bwd_fp32 ${T_PROFILE_BWD:-40} $PY -m vit_kernels profile-attention --mode bwd --dtype fp32 \
  --tokens 197,577 --providers vk_flash:triton,sdpa:efficient,sdpa:math,eager --no-breakdown \
  --out "$OUT/files/attention_bwd_fp32" --no-progress
step bench_train_b128 ${T_TRAIN:-80} $PY -m vit_kernels bench vit_base_patch16_224 --dtype bf16 --batch-size 128 \
  --bench train --providers sdpa,triton,tuned --out "$OUT/files/bench_train_b128" --no-progress
step bench_large ${T_LARGE:-120} $PY -m vit_kernels bench vit_large_patch16_224 vit_huge_patch14_224 --dtype bf16 \
  --batch-size 32 --mode inference --providers eager,sdpa,tuned --out "$OUT/files/bench_large" --no-progress
step bench_b1 ${T_B1:-90} $PY -m vit_kernels bench vit_base_patch16_224 --dtype bf16 --batch-size 1 \
  --mode inference --providers ${B1_PROVIDERS:-eager,sdpa,compile,triton,tuned} --out "$OUT/files/bench_b1" --no-progress
# Numerically hard inputs and the backward's NaN/Inf pattern on the device's own kernels (only the interpreter
# has run them; an fp32 tf32x3 dot splits an Inf into Inf and Inf - Inf = NaN, which Triton's F32DotTC pass
# masks out of the small parts' products (Triton 3.8, sm_90 TTGIR: cmpf uno + select), so Inf should stay
# Inf as in eager: not yet seen on a device), and
# the gradients of every argument layout
step hard_inputs ${T_HARD:-120} $PY -m pytest -q -p no:cacheprovider tests/test_hard_inputs.py tests/test_backward.py \
  tests/test_layouts.py -k "nan_and_inf or gelu_epilogue or layout_gradients" -x -rs --durations=5
# sm_90's TMA GEMM on the device (LayerNorm fold with W' in the prologue's workspace since 2026-11-27, only the
# interpreter and the AOT compile have seen it): every config and epilogue against the float64 oracle
step tma_gemm ${T_TMA:-150} $PY -m pytest -q -p no:cacheprovider tests/test_triton_gemm_tma.py -x -rs --durations=5
step host_time_gpu ${T_HOST:-60} $PY -m pytest -q -m gpu -p no:cacheprovider benchmarks/test_host_time.py \
  --benchmark-only -s -k real_launches
wait $BUILD; tail -n 5 "$OUT/files/cuda_build.log" | tee -a "$LOG"
cp "$VIT_KERNELS_CACHE"/tuning*.json "$OUT/files/" 2>/dev/null
tar czf "$OUT/results.tar.gz" -C "$OUT" files && rm -rf "$OUT/files"
echo "done" | tee -a "$LOG"
