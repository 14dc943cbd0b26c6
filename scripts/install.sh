#!/usr/bin/env bash
# Install the project into a virtual environment (default .venv).
#
#   scripts/install.sh            serving install: onnxruntime, FAISS, FastAPI; no torch
#   scripts/install.sh --train    adds training: torch 2.13.0 (CPU build), onnx, scikit-learn
#   scripts/install.sh --all      training, test tools and milvus-lite, plus the Debian packages the
#                                 tests use (Chromium, librsvg, docker-compose)
#
# The Dockerfiles and CI call this same script, so what CI proves is also true of the images.
# VENV=/path overrides the environment's location.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$root/.venv}"
mode="${1:---serve}"

case "$mode" in
  --serve) extras="" ;;
  --train) extras="[train]" ;;
  --all)   extras="[train,test,milvus-lite]" ;;
  *) echo "usage: scripts/install.sh [--serve|--train|--all]" >&2; exit 2 ;;
esac

if [ "$mode" = "--all" ]; then
  packages="chromium chromium-driver librsvg2-bin docker-compose"
  missing=""
  for package in $packages; do
    dpkg -s "$package" >/dev/null 2>&1 || missing="$missing $package"
  done
  if [ -n "$missing" ]; then
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    echo "installing Debian packages:$missing"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
fi

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e "$root$extras"
echo "installed into $venv ($mode)"
