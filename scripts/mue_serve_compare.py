"""Ask a running serve-local the doc's two MuE questions and compare with what `deploykit predict` printed.

    python scripts/mue_serve_compare.py --url http://127.0.0.1:PORT --model mue-synthetic \
        --predict-out OUT.jsonl [OUT2.jsonl ...]

Each predict output holds one JSON line per image; the image and the text are taken from the doc's matching
predict command (scripts/mue_doc_commands.py), so the server gets exactly the same inputs. Exits 1 on a mismatch.
"""
from __future__ import annotations

import argparse
import base64
import json
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mue_doc_commands import doc_commands  # noqa: E402


def predict_inputs() -> list[tuple[str, str | None, str]]:
    """(image, text or None, task) of each doc predict command, in pipeline order."""
    out = []
    for argv in doc_commands():
        if argv[1] != "predict":
            continue
        text = argv[argv.index("--text") + 1] if "--text" in argv else None
        task = argv[argv.index("--task") + 1] if "--task" in argv else ("entailment" if text else "caption")
        out.append((argv[3], text, task))
    return out


def infer(url: str, model: str, image: str, text: str | None, task: str) -> dict:
    """One KServe v2 JSON request as docs/serve.md shows it; the outputs by name."""
    inputs = [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
               "data": [base64.b64encode(Path(image).read_bytes()).decode()]}]
    if text is not None:
        inputs.append({"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]})
    body = json.dumps({"parameters": {"task": task}, "inputs": inputs}).encode()
    req = urllib.request.Request(f"{url}/v2/models/{model}/infer", body, {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return {o["name"]: o["data"] for o in json.load(r)["outputs"]}


def compare(served: dict, predicted: dict, task: str) -> list[str]:
    """Differences between a served answer and predict's line (empty: identical)."""
    key = "answer" if task == "entailment" else "caption"
    dec = predicted["decoder_layers"]
    diffs = []
    if served["text"][0] != predicted[key]:
        diffs.append(f"text {served['text'][0]!r} != {predicted[key]!r}")
    for name, want in (("image_layers", predicted["image_layers"]), ("text_layers", predicted["text_layers"])):
        if served[name][0] != want:
            diffs.append(f"{name} {served[name][0]} != {want}")
    got_dec = served["decoder_layers"]
    if got_dec[: len(dec)] != dec or any(got_dec[len(dec):]):
        diffs.append(f"decoder_layers {got_dec} != {dec} (+ zero padding)")
    if abs(served["layer_fraction"][0] - predicted["layer_fraction"]) > 1e-6:
        diffs.append(f"layer_fraction {served['layer_fraction'][0]} != {predicted['layer_fraction']}")
    return diffs


def main() -> None:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--predict-out", nargs="+", required=True, type=Path, help="predict's stdout, per command")
    args = ap.parse_args()
    cases = predict_inputs()
    if len(cases) != len(args.predict_out):
        sys.exit(f"{len(cases)} predict commands in the doc but {len(args.predict_out)} outputs")
    bad = 0
    for (image, text, task), out in zip(cases, args.predict_out):
        predicted = json.loads(out.read_text().splitlines()[0])
        served = infer(args.url, args.model, image, text, task)
        diffs = compare(served, predicted, task)
        key = "answer" if task == "entailment" else "caption"
        print(f"{task}: served {served['text'][0]!r} layers img {served['image_layers'][0]} txt "
              f"{served['text_layers'][0]} dec {served['decoder_layers']} | predict {predicted[key]!r} "
              f"-> {'SAME' if not diffs else 'DIFFERENT: ' + '; '.join(diffs)}")
        bad += bool(diffs)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
