#!/usr/bin/env bash
# The test suite (CPU only; GPU / TensorRT tests skip with their reason). Extra arguments go to pytest.
# ray: tests/serve/test_ray.py starts a real local Ray cluster (it skips with the reason where ray is missing);
# openvino: the OpenVINO backend and NNCF INT8 tests (they skip with the reason where openvino is missing)
# Hypothesis runs derandomized here (the same examples every run); HYPOTHESIS_PROFILE=explore draws fresh ones
export DEPLOYKIT_EXTRAS="${DEPLOYKIT_EXTRAS:-cpu,serve,dev,ray,openvino}"
export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-repeatable}"
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
