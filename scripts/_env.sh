# Sourced by demo.sh and test.sh: create .venv and install deploykit into it, once per pyproject change.
# torch/torchvision are pinned here (not in pyproject) so users of the library keep their own torch.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DEPLOYKIT_VENV:-$ROOT/.venv}"
TORCH_SPEC="${DEPLOYKIT_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
PY="${PYTHON:-python3}"
# extras: the demo needs cpu+serve; test.sh adds dev (pytest, tritonclient) and ray (real Ray cluster tests)
EXTRAS="${DEPLOYKIT_EXTRAS:-cpu,serve,dev}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[deploykit] creating virtual environment in $VENV"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.deploykit-stamp"
WANT="$( (cat "$ROOT/pyproject.toml" "$ROOT/scripts/_env.sh"; echo "$EXTRAS") | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[deploykit] installing (torch, onnxruntime, timm, ...) — about a minute"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  # shellcheck disable=SC2086
  # (some machines' pip config names package folders that don't exist; its warnings about them are noise)
  "$VENV/bin/python" -m pip install -q $TORCH_SPEC 2> >(grep -v "is ignored: it is neither" >&2)
  "$VENV/bin/python" -m pip install -q -e "$ROOT[$EXTRAS]" 2> >(grep -v "is ignored: it is neither" >&2)
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
