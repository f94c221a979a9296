"""Parity of exported graphs against PyTorch, on real inputs, at a stated tolerance.

Two checks: each stage alone (fed PyTorch's state, so an error can't hide behind an earlier one) and the whole
chain end to end (fed the previous ONNX stage's outputs, as the runtime does). Predictions must be identical at
every exit; logits and scores must agree within ``atol`` + ``rtol`` * |ref|.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from deploykit.errors import ExportError
from deploykit.methods.base import ExitModel
from deploykit.methods.heads import exit_score

ATOL = 1e-4
RTOL = 1e-3


@dataclass
class ParityReport:
    """What the parity check measured (written to the manifest's provenance)."""

    samples: int
    atol: float
    rtol: float
    max_abs_logit_diff: list[float] = field(default_factory=list)
    max_abs_score_diff: list[float] = field(default_factory=list)
    prediction_mismatches: list[int] = field(default_factory=list)
    chain_prediction_mismatches: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(self.prediction_mismatches) and not any(self.chain_prediction_mismatches)

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "atol": self.atol, "rtol": self.rtol,
                "max_abs_logit_diff": self.max_abs_logit_diff, "max_abs_score_diff": self.max_abs_score_diff,
                "prediction_mismatches": self.prediction_mismatches,
                "chain_prediction_mismatches": self.chain_prediction_mismatches}


def check_parity(model: ExitModel, manifest: Any, inputs: np.ndarray, batch_size: int = 64,
                 atol: float = ATOL, rtol: float = RTOL) -> ParityReport:
    """Compare every exported stage with PyTorch on ``inputs``; raise :class:`ExportError` when they disagree."""
    from deploykit.backends.ort import OrtRunner

    runners = [OrtRunner(manifest.path_of(s.file)) for s in manifest.stages]
    score_kind = manifest.exit_policy.score
    k_last = manifest.num_stages - 1
    report = ParityReport(samples=len(inputs), atol=atol, rtol=rtol,
                          max_abs_logit_diff=[0.0] * manifest.num_stages,
                          max_abs_score_diff=[0.0] * manifest.num_stages,
                          prediction_mismatches=[0] * manifest.num_stages,
                          chain_prediction_mismatches=[0] * manifest.num_stages)
    tol_fail: list[str] = []
    try:
        for lo in range(0, len(inputs), batch_size):
            x = inputs[lo:lo + batch_size]
            state_t: tuple[torch.Tensor, ...] = (torch.from_numpy(x),)
            chain_feed: list[np.ndarray] = [x]
            for k, (spec, runner) in enumerate(zip(manifest.stages, runners)):
                stage_in = state_t
                with torch.no_grad():
                    state_t = model.forward_stage(k, *state_t)
                    ref_logits = model.forward_exit(k, *state_t)
                    ref_score = exit_score(ref_logits, score_kind).numpy()
                ref_logits = ref_logits.numpy()
                # stage alone, fed PyTorch's state
                feed = [t.numpy() for t in stage_in]
                out = runner.run(dict(zip([t.name for t in spec.inputs], feed)))
                lg, sc = out[spec.exit_logits], out[spec.exit_score]
                d_lg = float(np.abs(lg - ref_logits).max())
                d_sc = float(np.abs(sc - ref_score).max())
                report.max_abs_logit_diff[k] = max(report.max_abs_logit_diff[k], d_lg)
                report.max_abs_score_diff[k] = max(report.max_abs_score_diff[k], d_sc)
                report.prediction_mismatches[k] += int((lg.argmax(1) != ref_logits.argmax(1)).sum())
                if not np.allclose(lg, ref_logits, atol=atol, rtol=rtol):
                    tol_fail.append(f"stage {k} logits differ by up to {d_lg:.2e}")
                # chained: fed the previous ONNX stage's outputs, as the runtime does
                chain_out = runner.run(dict(zip([t.name for t in spec.inputs], chain_feed)))
                report.chain_prediction_mismatches[k] += int(
                    (chain_out[spec.exit_logits].argmax(1) != ref_logits.argmax(1)).sum())
                if k < k_last:
                    chain_feed = [chain_out[t.name] for t in spec.outputs]
    finally:
        for r in runners:
            r.close()
    if not report.ok or tol_fail:
        raise ExportError(
            "exported graphs disagree with PyTorch on real inputs: "
            f"prediction mismatches per stage {report.prediction_mismatches} (chained "
            f"{report.chain_prediction_mismatches}); {'; '.join(tol_fail[:4]) or 'logits within tolerance'} "
            f"(atol {atol}, rtol {rtol}). This is a bug in the method's export path — please report it"
        )
    return report
