#!/usr/bin/env bash
# One shared, idempotent install step for both README commands.
#   bash scripts/install.sh        # runtime: system packages, venv, torch (CPU, pinned), colld
#   bash scripts/install.sh --dev  # the same plus test tools and the deploy extra (ONNX)
# torch is pinned first: an unpinned torch would pull a multi-GB CUDA build on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${COLLD_TORCH_VERSION:-2.13.0}"
extras="embedded"
[[ "${1:-}" == "--dev" ]] && extras="embedded,dev,deploy"

need_apt=()
command -v espeak-ng >/dev/null 2>&1 || need_apt+=(espeak-ng)
ldconfig -p 2>/dev/null | grep -q libsndfile || need_apt+=(libsndfile1)
if ((${#need_apt[@]})); then
  echo "[install] apt-get install ${need_apt[*]}"
  if [[ $(id -u) -eq 0 ]]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

[[ -x .venv/bin/python ]] || python3 -m venv .venv
PY=.venv/bin/python
if ! $PY -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "[install] torch==$TORCH_VERSION"
  $PY -m pip install -q --upgrade pip
  $PY -m pip install -q "torch==$TORCH_VERSION"
fi
stamp=".venv/.colld-installed-$(sha256sum pyproject.toml | cut -c1-16)-$extras"
if [[ ! -f "$stamp" ]] || ! $PY -c "import colld" 2>/dev/null; then
  echo "[install] colld[$extras] and its dependencies"
  if ! $PY -m pip install -q -e ".[$extras]" >.venv/pip-install.log 2>&1; then
    cat .venv/pip-install.log; echo "[install] pip install failed (log above)"; exit 1
  fi
  $PY -c "import colld, torch; print('[install] colld', colld.__version__, 'torch', torch.__version__)"
  rm -f .venv/.colld-installed-* && touch "$stamp"
fi
