"""Issue-2 speed benchmark: a 4-stage multi-exit ``vit_small_patch16_224`` on ONNX Runtime CPU.

Untrained weights (speed doesn't depend on them); the exit distribution is fixed at 0.4/0.3/0.2/0.1 by setting
thresholds from score quantiles on the bench inputs. Compares, side by side in one run: PyTorch eager (full
model), the monolithic ONNX graph, the 4-stage chain with exits disabled, and the cascade.

    python benchmarks/pipeline_bench.py --out bench-out/pipeline
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from deploykit.export import export_model
from deploykit.methods import create_backbone, create_method
from deploykit.methods.backbone import backbone_data_config
from deploykit.tune.bench import bench


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--backbone", default="vit_small_patch16_224")
    ap.add_argument("--out", default="bench-out/pipeline")
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    out = Path(args.out)
    torch.manual_seed(0)
    bb = create_backbone(args.backbone, 1000)
    model = create_method("multiexit", bb, 1000).eval()
    eng = out / "engine"
    if not (eng / "deploykit.json").exists():
        export_model(model, eng, labels=[str(i) for i in range(1000)], preprocessing=backbone_data_config(bb),
                     name=args.backbone)
    report = bench(eng, batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
                   exit_fractions=[0.4, 0.3, 0.2, 0.1], torch_model=model, samples=args.samples,
                   repeats=args.repeats, warmup=2, json_out=out / "pipeline_bench.json", progress=True,
                   ort_default_reference=True)
    report["spinning_check"] = spinning_check(eng, [int(b) for b in args.batch_sizes.split(",")], args.repeats)
    (out / "pipeline_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    from deploykit.tune.report import bench_summary

    for w in report["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    print(bench_summary(report, out / "pipeline_bench.json"))


def spinning_check(eng: Path, batch_sizes: list[int], repeats: int) -> list[dict]:
    """Chain with exits disabled, sessions with and without ORT's spinning thread pools, side by side.

    With spinning, an idle stage's pool keeps burning a core after its run while the next stage needs it.
    """
    import numpy as np

    from deploykit.backends.ort import OrtRunner
    from deploykit.manifest import Manifest
    from deploykit.runtime.cascade import Cascade
    from deploykit.tune.timing import spread, time_interleaved

    m = Manifest.load(eng)
    shape = [int(v) for v in m.input_spec.shape[1:]]
    rows = []
    chains = {spin: Cascade(m, [OrtRunner(m.path_of(s.file), spinning=spin) for s in m.stages])
              for spin in (False, True)}
    monos = {spin: OrtRunner(m.path_of(m.monolithic.file), spinning=spin) for spin in (False, True)}
    for bs in batch_sizes:
        n = max(bs, 16)
        x = np.random.default_rng(0).standard_normal((n, *shape), dtype=np.float32)
        batches = [x[i:i + bs] for i in range(0, n, bs)]
        variants = {}
        for spin in (False, True):
            tag = "spinning" if spin else "no_spinning"
            variants[f"chain_{tag}"] = lambda c=chains[spin], bb=batches: [c.run(b, [None] * 4) for b in bb]
            variants[f"monolithic_{tag}"] = lambda r=monos[spin], bb=batches: [r.run({"image": b}) for b in bb]
        samples = time_interleaved(variants, warmup=1, repeats=repeats)
        spreads = {k: spread(v, 1000.0 / len(batches)) for k, v in samples.items()}
        t = {k: v["median"] for k, v in spreads.items()}
        rows.append({"batch_size": bs, **{f"{k}_ms": v for k, v in t.items()}, "spread_ms": spreads,
                     "chain_overhead_no_spinning": t["chain_no_spinning"] / t["monolithic_no_spinning"],
                     "chain_overhead_spinning": t["chain_spinning"] / t["monolithic_spinning"]})
    return rows


if __name__ == "__main__":
    main()
