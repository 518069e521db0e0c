#!/usr/bin/env bash
# Creates .venv with visionautoml and every optional feature, ready to run and test.
# Usage: bash scripts/setup.sh        (re-running it updates the environment in place)
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin="${PYTHON:-python3.11}"
command -v "$python_bin" >/dev/null 2>&1 || python_bin=python3
if [ ! -x .venv/bin/python ]; then
    "$python_bin" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch and torchvision are pinned exactly in pyproject.toml; pip takes them from the
# local wheel cache when the machine has one and never picks a newer, larger build.
.venv/bin/python -m pip install --quiet -e ".[all,dev]"
# YOLOX's model code (Apache-2.0), without its own dependency list (tensorboard, onnxsim, thop, GUI
# OpenCV, a training CLI): what the model code imports is in pyproject.toml's dependencies.
.venv/bin/python -m pip install --quiet --no-deps "pixeltable-yolox==0.4.3"
echo "visionautoml is installed in .venv: run .venv/bin/visionautoml --help"
