#!/usr/bin/env bash
# Quick start: `./run.sh demo` (the main job) and `./run.sh test` (the test suite).
# Creates ./.venv on first use and installs tcurlora with its test tools into it.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" 2>/dev/null; then
    # torch first and pinned: with no torch present a bare requirement can pull a multi-GB CUDA
    # build. Set TCURLORA_TORCH to choose another (e.g. a CUDA build on a GPU machine).
    "$VPY" -m pip install -q "${TCURLORA_TORCH:-torch==2.13.0}"
fi
stamp=.venv/.tcurlora-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ requirements-nnunet.txt -nt "$stamp" ]; then
    # the torch installed above stays: no optional dependency may replace it (e.g. a CPU build by a CUDA one)
    pins=.venv/tcurlora-constraints.txt
    "$VPY" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$pins"
    "$VPY" -m pip install -q -c "$pins" -e ".[test]"
    # nnU-Net without its timm -> torchvision dependency (see requirements-nnunet.txt)
    "$VPY" -m pip install -q -c "$pins" --no-deps --require-hashes -r requirements-nnunet.txt
    touch "$stamp"
fi
cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    demo) exec .venv/bin/tcurlora demo "$@" ;;
    test) exec "$VPY" -m pytest Testing "$@" ;;
    *) echo "usage: ./run.sh demo [options] | ./run.sh test [pytest options]" >&2; exit 2 ;;
esac
