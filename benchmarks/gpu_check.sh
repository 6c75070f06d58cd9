#!/usr/bin/env bash
# GPU bring-up in at most 10 minutes on one GPU: training steps of DiT-DH-S / DiT-DH-XL (bf16, compile
# on/off, FSDP, ZeRO-2; multi-GPU where present) and a stage-1 GAN step through the real CLI, the SDPA
# backend used, images/s and MFU from metrics.jsonl, Inception and sampling throughput, peak memory
# against `rae-scale plan`. Writes OUT/gpu_check.json and OUT/gpu_check.md (OUT: --out, default
# gpu_check_out). Without a GPU it says so and exits 0. Details: benchmarks/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  # the quick answer; gpu_check.py asks torch as well (and writes OUT/gpu_check.json saying so)
  echo "gpu_check: no NVIDIA GPU on this machine (nvidia-smi finds none); nothing was run"
  OUT=gpu_check_out
  while [ $# -gt 0 ]; do case "$1" in --out) OUT=$2; shift 2;; --out=*) OUT=${1#--out=}; shift;; *) shift;; esac; done
  mkdir -p "$OUT" && echo '{"gpu": null, "skipped": "no NVIDIA GPU (nvidia-smi finds none)"}' > "$OUT/gpu_check.json"
  exit 0
fi
PYTHON=${PYTHON:-python}
if [ -x .venv/bin/python ] && [ "$PYTHON" = python ]; then PYTHON=.venv/bin/python; fi
PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" exec timeout 630 "$PYTHON" benchmarks/gpu_check.py "$@"
