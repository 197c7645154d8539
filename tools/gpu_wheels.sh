#!/usr/bin/env bash
# An offline wheelhouse for the GPU device image (Python 3.12, manylinux x86_64, no package registry):
# the packages of tools/gpu_wheels.txt, which a GPU run imports and the image lacks (tools/gpu_image.txt).
#
#   bash tools/gpu_wheels.sh build   # here, with PyPI: fills $GPU_WHEELS (default wheels/gpu, git-ignored)
#   bash tools/gpu_wheels.sh setup   # on the device: pip install --no-index from $GPU_WHEELS
#
# build is skipped when $GPU_WHEELS already holds the wheels of this list (a stamp names its hash).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${GPU_WHEELS:-wheels/gpu}"
PYTHON="${PYTHON:-python3}"
REQS=tools/gpu_wheels.txt
# PyPI has only source for these; both are pure Python, so the wheel built here serves any platform.
SDIST_ONLY=(deepspeed antlr4-python3-runtime)
# Installed only where the image's own copy is older than a requirement (pydantic needs typing-extensions
# >= 4.14.1, megatron-core packaging >= 24.2; the image's versions are not recorded).
FALLBACKS=(typing-extensions==4.16.0 packaging==26.2)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)

die() { echo "gpu_wheels.sh: $*" >&2; exit 1; }
pins() { grep -v '^#' "$REQS" | grep -v '^$'; }
is_sdist_only() { local name; for name in "${SDIST_ONLY[@]}"; do [ "${1%%==*}" = "$name" ] && return 0; done; return 1; }

case "${1:-}" in
build)
  stamp="$DIR/.built-$(cat "$REQS" "$0" | sha256sum | cut -c1-16)"
  if [ -e "$stamp" ]; then echo "wheelhouse $DIR is up to date ($(du -sh "$DIR" | cut -f1))"; exit 0; fi
  rm -rf "$DIR" && mkdir -p "$DIR"
  binary=() source=()
  for pin in $(pins) "${FALLBACKS[@]}"; do
    if is_sdist_only "$pin"; then source+=("$pin"); else binary+=("$pin"); fi
  done
  start=$SECONDS
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --abi abi3 --abi none "${PLATFORMS[@]/#/--platform=}" --platform=any -d "$DIR" "${binary[@]}" \
    || die "pip download failed (is PyPI reachable?)"
  "$PYTHON" -m pip wheel --quiet --no-deps -w "$DIR" "${source[@]}" || die "pip wheel of ${source[*]} failed"
  for wheel in "$DIR"/*.whl; do
    case "$wheel" in *-cp312-*|*-abi3-*|*-none-any.whl) ;; *) die "$wheel is not for CPython 3.12";; esac
  done
  touch "$stamp"
  echo "wheelhouse $DIR: $(ls "$DIR"/*.whl | wc -l) wheels, $(du -sh "$DIR" | cut -f1), built in $((SECONDS - start)) s"
  ;;
setup)
  ls "$DIR"/*.whl >/dev/null 2>&1 || die "no wheels in $DIR: run 'bash tools/gpu_wheels.sh build' here and carry $DIR"
  "$PYTHON" -m pip install --quiet --no-index --find-links "$DIR" -r "$REQS" || die "pip install from $DIR failed"
  ;;
*)
  die "usage: bash tools/gpu_wheels.sh build | setup" ;;
esac
