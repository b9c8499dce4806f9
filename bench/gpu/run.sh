#!/usr/bin/env bash
# The GPU proof in one command, on a machine with an NVIDIA GPU and no network (torch, triton,
# transformers, peft, nanobind, cmake, ninja, pytest, pytest-xdist and pytest-benchmark installed):
#   bench/gpu/run.sh OUTDIR
# builds and installs ferret from this checkout, then runs bench/gpu/run.py (see its docstring).
set -euo pipefail
out=${1:?usage: bench/gpu/run.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
python3 -m pip install -q --no-build-isolation --no-deps . 2>&1 | tail -3
python3 bench/gpu/run.py "$out" 2>&1 | tee "$out/log.txt"
