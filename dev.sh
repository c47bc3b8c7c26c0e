#!/usr/bin/env bash
# One entry point for a fresh machine: creates/refreshes the virtualenv, makes sure the offline
# Fashion-MNIST data is installed, then runs the demo or the tests.
#
#   ./dev.sh demo [CONFIG] [key=value ...]   main job on the embedded default (local Ray, CPU)
#   ./dev.sh test [pytest args]              the test suite (slow tests: ./dev.sh test -m slow)
#   ./dev.sh streamssl VERB ...              any other CLI verb inside the virtualenv
set -euo pipefail
cd "$(dirname "$0")"

VENV="${STREAMSSL_VENV:-.venv}"
FMNIST_DIR=/usr/share/datasets/fashion-mnist

ensure_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[dev.sh] creating virtualenv $VENV"
    python3 -m venv "$VENV"
  fi
  local stamp="$VENV/.streamssl-installed"
  local want
  want="$(cat pyproject.toml dev.sh | sha256sum | cut -d' ' -f1)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$VENV/bin/python" -c "import streamssl" 2>/dev/null; then
    echo "[dev.sh] installing dependencies into $VENV (first time: a few minutes)"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # torch first, pinned: a looser resolver pass could otherwise pick a multi-GB build.
    "$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
    "$VENV/bin/python" -m pip install -q -e ".[test]"
    echo "$want" > "$stamp"
  fi
}

ensure_fashion_mnist() {
  [ -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[dev.sh] installing Debian package dataset-fashion-mnist (offline Fashion-MNIST)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  fi
  if [ ! -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ]; then
    echo "[dev.sh] Fashion-MNIST not found in $FMNIST_DIR." >&2
    echo "         Install it as root:  apt-get install dataset-fashion-mnist" >&2
    echo "         or put the four IDX .gz files in a folder and pass data.src=THAT_FOLDER." >&2
    return 1
  fi
}

cmd="${1:-}"; shift || true
case "$cmd" in
  demo)
    ensure_venv; ensure_fashion_mnist
    exec "$VENV/bin/streamssl" demo "$@" ;;
  test)
    ensure_venv; ensure_fashion_mnist
    exec "$VENV/bin/python" -m pytest "$@" ;;
  streamssl)
    ensure_venv
    exec "$VENV/bin/streamssl" "$@" ;;
  *)
    sed -n '2,9p' "$0"; exit 2 ;;
esac
