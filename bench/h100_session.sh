#!/usr/bin/env bash
# One H100 call that records this session's GPU numbers (each step time-boxed so the rest still runs).
# Run from the repo root on the device machine with the wheels carried in .whl/ (see README "Benchmarks").
set -u
OUT=${OUT:-/tmp/tierkv-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/kv/*.whl \
    .whl/gguf-*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
step() { local t=$1; shift; echo "== $(date +%T) $*"; timeout "$t" "$@" 2>&1 | grep -v -i "warn" | tail -25; echo "== rc=${PIPESTATUS[0]}"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
step 90 python -m pytest -q -m cuda -p no:cacheprovider tests/kernels/test_kernels_fused_step.py \
    tests/models/test_static_cache.py -k "random_8b or triton_matches"
step 70 python bench/dense_decode.py --parts 8b --out "$OUT/dense_8b.json"
step 45 python -m tierkv bench io --sizes 64KiB,1MiB,16MiB,256MiB --repeats 3 --disk-dir /tmp/bench-io --json "$OUT/io.json"
step 100 python bench/tiered_decode.py --shape llama3.1-8b --context 32K,128K --gpu-budget 4GiB --cpu-budget 40GiB \
    --steps 4 --host-read mapped --no-dense --out "$OUT/tiered_full.json"
step 110 python bench/tiered_decode.py --shape llama3.1-8b --context 32K,128K --gpu-budget 4GiB --cpu-budget 40GiB \
    --steps 6 --host-read mapped --no-dense --attention sparse --token-budget 2048 --out "$OUT/tiered_sparse.json"
step 60 python bench/chat_session.py --model llama3.1-8b --context 32768 --device cuda --out "$OUT/chat_session.json"
step 140 python -m tierkv bench decode llama3.1-8b --context 32K --gpu-budget 24GiB --steps 4 --warmup 2 \
    --systems tierkv-sparse,tierkv-exact,hf-default,hf-offloaded --io-json "$OUT/io.json" --json "$OUT/decode.json"
ls -la "$OUT"
