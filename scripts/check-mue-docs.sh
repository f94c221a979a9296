#!/usr/bin/env bash
# Run docs/mue.md's `deploykit` commands verbatim (training shortened with --set train.steps=N only), then check
# that serve-local answers the doc's entailment and caption questions exactly as `deploykit predict` did.
#   scripts/check-mue-docs.sh [STEPS]      (default 200; run from anywhere, uses the repository root)
# Writes runs/mue-synthetic, engines/mue-synthetic{,-int8}, bench-out/mue and scene.png there, refuses to start if
# they exist, and removes them at the end (KEEP=1 keeps them). Without a GPU, `build` must refuse with one line
# and exit code 2.
set -uo pipefail
STEPS=${1:-200}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export OMP_NUM_THREADS=1 PYTHONPATH=${PYTHONPATH:-$ROOT}
LOG=$(mktemp -d /tmp/check-mue-docs.XXXXXX)
MADE=(runs/mue-synthetic engines/mue-synthetic engines/mue-synthetic-int8 bench-out/mue scene.png)
for p in "${MADE[@]}"; do
  [[ -e $p ]] && { echo "error: $p exists; move it away first (this check writes and removes it)" >&2; exit 2; }
done
SERVER=
cleanup() {
  [[ -n $SERVER ]] && kill "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null
  [[ ${KEEP:-0} == 1 ]] || { rm -rf "${MADE[@]}"; rmdir runs bench-out 2>/dev/null; }
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; echo "logs: $LOG" >&2; exit 1; }
start=$(date +%s)

# the doc's predict examples read scene.png: one synthetic test scene (deploykit samples writes classifier data only)
python -c "from deploykit.data.vl import synthetic_vl; synthetic_vl('test', 1)[0].image.save('scene.png')" \
  || fail "could not write scene.png"

n=0
PREDICT_OUT=()
while IFS= read -r cmd; do
  n=$((n + 1))
  echo "\$ $cmd"
  eval "$cmd" >"$LOG/$n.out" 2>"$LOG/$n.err"
  rc=$?
  sub=$(awk '{print $2}' <<<"$cmd")
  if [[ $sub == build ]] && ! command -v nvidia-smi >/dev/null; then
    # no GPU / TensorRT here: the doc's build must refuse cleanly
    [[ $rc == 2 ]] || fail "build: exit $rc, expected 2 (see $LOG/$n.err)"
    [[ $(wc -l <"$LOG/$n.err") == 1 ]] && ! grep -q Traceback "$LOG/$n.err" \
      || fail "build: expected a one-line error, got: $(cat "$LOG/$n.err")"
    echo "  refused as expected (exit 2): $(cat "$LOG/$n.err")"
    continue
  fi
  [[ $rc == 0 ]] || fail "exit $rc from: $cmd"$'\n'"$(tail -5 "$LOG/$n.err")"
  tail -3 "$LOG/$n.out" | sed 's/^/  /'
  [[ $sub == predict ]] && PREDICT_OUT+=("$LOG/$n.out")
done < <(python scripts/mue_doc_commands.py --steps "$STEPS") || exit 1
[[ $n -ge 10 ]] || fail "only $n commands extracted from docs/mue.md"

# serve-local on a free port, then the same questions over KServe v2 HTTP
PORT=$(python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
deploykit serve-local engines/mue-synthetic --port "$PORT" --grpc-port 0 >"$LOG/serve.out" 2>&1 &
SERVER=$!
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$PORT/v2/health/ready" >/dev/null && break
  kill -0 "$SERVER" 2>/dev/null || fail "serve-local exited: $(tail -3 "$LOG/serve.out")"
  sleep 0.5
done
python scripts/mue_serve_compare.py --url "http://127.0.0.1:$PORT" --model mue-synthetic \
  --predict-out "${PREDICT_OUT[@]}" || fail "serve-local and predict disagree"
echo "OK: $n doc commands ran; serve-local == predict; $(( $(date +%s) - start )) s; logs: $LOG"
