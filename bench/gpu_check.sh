#!/usr/bin/env bash
# The GPU session's one script, run from the repository root: `prepare` here, `check` and `train` there.
#
#   bench/gpu_check.sh prepare [DATA_ROOT]   # HERE (PyPI reachable): .gpu/ = wheels the GPU image lacks, the fp16
#                                            # EfficientNet weights, and (with DATA_ROOT) magnetic_tile and cookies
#                                            # pre-resized to 256 px plus this box's training fingerprint
#                                            # (bench/train_fingerprint.py); carry .gpu (under the 64 MiB limit)
#   bench/gpu_check.sh check [OUTDIR]        # THERE: pytest -m gpu, torch CUDA latency (CUDA graphs on, off),
#                                            # TensorRT builds + bench only if TensorRT's libraries import
#   bench/gpu_check.sh all [OUTDIR]          # THERE, one call of under 8 minutes: pytest -m gpu; a SKU with a
#                                            # memory prior and fine memory (random weights, memories filled
#                                            # from rendered parts, calibrated on them); engine-only latency per
#                                            # speed lever, batch 1 and batched; the daemon end to end (25 fps,
#                                            # then as fast as it takes); the per-stage profile; the gpu preset's
#                                            # training speed per phase; each step time-boxed
#   bench/gpu_check.sh train OUTDIR CAT...   # THERE: per category, the gpu preset (two-stage) and its
#                                            # no-reconstruction twin trained at once on the one GPU, then
#                                            # inspector eval --ablation --compare-sku on CUDA; CAT@SIZE trains
#                                            # that category at SIZE px instead of the preset's 256; first
#                                            # compares the box's training fingerprint with prepare's: a gap
#                                            # in bf16 alone trains with --no-amp, any other trains nothing
#                                            # (no categories: the fingerprint alone)
#
# train takes from the environment: AE_STEPS, DIFFUSION_STEPS, SEG_STEPS (default: the gpu preset's), WORKERS
# (synthesis processes per training, default 3), TWINS (0: no no-reconstruction twins), SKUS_BACK (0: leave the
# trained SKUs there; they come back with their twins), TRAIN_ARGS (more `inspector train` options for every
# training, e.g. "--tile-scale 0.333 --tile-overlap 0.25" on a category packed with gpu_pack.py --originals),
# EVAL_TIMEOUT (seconds per category's eval, default 150, 0: no eval there: a late eval is cut, the logs and SKUs
# still come back), DEVICE (default cuda).
# PY=.venv/bin/python DEVICE=cpu with a few steps rehearses it here (PY set: no wheels are installed).
# all takes from the environment (GPU defaults): SIZE (256), MEMORY (16384), FINE_MEMORY (16384), BATCHES (1,8,32),
# ITERS (30), COMPILE_MODES (default; also reduce-overhead, and max-autotune-no-cudagraphs, which autotunes for
# minutes), DAEMON_FRAMES (400), PROFILE_ITERS (20), TRAIN_PRESET (gpu), TRAIN_STEPS (10), TRAIN_VARIANTS, THREADS
# (engine CPU threads, 0: torch's), and time boxes in seconds: T_PYTEST (120), T_SKU (40), T_LATENCY (70),
# T_COMPILE (70 per mode), T_DAEMON (50), T_PROFILE (30), T_TRAIN (60): 440 s at most, plus ~20 s of installing.
# The CPU rehearsal (4 minutes on this 2-core box):
#   PY=.venv/bin/python DEVICE=cpu OMP_NUM_THREADS=1 THREADS=1 SIZE=64 MEMORY=200 FINE_MEMORY=300 BATCHES=1,2 \
#   ITERS=2 DAEMON_FRAMES=20 PROFILE_ITERS=2 TRAIN_PRESET=tiny TRAIN_STEPS=1 TRAIN_VARIANTS=fp32 T_COMPILE=400 \
#   bench/gpu_check.sh all
# The daemon needs mosquitto: prepare packs this box's binary and the libraries it links beyond glibc, used there
# only where the image has none.
# Sizing (measured, four trainings at once, batch 32): per training 18.7 autoencoder, 12.2 diffusion and 7.1
# segmenter steps/s on an H200; 20, 11.4 and 5.5-6.4 on an H100, where AE_STEPS=600 DIFFUSION_STEPS=1500
# SEG_STEPS=1200 took 6 min 12 s. Two at once (TWINS=0 WORKERS=6, H100, AE_STEPS=1000 DIFFUSION_STEPS=2000
# SEG_STEPS=1500, `train $OUT magnetic_tile@128 cookies`): 5 min 39 s; per training 34 / 15 / 9.2 steps/s at 256²
# and 52 / 17 / 13.5 at 128²; a segmenter-only twin alone runs 27 steps/s at 128². The fingerprint step took 3 min
# when the box's CPU trained its 100 steps too (now skipped: it is held to prepare's CPU training; 38 s on an H100);
# with it, `train $OUT magnetic_tile@128 cookies@128` at those steps ran 8 min 15 s (48 / 14.5 / 12 steps/s per
# training). The preset's 8k / 30k / 12k
# steps take ~75 min with four at once. Each eval row of magnetic_tile (582 images) is ~2 s on the GPU plus the
# CPU's metrics, so both categories' ablations take ~2 min; the SKUs come back as ~50 MB of pieces (the two
# two-stage SKUs; all four exceed the 64 MiB a call returns).
# The GPU image this workplace lends has python3 3.12 with a CUDA torch, onnx, onnxruntime, opencv, scipy,
# scikit-image, pytest, hypothesis and cuda-bindings, but none of pydantic, structlog, paho-mqtt,
# efficientnet-lite, sdnotify or onnxconverter-common, and no network. TensorRT's libraries (~1-2 GB) do not fit
# the carry: the TensorRT steps run only where they import. Every step's log goes to var/gpu_check/<mode>, packed
# into OUTDIR/<mode>.tar.gz (OUTDIR default $OUT, else var/gpu_check); a failing step does not stop the rest, and
# the exit status says whether any failed.
set -uo pipefail

