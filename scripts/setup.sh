#!/usr/bin/env bash
# Set up mslora on a fresh machine: a virtual environment in .venv with the package, its test tools, the export and
# serve extras, Debian's chromium for the serve page's test,
# and the Fashion-MNIST idx files of the main job (Debian package dataset-fashion-mnist).
# Works offline: PyTorch 2.14.1 / torchvision 0.29.1 and the rest come from the machine's package index.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${FASHION_MNIST_DIR:-}" ]; then
    if command -v apt-get >/dev/null; then
        SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
        # Not fatal: the tests do not need the data set, and the main job says what is missing.
        { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null; } ||
            echo "setup: could not install dataset-fashion-mnist; the main job needs it (or FASHION_MNIST_DIR)" >&2
    else
        echo "setup: install Debian's dataset-fashion-mnist or set FASHION_MNIST_DIR for the main job" >&2
    fi
fi

# Headless Chromium and its driver for the test of mslora serve's page (Selenium drives them; no browser download).
if ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; } ||
        echo "setup: could not install chromium; the serve page test will be skipped" >&2
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev,export,serve]"
echo "setup: done (.venv/bin/mslora)"
