#!/usr/bin/env bash
# The fifth session's H100 commands, in the order they ran (each call of the device tool had 10 minutes; the
# decode comparison starts from the fourth session's JSON, whose other systems' rows --append keeps). Run from the
# repo root on the device machine with the wheels carried in .whl/ (see README "Benchmarks"); every step is
# time-boxed so the rest still runs. SmolLM2 travels in two halves: bench/device_smollm2.sh.
set -u
OUT=${OUT:-/tmp/tierkv-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/kv/*.whl \
    .whl/gguf-*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
step() { local t=$1; shift; echo "== $(date +%T) $*"; timeout "$t" "$@" 2>&1 | grep -v -i "warn" | tail -25; echo "== rc=${PIPESTATUS[0]}"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
cp bench/results/decode-llama8b-h100-2026-11-26.json "$OUT/decode.json"
step 170 python bench/fast_decode.py --context 32K,128K,256K --steps 24 --profile --out "$OUT/fd.json"
step 100 python bench/fast_decode.py --context 32K,128K --steps 24 --reserve 8GiB --out "$OUT/fd_hostonly.json"
step 400 python -m pytest -q -p no:cacheprovider -m cuda tests/kernels tests/kv/test_sparse_cache.py
step 60 python -m tierkv bench decode llama3.1-8b --context 32K --gpu-budget 24GiB --steps 3 --warmup 1 \
    --systems tierkv-sparse-eager --json "$OUT/decode.json" --append
for ctx in 32K 128K 256K; do
  step 250 python -m tierkv bench decode llama3.1-8b --context $ctx --gpu-budget 24GiB --profile \
      --systems tierkv-sparse --json "$OUT/decode.json" --append --plot "$OUT/decode.png"
done
step 120 python bench/sparse_accuracy.py --device cuda --dtype bf16 --context 6144 --steps 256 \
    --configs '[{"group": "default"}]' --out "$OUT/acc_bf16.json"
step 60 python bench/kernels_bench.py --only select_top --out "$OUT"
