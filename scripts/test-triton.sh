#!/usr/bin/env bash
# Opt-in: run tests/serve/test_triton.py against a real tritonserver on 127.0.0.1 (CPU), PyTriton's bundled build.
# nvidia-pytriton pins numpy<2 (its Python-backend stub reads numpy 2 arrays as empty), so it gets its own venv,
# DEPLOYKIT_TRITON_VENV (default .venv/triton), used only as the server's Python backend; the tests run in .venv.
# Extra arguments go to pytest.
source "$(dirname "$0")/_env.sh"
TVENV="${DEPLOYKIT_TRITON_VENV:-$VENV/triton}"
TSPEC="nvidia-pytriton==0.7.0 onnxruntime numpy<2"
if [ ! -x "$TVENV/bin/python" ] || [ "$(cat "$TVENV/.deploykit-stamp" 2>/dev/null)" != "$TSPEC" ]; then
  echo "[deploykit] installing $TSPEC into $TVENV (about 450 MB, once)"
  python -m venv "$TVENV"
  # shellcheck disable=SC2086
  "$TVENV/bin/python" -m pip install -q $TSPEC 2> >(grep -v "is ignored: it is neither" >&2)
  echo "$TSPEC" > "$TVENV/.deploykit-stamp"
fi
export DEPLOYKIT_TRITON_PYTHON="$TVENV/bin/python"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m pytest -q -rs tests/serve/test_triton.py "$@"
