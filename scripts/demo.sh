#!/usr/bin/env bash
# The main job end to end on CPU with ONNX Runtime and the built-in digits data:
# train -> export -> calibrate -> bench -> predict. A few minutes on 2 cores.
source "$(dirname "$0")/_env.sh"
RUN=runs/multiexit-digits
ENG=engines/multiexit-digits
set -x
deploykit train --recipe recipes/multiexit-digits.yaml --out "$RUN"
deploykit export "$RUN" -o "$ENG" --force
deploykit calibrate "$ENG" --data digits --max-drop 0.5 --json "$ENG/calibration.json"
deploykit bench "$ENG" --batch-sizes 1,32 --data digits --checkpoint "$RUN" --json "$ENG/bench.json"
deploykit samples digits --split test -n 4 -o "$ENG/samples"
deploykit predict "$ENG" "$ENG"/samples/*.png
set +x
echo "done: engine in $ENG (deploykit info $ENG), reports $ENG/calibration.{json,png} and $ENG/bench.{json,png}"
