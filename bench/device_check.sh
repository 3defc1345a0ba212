#!/usr/bin/env bash
# The GPU check, in one script and one log: on a fresh machine with one NVIDIA GPU and torch
# installed (with pybind11, scikit-build-core, cmake, ninja and nvcc), from the repository root:
#
#   bench/device_check.sh [--data-dir DIR] [--log FILE]      # about 8 minutes on an H100/H200
#   bench/device_check.sh --cpu-smoke [--log FILE]           # the same steps, tiny, on the CPU (CI)
#
#   1. build and install the extension with CUDA: pip install --no-build-isolation --no-deps .
#   2. the CUDA tests (pytest -m cuda: every op against its twin on the GPU, every method's steps
#      under torch.cuda.set_sync_debug_mode("error"), the loaders on the device)
#   3. bench/ops.py on the GPU: compiled ops against their twins, with achieved GB/s and the
#      share of the device's peak bandwidth for the barrier and FBR ops
#   4. bench/methods.py on cifar10 / resnet32, batch 128: every method's step time / ce's, in one
#      process, with --amp off and with --amp bf16
#   5. a 3-epoch ebomlc run with the paper's preset (ebomlc-cifar10) on real CIFAR-10, when
#      DIR holds it (DIR/cifar10/cifar10.npz or the official pickles; default $NRCORE_DATA,
#      else ../shared/data); otherwise the preset's 3 epochs on the random stand-in (seconds per
#      epoch only) and the log says so
#   6. real data trained end to end on the device: scikit-learn's digits at sym80, ce and ebomlc,
#      20 epochs each (their accuracies should match a CPU run's within a few points)
#   7. the ebomlc run again under torchrun, one process per GPU with NCCL (gloo, 2 processes, on
#      the CPU in the smoke run)
#
# Each step is killed after a stated limit on the GPU, so one hung step cannot eat the rest.
# Steps 3-5 time on CIFAR-shaped data; without real CIFAR-10 they use a random stand-in (timing
# does not depend on pixel values) and the log says so. Every step's output, its exit status and
# seconds go to the log (default device_check.log); the script exits non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."

smoke=0
log=device_check.log
data_dir="${NRCORE_DATA:-../shared/data}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu-smoke) smoke=1 ;;
    --log) log="$2"; shift ;;
    --data-dir) data_dir="$2"; shift ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    *) echo "device_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
python_bin="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
: > "$log"
failed=()

say() { echo "$*" | tee -a "$log"; }

step() {  # step NAME SECONDS COMMAND...: run (killed after SECONDS on the GPU), log its output, status and seconds
  local name="$1" limit="$2"; shift 2
  say ""
  say "=== $name: $*"
  local start=$(date +%s)
  if [[ $smoke -eq 1 ]]; then limit=0; fi  # CI bounds its own time
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  say "=== $name: exit $rc in $(( $(date +%s) - start ))s"
  [[ $rc -eq 0 ]] || failed+=("$name")
}

if [[ $smoke -eq 1 ]]; then
  device=cpu
  say "device_check.sh --cpu-smoke: the GPU check's steps at tiny sizes on the CPU ($(date -u +%FT%TZ))"
else
  device=cuda
  say "device_check.sh on $(hostname) ($(date -u +%FT%TZ))"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$log"
fi
"$python_bin" -c "import torch, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', platform.python_version(), 'gpu', torch.cuda.is_available())" 2>&1 | tee -a "$log"

# 1. build. The smoke run keeps the installed (CPU) build: CI has just built it.
if [[ $smoke -eq 0 ]]; then
  step build 360 "$python_bin" -m pip install --no-build-isolation --no-deps .
  "$python_bin" - <<'PY' 2>&1 | tee -a "$log"
import torch
from nrcore import ops
print("nrcore.ops backend on cuda:", ops.backend(torch.device("cuda")))
PY
fi

# CIFAR-shaped data for the timing steps: the real files when present, else a random stand-in
if [[ -f "$data_dir/cifar10/cifar10.npz" || -d "$data_dir/cifar-10-batches-py" || -d "$data_dir/cifar10/cifar-10-batches-py" ]]; then
  real_cifar=1
  timing_data=(--dataset cifar10 --data-dir "$data_dir")
  say "CIFAR-10 found under $data_dir"
else
  real_cifar=0
  n=$([[ $smoke -eq 1 ]] && echo 600 || echo 10000)
  "$python_bin" - "$work/cifar_like.npz" "$n" <<'PY'
