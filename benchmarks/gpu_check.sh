#!/usr/bin/env bash
# GPU bring-up in under 10 minutes on one GPU: training steps of DiT-DH-S / DiT-DH-XL (bf16, compile
# on/off, FSDP, ZeRO-2; multi-GPU where present) and a stage-1 GAN step through the real CLI, the SDPA
# backend used, images/s and MFU from metrics.jsonl, Inception and sampling throughput, peak memory
# against `rae-scale plan`. Writes OUT/gpu_check.json and OUT/gpu_check.md (OUT: --out, default
# gpu_check_out). Without a GPU it says so and exits 0. Details: benchmarks/gpu_check.py.
#
# On the lent GPU machine (no package registry there): first, here, benchmarks/device_image/download_wheels.sh;
# then run `bash benchmarks/gpu_check.sh --out $OUT/gc` there with carry [".whl"]: the wheels in .whl/ are
# installed into /tmp/site before the check starts.
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
PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  # the carried wheels (download_wheels.sh), ahead of the image's own versions
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" exec timeout 570 "$PYTHON" benchmarks/gpu_check.py "$@"
