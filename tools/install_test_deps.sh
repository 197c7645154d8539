#!/usr/bin/env bash
# What the test suite needs besides the Python package: a one-node SLURM (Debian's slurm-wlm and munge;
# tests/e2e/slurm_cluster.py starts it) and llama.cpp's Python binding, which checks the GGUF exports.
# Idempotent: installs only what is missing. Needs root for apt-get.
set -euo pipefail

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge
fi

# PyPI ships llama-cpp-python only as source: build the wheel once (about 4 minutes on two cores, CPU
# only, no tools or examples) and keep it in a cache folder.
if ! python -c "import llama_cpp" 2>/dev/null; then
    WHEELS="${GPTSCALE_WHEEL_CACHE:-$HOME/.cache/gptscale-wheels}"
    if ! ls "$WHEELS"/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1; then
        CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF" \
            python -m pip wheel --quiet --no-deps --wheel-dir "$WHEELS" llama-cpp-python==0.3.36
    fi
    python -m pip install --quiet --find-links "$WHEELS" llama-cpp-python==0.3.36
fi
