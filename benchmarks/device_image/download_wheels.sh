#!/usr/bin/env bash
# Fetch the wheels benchmarks/gpu_check.sh needs on the lent GPU machine (wheels.txt: what its image lacks)
# into .whl/ at the repository root, for CPython 3.12 on manylinux x86_64: that machine reaches no package
# registry, so they travel with the working tree (the device tool's `carry: [".whl"]`, about 27 MB).
set -euo pipefail
cd "$(dirname "$0")/../.."
PIP=${PIP:-python3 -m pip}
[ -x .venv/bin/python ] && PIP=".venv/bin/python -m pip"
mkdir -p .whl
mapfile -t pins < <(grep -v '^\s*#' benchmarks/device_image/wheels.txt | grep -v '^\s*$' | grep -v '^deepspeed==')
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pins[@]}"
# DeepSpeed ships only an sdist; with its ops left to JIT the wheel it builds is pure Python
DS_BUILD_OPS=0 $PIP wheel -q --no-deps --no-build-isolation -w .whl "$(grep '^deepspeed==' benchmarks/device_image/wheels.txt)"
echo "download_wheels: $(ls .whl/*.whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/"