PACK=.gpu
# pure-Python or cp312 wheels of the project's dependencies that the GPU image does not hold (the EfficientNet
# weights travel as an fp16 package instead of their 17 MB wheel: see bench/gpu_pack.py)
CARRY=(pydantic pydantic-core pydantic-settings annotated-types typing-inspection python-dotenv structlog
       paho-mqtt sdnotify efficientnet-lite-pytorch onnxconverter-common)
# the first training batches and a short segmenter training (bench/train_fingerprint.py), here and there alike
FINGERPRINT=(bench/train_fingerprint.py --data "$PACK/data" --category magnetic_tile --image-size 128
             --train-steps 100)
mode="${1:-check}"

if [[ "$mode" == prepare ]]; then
    mkdir -p "$PACK/whl"
    grep -qx "/$PACK/" .git/info/exclude 2>/dev/null || echo "/$PACK/" >>.git/info/exclude
    for name in "${CARRY[@]}"; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$PACK/whl" "$name" 2>/dev/null ||  # a pure-Python sdist (sdnotify): build its wheel here
            python3 -m pip wheel -q --no-deps -w "$PACK/whl" "$name" || echo "gpu_check: could not fetch $name" >&2
    done
    data=()
    [[ -n "${2:-}" ]] && data=(--data "$2" --categories magnetic_tile cookies)
    .venv/bin/python bench/gpu_pack.py --out "$PACK" --weights "${data[@]}" || exit 1
    # mosquitto for the daemon step, with the libraries it links beyond glibc (the image's glibc is used)
    broker=$(command -v mosquitto || echo /usr/sbin/mosquitto)
    rm -rf "$PACK/mosquitto" && mkdir -p "$PACK/mosquitto"
    cp "$broker" "$PACK/mosquitto/" && ldd "$broker" | awk '$3 ~ /^\// {print $3}' |
        grep -vE '/(libc|libm|libpthread|libdl|librt|libresolv|ld-linux[^/]*)\.so' |
        xargs -r cp -L -t "$PACK/mosquitto/" || echo "gpu_check: could not pack mosquitto" >&2
    tar -czf "$PACK/mosquitto.tar.gz" -C "$PACK" mosquitto && rm -rf "$PACK/mosquitto"
    # the first training batches as this box synthesises and scores them: train compares its own against these
    [[ -n "${2:-}" ]] && { .venv/bin/python "${FINGERPRINT[@]}" --threads 2 \
        --json "$PACK/fingerprint.json" || exit 1; }
    du -sh "$PACK"
    exit 0
