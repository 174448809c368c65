#!/usr/bin/env bash
# The fourth session's H100 commands, in the order they ran (each call of the device tool had 10 minutes, so the
# comparison is split per context and merged with --append). Run from the repo root on the device machine with
# the wheels carried in .whl/ (see README "Benchmarks"); every step is time-boxed so the rest still runs.
set -u
OUT=${OUT:-/tmp/tierkv-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/kv/*.whl \
    .whl/gguf-*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
step() { local t=$1; shift; echo "== $(date +%T) $*"; timeout "$t" "$@" 2>&1 | grep -v -i "warn" | tail -25; echo "== rc=${PIPESTATUS[0]}"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
step 100 python -m pytest -q -p no:cacheprovider -m cuda tests/io/test_pinned.py tests/kernels tests/kv/test_tiered.py \
    tests/kv/test_fast_sparse.py
step 90 python bench/fast_decode.py --context 32K,128K,256K --steps 24 --profile --out "$OUT/fast_defaults.json"
S=tierkv-sparse-eager,tierkv-exact,hf-default,hf-offloaded
for ctx in 32K 128K; do  # one process per context: hf-offloaded at 128K was killed when it ran after the others
  step 420 python -m tierkv bench decode llama3.1-8b --context $ctx --gpu-budget 24GiB --steps 3 --warmup 1 \
      --systems $S --json "$OUT/decode.json" --append
done
step 420 python -m tierkv bench decode llama3.1-8b --context 32K,128K,256K --gpu-budget 24GiB --systems tierkv-sparse \
    --profile --json "$OUT/decode.json" --append
step 540 python -m tierkv bench decode llama3.1-8b --context 256K --gpu-budget 24GiB --steps 3 --warmup 1 \
    --systems hf-default,hf-offloaded --json "$OUT/decode.json" --append  # hf-offloaded: killed (host RAM)
step 600 python -m tierkv bench decode llama3.1-8b --context 256K --gpu-budget 24GiB --steps 3 --warmup 1 \
    --prefill-chunk 8192 --systems tierkv-exact,tierkv-sparse-eager --json "$OUT/decode.json" --append \
    --plot "$OUT/decode.png"
ls -la "$OUT"
