#!/usr/bin/env bash
# On a machine with a GPU and PyTorch: build the extension in place, run the op's tests (CUDA and
# CPU) and the GPU benchmark. Meant to finish within 10 minutes on an H100/H200.
#   bash benchmarks/gpu_check.sh            (PYTHON=... to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
LOG_DIR="${OUT:-${TMPDIR:-/tmp}}"

"$PY" - <<'PYEOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device")
p = torch.cuda.get_device_properties(0)
print(f"GPU: {p.name}, {p.multi_processor_count} SMs, torch {torch.__version__}, CUDA {torch.version.cuda}")
PYEOF

# Build for this GPU only (fast), with every core.
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
rm -f kdplug/_C*.so
start=$(date +%s)
if ! "$PY" setup.py build_ext --inplace > "$LOG_DIR/gpu_check_build.log" 2>&1; then
    tail -60 "$LOG_DIR/gpu_check_build.log"
    exit 1
fi
echo "built kdplug._C for sm_${TORCH_CUDA_ARCH_LIST} in $(( $(date +%s) - start )) s"

export PYTHONPATH="$PWD:$PWD/plugins${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -m kdplug doctor
# The op's tests on the GPU: kl (test_ops, test_ops_cuda's forced thread layouts), every divergence
# and the fused hard-label term (test_ops_divergences), the top-k teacher with every divergence
# (test_ops_topk), the kernels' fault record for bad indices and labels (test_kernel_faults), each
# also on the CPU. Then the forced layouts once more for the new divergences.
timeout 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_ops.py tests/test_ops_cuda.py \
    tests/test_ops_divergences.py tests/test_ops_topk.py tests/test_kernel_faults.py \
    -k "not jit_build" -rs 2>&1 | tail -25
for path in group block split; do
    KDPLUG_CUDA_PATH=$path KDPLUG_CUDA_SPLITS=3 timeout 120 "$PY" -m pytest -q -p no:cacheprovider \
        tests/test_ops_divergences.py -k "cuda and matches_float64" 2>&1 | tail -2
done
timeout 300 "$PY" benchmarks/bench_kd_loss.py --device cuda --parts table,divergences,kdce
