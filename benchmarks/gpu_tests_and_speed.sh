#!/usr/bin/env bash
# On one CUDA GPU: the `gpu`-marked tests, the inference speed benchmark (text to image and
# decoding, ours against the naive sampler) and the LLM training throughput against transformers.
# Run from the repository root:
#   bash benchmarks/gpu_tests_and_speed.sh        (figures under $OUT, default outputs/gpu)
# Needs the wheels in .whl/: this package (pip wheel --no-deps . -w .whl) and what the GPU
# image lacks (diffusers, importlib_metadata, webdataset, braceexpand).
set -uo pipefail
export PYTHONUNBUFFERED=1
REPO=$PWD
OUT=${OUT:-$REPO/outputs/gpu}
mkdir -p "$OUT"
WORK=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl || exit 1
export PYTHONPATH=$WORK/site
# run from copies, so that the repository's folders do not shadow the installed package
cp -r "$REPO/benchmarks" "$REPO/tests" "$WORK/" && cd "$WORK"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider ${GPU_TESTS:-tests} 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
timeout 300 python3 benchmarks/inference_speed.py --device cuda --dtype bf16 --out "$OUT/inference_speed.json" \
    2>&1 | tee "$OUT/inference_speed.log"
timeout 330 python3 benchmarks/train_throughput.py llm --compile --variants "${TRAIN_VARIANTS:-trainer+compile,ours,ours+compile}" \
    --json "$OUT/train_llm.json" 2>&1 | grep -v Warning | tee "$OUT/train_llm.log"