fi
[[ "$mode" == check || "$mode" == train || "$mode" == all ]] ||
    { echo "gpu_check: unknown mode $mode (prepare, check, train, all)"; exit 2; }

dest="${2:-${OUT:-var/gpu_check}}"  # what comes back: <mode>.tar.gz of the logs (and the SKUs, train mode)
out="var/gpu_check/$mode"  # every step's log
rm -rf "$out"
mkdir -p "$out" "$dest"
failed=()
step() {  # step NAME COMMAND...: run, keep its log, remember a failure
    local name="$1"
    shift
    echo "== $name: $* ($(date +%T))"
    if ! "$@" >"$out/$name.log" 2>&1; then
        failed+=("$name")
        echo "   FAILED (tail of $out/$name.log):"
    fi
    tail -n "${TAIL:-25}" "$out/$name.log"
}
finish() {
    tar -czf "$dest/$mode.tar.gz" -C "$out" --exclude '*.png' .
    if ((${#failed[@]})); then
        echo "gpu_check: failed steps: ${failed[*]}"
        exit 1
    fi
    echo "gpu_check: all steps passed"
    exit 0
}

export PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
site=/tmp/gpu_check_site
if [[ -z "${PY:-}" ]] && compgen -G "$PACK/whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "$PACK"/whl/*.whl
fi
export PYTHONPATH="$site:$PWD/$PACK/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
py="${PY:-python3}"
device="${DEVICE:-cuda}"

if [[ "$mode" == train ]]; then
    shift 2
    skus=var/gpu-skus
    steps=(--ae-steps "${AE_STEPS:-8000}" --diffusion-steps "${DIFFUSION_STEPS:-30000}" --seg-steps "${SEG_STEPS:-12000}")
    read -ra extra <<<"${TRAIN_ARGS:-}"
    common=(--dataset mvtec --data "$PACK/data" --preset gpu --device "$device" --threads 1 --num-workers "${WORKERS:-3}"
            "${steps[@]}" "${extra[@]}")
    # a box whose libraries synthesise other batches, or whose device trains otherwise, is named before training:
    # gaps in bf16 alone train with --no-amp; in TF32 fp32 too (IEEE fp32 clean), with TF32 off as well
    # (NVIDIA_TF32_OVERRIDE=0); any other gap trains nothing, since it would be broken too
    amp=()
    if [[ -f "$PACK/fingerprint.json" ]]; then
        step fingerprint "$py" "${FINGERPRINT[@]}" --threads 12 --device "$device" --dump "$out/batch0.npz" \
            --compare "$PACK/fingerprint.json"
        gaps=$(grep -E 'in the reference|the CPU.s [0-9]' "$out/fingerprint.log")
        if [[ -n "$gaps" ]] && grep -qvE 'bf16|^loss_device step|^train device fp32' <<<"$gaps"; then
            echo "== the fingerprint differs beyond the device's reduced precision: no training"
            set --
        elif grep -qE '^loss_device step|^train device fp32' <<<"$gaps"; then
            echo "== the fingerprint differs in TF32 fp32: training in IEEE float32"
            amp=(--no-amp)
            export NVIDIA_TF32_OVERRIDE=0
        elif [[ -n "$gaps" ]]; then
            echo "== the fingerprint differs in bf16 only: training in float32"
            amp=(--no-amp)
        fi
    fi
    pids=()
    categories=()
    trained=()
    for spec in "$@"; do  # every training at once: one GPU, 16 cores, each run 1 thread + WORKERS workers
        category="${spec%@*}"
        categories+=("$category")
        size=()
        [[ "$spec" == *@* ]] && size=(--image-size "${spec#*@}")
        recons=(two_stage)
        [[ "${TWINS:-1}" == 1 ]] && recons+=(none)  # the product, and its no-reconstruction twin <category>-none
        for recon in "${recons[@]}"; do
            sku="$category"
            [[ "$recon" == none ]] && sku="$category-none"
            trained+=("$sku")
            "$py" -m inspector.cli train --out "$skus/$sku" --category "$category" --reconstruction "$recon" \
                "${common[@]}" "${size[@]}" "${amp[@]}" >"$out/train_$sku.log" 2>&1 &
            pids+=($!)
        done
    done
    echo "== training ${#pids[@]} SKUs at once ($(date +%T))"
    for pid in "${pids[@]}"; do wait "$pid" || failed+=("train:$pid"); done
    ((${#pids[@]})) && grep -h 'phase_done\|train_done\|Error\|error' "$out"/train_*.log | cut -c1-300
    for category in "${categories[@]}"; do
        [[ "${EVAL_TIMEOUT:-150}" == 0 ]] && break
        compare=()
        [[ -d "$skus/$category-none" ]] && compare=(--compare-sku "$skus/$category-none")
        step "eval_$category" timeout "${EVAL_TIMEOUT:-150}" "$py" -m inspector.cli eval --sku-dir "$skus/$category" --dataset mvtec \
            --root "$PACK/data" --category "$category" --device "$device" --batch 32 --ablation \
            "${compare[@]}" --score-sweep --out "$out/eval_$category"
    done
    # the SKUs themselves, twins too (for ONNX export and CPU measurements elsewhere), in pieces of 15 MB
    [[ "${SKUS_BACK:-1}" == 1 ]] && ((${#trained[@]})) && tar -czf - -C "$skus" --exclude train_state "${trained[@]}" | split -b 15M - "$dest/skus.tar.gz."
    finish
fi

step environment bash -c "nvidia-smi; $py -c 'import torch, onnxruntime; print(torch.__version__, torch.version.cuda, torch.cuda.is_available(), onnxruntime.__version__)'; $py -c 'import tensorrt; print(\"tensorrt\", tensorrt.__version__)' || true"

if [[ "$mode" == all ]]; then
    export TAIL=45
    start=$SECONDS
    size="${SIZE:-256}" batches="${BATCHES:-1,8,32}" iters="${ITERS:-30}" threads="${THREADS:-0}"
    sku=var/gpu-mem-sku
    if ! command -v mosquitto >/dev/null && [[ -f "$PACK/mosquitto.tar.gz" ]]; then
        broker=/tmp/gpu_check_mosquitto
        mkdir -p "$broker/bin" && tar -xzf "$PACK/mosquitto.tar.gz" -C "$broker"
        printf '#!/bin/sh\nLD_LIBRARY_PATH=%s exec %s "$@"\n' "$broker/mosquitto" "$broker/mosquitto/mosquitto" \
            >"$broker/bin/mosquitto" && chmod +x "$broker/bin/mosquitto"
        export PATH="$broker/bin:$PATH"
    fi
    tests=(tests/test_gpu.py)
    $py -c "from foundation.gpu import import_tensorrt; import_tensorrt()" >/dev/null 2>&1 &&
        tests+=(tests/test_tensorrt.py)
    step pytest_gpu timeout "${T_PYTEST:-120}" "$py" -m pytest -q -m gpu -p no:cacheprovider -o addopts="" \
        "${tests[@]}"
    # the SKU: random weights, both memories filled from rendered parts, calibrated on 24 more (speed, not accuracy)
    rm -rf "$sku" var/gpu-good
    make="from engines.runtime.benchmark import make_random_sku as m; m('$sku', $size, export=False, \
memory=${MEMORY:-16384}, fine_memory=${FINE_MEMORY:-16384})"
    good="from tdad.training.sample_data import write_good_folder as w; w('var/gpu-good', 24, $size)"
    step sku timeout "${T_SKU:-40}" bash -c "$py -c \"$make\" && $py -c \"$good\" && $py -m inspector.cli calibrate \
        --sku-dir $sku --backend torch --device $device --threads $threads --good var/gpu-good --frr 0.05"
    levers=torch,torch+channels_last+cudnn_benchmark,torch+preprocess_on_device
    levers+=,torch+channels_last+cudnn_benchmark+preprocess_on_device
    [[ "$device" == cuda ]] && levers+=,torch+cuda_graphs=false
    step latency_levers timeout "${T_LATENCY:-70}" "$py" bench/latency.py --sku-dir "$sku" --batches "$batches" \
        --iters "$iters" --threads "$threads" --device "$device" --backends "$levers" --json "$out/latency_levers.json"
    for compile in ${COMPILE_MODES:-default}; do  # with the other levers; compiled per batch size: a step each
        spec="torch+compile=$compile+channels_last+cudnn_benchmark+preprocess_on_device"
        [[ "$compile" == reduce-overhead ]] && spec+="+cuda_graphs=false"
        step "latency_compile_$compile" timeout "${T_COMPILE:-70}" "$py" bench/latency.py --sku-dir "$sku" \
            --batches "${batches%,*}" --iters "$iters" --threads "$threads" --device "$device" --backends "$spec" \
            --json "$out/latency_compile_$compile.json"
    done
    daemon=("$py" bench/daemon.py --workdir var/gpu-daemon --sku-dir "$sku" --part-size "$size" --no-web --no-archive
            --threads "$threads" --engine "torch+device=$device")
    frames="${DAEMON_FRAMES:-400}"  # camera -> verdict at 25 fps, then throughput with the micro-batcher at 8
    step daemon timeout "${T_DAEMON:-50}" bash -c "${daemon[*]} --batches 1 --fps 25 --frames $frames && \
        ${daemon[*]} --batches 8 --fps 0 --frames $((2 * frames)) --queue-depth 4096 --frame-timeout-ms 120000"
    profile=("$py" bench/gpu_profile.py --sku-dir "$sku" --device "$device" --threads "$threads"
             --iters "${PROFILE_ITERS:-20}")
    step profile timeout "${T_PROFILE:-30}" bash -c "${profile[*]} --batch 1 && ${profile[*]} --batch 8 && \
        ${profile[*]} --batch 1 --engine torch+channels_last+cudnn_benchmark+preprocess_on_device"
    step train_speed timeout "${T_TRAIN:-60}" "$py" bench/train_speed.py --preset "${TRAIN_PRESET:-gpu}" \
        --device "$device" --steps "${TRAIN_STEPS:-10}" --threads "$((threads > 0 ? threads : 4))" \
        --variants "${TRAIN_VARIANTS:-fp32,bf16,bf16+channels_last,bf16+channels_last+compile}"
    echo "== all: $((SECONDS - start)) s"
    finish
fi
# The GPU tests: they fail, never skip, here. TensorRT's fail when its libraries are absent (that is the point).
step pytest_gpu "$py" -m pytest -q -m gpu -p no:cacheprovider -o addopts="" tests/test_gpu.py tests/test_tensorrt.py
step torch_cuda_bench "$py" bench/latency.py --random-sku var/gpu-bench-sku --batches 1,8,32 --iters 30 \
    --device cuda --backends torch,torch:fp16,torch:bf16 --json "$out/torch_cuda.json"
step torch_cuda_bench_nographs "$py" bench/latency.py --random-sku var/gpu-bench-sku --batches 1,8,32 --iters 30 \
    --device cuda --no-cuda-graphs --backends torch,torch:fp16,torch:bf16 --json "$out/torch_cuda_nographs.json"
if $py -c "from foundation.gpu import import_tensorrt; import_tensorrt()" >"$out/tensorrt_import.log" 2>&1; then
    for precision in fp32 fp16; do
        step "trt_build_$precision" "$py" -m inspector.cli build --sku-dir var/gpu-bench-sku --precision "$precision" \
            --max-batch 32
    done
    step trt_build_int8 bash -c "$py -c 'from tdad.training.sample_data import write_good_folder as w; w(\"var/gpu-good\", 32, 256)' && $py -m inspector.cli build --sku-dir var/gpu-bench-sku --precision int8 --max-batch 32 --calib-dir var/gpu-good"
    step trt_bench "$py" bench/latency.py --sku-dir var/gpu-bench-sku --batches 1,8,32 --iters 30 \
        --backends tensorrt:fp32,tensorrt:fp16,tensorrt:int8,torch:fp16 --device cuda --json "$out/tensorrt.json"
else
    echo "== TensorRT not importable here, its steps skipped: $(tail -n 1 "$out/tensorrt_import.log")"
fi
finish
