# Sourced by scripts/demo, scripts/test and scripts/bench: make a virtualenv under the
# project (unless one is active), isolated from the system's packages; install a CPU build of
# torch into it unless it has one; then install the project with the extras in
# $PRECISION_EXTRAS (default: capture, the torch side; dev adds the test tools), every
# dependency at the version the lock pins (constraints/dev.txt, made by scripts/lock), so
# that tests run on the same packages on every machine. Sets $PY.
# Re-runs are fast: a stamp records what was installed (pyproject.toml and the lock).
# PRECISION_TORCH_SPEC picks another torch (default torch==2.13.0; the lock leaves torch out);
# PRECISION_LOCK another lock file, or none when set empty (then unpinned). A system torch
# (a CUDA build, say) is not seen from .venv: activate a venv that has it, or set
# PRECISION_TORCH_SPEC (and PIP_EXTRA_INDEX_URL for its wheel index).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
EXTRAS=${PRECISION_EXTRAS:-capture}
LOCK=${PRECISION_LOCK-$ROOT/constraints/dev.txt}
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ -n "${VIRTUAL_ENV:-}" ]; then
  PY=$(command -v python)
else
  # A .venv of older checkouts saw the system's packages (--system-site-packages): remade.
  if [ -f "$ROOT/.venv/pyvenv.cfg" ] \
      && grep -qi '^include-system-site-packages *= *true' "$ROOT/.venv/pyvenv.cfg"; then
    echo "· .venv sees the system's packages: making it again, isolated" >&2
    rm -rf "$ROOT/.venv"
  fi
  if [ ! -x "$ROOT/.venv/bin/python" ]; then
    echo "· creating a virtualenv in .venv" >&2
    python3 -m venv "$ROOT/.venv"
  fi
  PY="$ROOT/.venv/bin/python"
fi

# The lock pins what one Python version resolves to (its '# python:' line): another version
# installs unpinned (a fresh venv gets the newest releases), and says so.
constraints=()
lockhash=none
if [ -n "$LOCK" ]; then
  [ -f "$LOCK" ] || { echo "error: no lock file $LOCK (see scripts/lock)" >&2; exit 2; }
  pyver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  lockpy=$(sed -n 's/^# python: *//p' "$LOCK" | head -1)
  if [ "$pyver" = "$lockpy" ]; then
    constraints=(-c "$LOCK")
    lockhash=$(sha256sum "$LOCK" | cut -c1-16)
  else
    echo "· $LOCK pins Python $lockpy's packages; this is Python $pyver: installing" \
         "unpinned (scripts/lock makes a lock for it)" >&2
  fi
fi

if have=$("$PY" -c "import torch; print(torch.__version__)" 2>/dev/null); then
  echo "· using the torch $have already installed" >&2
else
  # A pinned CPU build; an unpinned 'torch' would pull several GB of CUDA packages. The lock
  # pins its dependencies (sympy, networkx...), not torch itself.
  spec=${PRECISION_TORCH_SPEC:-torch==2.13.0}
  echo "· installing $spec (CPU build)" >&2
  log=$(mktemp)
  if ! "$PY" -m pip install -q ${constraints[@]+"${constraints[@]}"} "$spec" >"$log" 2>&1; then
    grep -v "is ignored: it is neither" "$log" >&2 || true
    echo "error: installing $spec failed (pip output above); set PRECISION_TORCH_SPEC" >&2
    exit 2
  fi
  rm -f "$log"
fi

stamp="$ROOT/.venv/.installed${EXTRAS:+-$EXTRAS}"
want=$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want lock:$lockhash" ] \
    || ! "$PY" -c "import precision" >/dev/null 2>&1; then
  echo "· installing precision${EXTRAS:+ with [$EXTRAS]} and its dependencies" \
       "(${constraints[1]:-unpinned})" >&2
  log=$(mktemp)
  if ! "$PY" -m pip install -q ${constraints[@]+"${constraints[@]}"} \
      -e "$ROOT${EXTRAS:+[$EXTRAS]}" >"$log" 2>&1; then
    grep -v "is ignored: it is neither" "$log" >&2 || true
    echo "error: installing precision failed (pip output above)" >&2
    exit 2
  fi
  rm -f "$log"
  "$PY" -c "import precision" || { echo "error: precision does not import after install" >&2; exit 2; }
  mkdir -p "$(dirname "$stamp")" && echo "$want lock:$lockhash" > "$stamp"
fi
BIN=$(dirname "$PY")
export PATH="$BIN:$PATH"