import sys
import numpy as np
n = int(sys.argv[2])
g = np.random.default_rng(0)
np.savez(sys.argv[1], x=g.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), y=np.arange(n) % 10,
         x_test=g.integers(0, 256, (n // 5, 32, 32, 3), dtype=np.uint8), y_test=np.arange(n // 5) % 10)
PY
  timing_data=(--dataset custom --data-dir "$work/cifar_like.npz" --clean-frac 0.02)
  say "no CIFAR-10 under $data_dir: the timing steps use $n random CIFAR-shaped images (timing only)"
fi

# 2. the CUDA tests (the smoke run: the same selection, which skips without a GPU, and the CPU loader tests)
# pytest-xdist, where installed, spreads the GPU tests over a few processes sharing the device
parallel=()
if [[ $smoke -eq 0 ]] && "$python_bin" -c "import xdist" 2>/dev/null; then parallel=(-n 6); fi
step tests 300 "$python_bin" -m pytest -q -p no:cacheprovider "${parallel[@]}" -m cuda tests
step loader-tests 120 "$python_bin" -m pytest -q -p no:cacheprovider tests/data/test_data_loader.py

# 3. ops
if [[ $smoke -eq 1 ]]; then
  step ops 0 "$python_bin" bench/ops.py --device cpu --only fbr,barrier --reps 1 --sample-ms 1 --threads 1
else
  step ops 150 "$python_bin" bench/ops.py --device cuda --reps 7
fi

# 4. step cost of every method / ce, without and with bf16 autocast
if [[ $smoke -eq 1 ]]; then
  sizes=(--methods ce,fbr,meta,ebomlc --model cnn --batch-size 32 --steps 2 --warmup 1 --repeats 1 --threads 1)
else
  sizes=(--model resnet32 --batch-size 128 --steps 10 --warmup 3 --repeats 3)
fi
for amp in off bf16; do
  step "methods-amp-$amp" 180 "$python_bin" bench/methods.py "${timing_data[@]}" --noise sym40 --device "$device" --amp "$amp" --no-memory "${sizes[@]}"
done

# 5. a short ebomlc run with the paper's preset
run_dir="$work/ebomlc"
if [[ $real_cifar -eq 1 && $smoke -eq 0 ]]; then
  step ebomlc-cifar10 240 "$python_bin" -m nrcore train --preset ebomlc-cifar10 --noise unif40 --data-dir "$data_dir" --epochs 3 --out "$run_dir"
elif [[ $real_cifar -eq 1 ]]; then
  step ebomlc-cifar10 0 "$python_bin" -m nrcore train --preset ebomlc-cifar10 --noise unif40 --data-dir "$data_dir" --epochs 1 \
    --model cnn --train-size 500 --clean-size 100 --val-size 100 --threads 1 --out "$run_dir"
else
  say ""
  say "=== ebomlc-cifar10: no real CIFAR-10 under $data_dir (pass --data-dir DIR holding cifar10/cifar10.npz):"
  say "    the preset's schedule runs on the random stand-in instead (its seconds per epoch; accuracy means nothing)"
  if [[ $smoke -eq 1 ]]; then
    step ebomlc-cifar10-standin 0 "$python_bin" -m nrcore train --preset ebomlc-cifar10 "${timing_data[@]}" --noise unif40 --epochs 1 \
      --model cnn --threads 1 --out "$run_dir"
  else
    step ebomlc-cifar10-standin 240 "$python_bin" -m nrcore train --preset ebomlc-cifar10 "${timing_data[@]}" --noise unif40 --epochs 3 --out "$run_dir"
  fi
fi
summary() {
  "$python_bin" -c "import json,sys; s=json.load(open(sys.argv[1])); print({k: s.get(k) for k in ('status','method','dataset','model','epochs','test_acc_last','test_acc_best_val','seconds_per_epoch','device','amp','ops_backend','processes')})" "$1/summary.json" 2>&1 | tee -a "$log"
}
[[ -f "$run_dir/summary.json" ]] && summary "$run_dir"

# 6. real data trained on the device end to end: scikit-learn's digits (bundled, so it is always
# there), ce and ebomlc, 20 epochs each; the accuracies should match a CPU run's within a few points
for m in ce ebomlc; do
  if [[ $smoke -eq 1 ]]; then
    step "digits-$m" 0 "$python_bin" -m nrcore train --method "$m" --noise sym80 --epochs 1 --threads 1 --device cpu --out "$work/digits-$m"
  else
    step "digits-$m" 120 "$python_bin" -m nrcore train --method "$m" --noise sym80 --epochs 20 --device cuda --out "$work/digits-$m"
  fi
  [[ -f "$work/digits-$m/summary.json" ]] && summary "$work/digits-$m"
done

# 7. the same ebomlc run under torchrun: NCCL with one process per GPU (gloo, two processes, on the
# CPU); its accuracy must equal step 6's up to the order of floating-point sums
if [[ $smoke -eq 1 ]]; then
  step torchrun-digits-ebomlc 0 "$python_bin" -m torch.distributed.run --standalone --nproc-per-node 2 -m nrcore train \
    --method ebomlc --noise sym80 --epochs 1 --threads 1 --device cpu --out "$work/torchrun-ebomlc"
else
  gpus=$("$python_bin" -c "import torch; print(torch.cuda.device_count())")
  step torchrun-digits-ebomlc 120 "$python_bin" -m torch.distributed.run --standalone --nproc-per-node "$gpus" -m nrcore train \
    --method ebomlc --noise sym80 --epochs 20 --device cuda --out "$work/torchrun-ebomlc"
fi
[[ -f "$work/torchrun-ebomlc/summary.json" ]] && summary "$work/torchrun-ebomlc"

say ""
if [[ ${#failed[@]} -gt 0 ]]; then
  say "device_check: FAILED steps: ${failed[*]} (log: $log)"
  exit 1
fi
say "device_check: all steps passed (log: $log)"
