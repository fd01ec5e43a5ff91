# Sourced by scripts/demo, scripts/test and scripts/bench: make a virtualenv under the
# project (unless one is active), reuse an installed torch, otherwise install a CPU build,
# then install the project with the extras in $PRECISION_EXTRAS (default: capture, the
# torch side; dev adds the test tools). Sets $PY.
# Re-runs are fast: a stamp records what was installed.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
EXTRAS=${PRECISION_EXTRAS:-capture}
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ -n "${VIRTUAL_ENV:-}" ]; then
  PY=$(command -v python)
else
  if [ ! -x "$ROOT/.venv/bin/python" ]; then
    echo "· creating a virtualenv in .venv" >&2
    python3 -m venv --system-site-packages "$ROOT/.venv"
  fi
  PY="$ROOT/.venv/bin/python"
fi

if have=$("$PY" -c "import torch; print(torch.__version__)" 2>/dev/null); then
  echo "· using the torch $have already installed" >&2
else
  # A pinned CPU build; an unpinned 'torch' would pull several GB of CUDA packages.
  spec=${PRECISION_TORCH_SPEC:-torch==2.13.0}
  echo "· installing $spec (CPU build)" >&2
  log=$(mktemp)
  if ! "$PY" -m pip install -q "$spec" >"$log" 2>&1; then
    grep -v "is ignored: it is neither" "$log" >&2 || true
    echo "error: installing $spec failed (pip output above); set PRECISION_TORCH_SPEC" >&2
    exit 2
  fi
  rm -f "$log"
fi

stamp="$ROOT/.venv/.installed${EXTRAS:+-$EXTRAS}"
want=$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$PY" -c "import precision" >/dev/null 2>&1; then
  echo "· installing precision${EXTRAS:+ with [$EXTRAS]} and its dependencies" >&2
  log=$(mktemp)
  if ! "$PY" -m pip install -q -e "$ROOT${EXTRAS:+[$EXTRAS]}" >"$log" 2>&1; then
    grep -v "is ignored: it is neither" "$log" >&2 || true
    echo "error: installing precision failed (pip output above)" >&2
    exit 2
  fi
  rm -f "$log"
  "$PY" -c "import precision" || { echo "error: precision does not import after install" >&2; exit 2; }
  mkdir -p "$(dirname "$stamp")" && echo "$want" > "$stamp"
fi
BIN=$(dirname "$PY")
export PATH="$BIN:$PATH"
