#!/usr/bin/env bash
# The test suite (CPU only; GPU / TensorRT tests skip with their reason). Extra arguments go to pytest.
source "$(dirname "$0")/_env.sh"
set +e
python -m pytest -q -rs "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit "$rc"
