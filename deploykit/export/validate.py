"""Parity of exported graphs against PyTorch, on real inputs, at a stated tolerance.

Two checks: each stage alone (fed PyTorch's state, so an error can't hide behind an earlier one) and the whole
chain end to end (fed the previous ONNX stage's outputs, as the runtime does). Predictions must be identical at
every exit; logits and scores must agree within ``atol`` + ``rtol`` * |ref|.

Models with discrete, input-dependent choices (token merging) may expose ``near_tie_rows(k, *state, eps)``: the
rows whose choice in stage ``k`` hinges on a score gap below ``eps``, which float noise can legitimately flip in
another runtime. Those rows are counted and reported per stage (``near_tied_rows``, and the mismatches among them);
a prediction mismatch or a logit difference confined to them does not fail the export, anything else still does.
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
TIE_EPS = 1e-4


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
    # near-tied rows (models with ``near_tie_rows``); ``None`` when the model has no discrete choices to tie
    near_tie_eps: float | None = None
    near_tied_rows: list[int] | None = None  # per stage, rows tied in that stage (stage-alone check)
    chain_near_tied_rows: list[int] | None = None  # per stage, rows tied in that stage or any earlier one
    near_tied_prediction_mismatches: list[int] | None = None  # the part of prediction_mismatches on tied rows
    chain_near_tied_prediction_mismatches: list[int] | None = None

    @property
    def ok(self) -> bool:
        """No prediction mismatch outside the near-tied rows (mismatches on those are reported, not failures)."""
        z = [0] * len(self.prediction_mismatches)
        return (not any(m - t for m, t in zip(self.prediction_mismatches, self.near_tied_prediction_mismatches or z))
                and not any(m - t for m, t in zip(self.chain_prediction_mismatches,
                                                  self.chain_near_tied_prediction_mismatches or z)))

    def to_dict(self) -> dict[str, Any]:
        out = {"samples": self.samples, "atol": self.atol, "rtol": self.rtol,
               "max_abs_logit_diff": self.max_abs_logit_diff, "max_abs_score_diff": self.max_abs_score_diff,
               "prediction_mismatches": self.prediction_mismatches,
               "chain_prediction_mismatches": self.chain_prediction_mismatches}
        if self.near_tied_rows is not None:
            out.update(near_tie_eps=self.near_tie_eps, near_tied_rows=self.near_tied_rows,
                       chain_near_tied_rows=self.chain_near_tied_rows,
                       near_tied_prediction_mismatches=self.near_tied_prediction_mismatches,
                       chain_near_tied_prediction_mismatches=self.chain_near_tied_prediction_mismatches)
        return out


def check_parity(model: ExitModel, manifest: Any, inputs: np.ndarray, batch_size: int = 64,
                 atol: float = ATOL, rtol: float = RTOL, tie_eps: float = TIE_EPS) -> ParityReport:
    """Compare every exported stage with PyTorch on ``inputs``; raise :class:`ExportError` when they disagree.

    Rows the model reports as near-tied (``near_tie_rows``, gap below ``tie_eps``) are exempt from the prediction
    and tolerance checks but counted in the report.
    """
    from deploykit.backends.ort import OrtRunner

    runners = [OrtRunner(manifest.path_of(s.file)) for s in manifest.stages]
    score_kind = manifest.exit_policy.score
    k_last = manifest.num_stages - 1
    report = ParityReport(samples=len(inputs), atol=atol, rtol=rtol,
                          max_abs_logit_diff=[0.0] * manifest.num_stages,
                          max_abs_score_diff=[0.0] * manifest.num_stages,
                          prediction_mismatches=[0] * manifest.num_stages,
                          chain_prediction_mismatches=[0] * manifest.num_stages)
    ties = callable(getattr(model, "near_tie_rows", None))
    if ties:
        zeros = [0] * manifest.num_stages
        report.near_tie_eps = tie_eps
        report.near_tied_rows, report.chain_near_tied_rows = list(zeros), list(zeros)
        report.near_tied_prediction_mismatches, report.chain_near_tied_prediction_mismatches = list(zeros), list(zeros)
    tol_fail: list[str] = []
    try:
        from deploykit import progress as P

        for lo in P.track(range(0, len(inputs), batch_size), "export parity"):
            x = inputs[lo:lo + batch_size]
            state_t: tuple[torch.Tensor, ...] = (torch.from_numpy(x),)
            chain_feed: list[np.ndarray] = [x]
            chain_tied = np.zeros(len(x), dtype=bool)  # a tie in an earlier stage can change every later one
            for k, (spec, runner) in enumerate(zip(manifest.stages, runners)):
                stage_in = state_t
                tied = (model.near_tie_rows(k, *stage_in, eps=tie_eps).numpy().astype(bool) if ties
                        else np.zeros(len(x), dtype=bool))
                chain_tied |= tied
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
                wrong = lg.argmax(1) != ref_logits.argmax(1)
                report.prediction_mismatches[k] += int(wrong.sum())
                if not np.allclose(lg[~tied], ref_logits[~tied], atol=atol, rtol=rtol):
                    d_free = float(np.abs(lg[~tied] - ref_logits[~tied]).max())
                    tol_fail.append(f"stage {k} logits differ by up to {d_free:.2e}")
                # chained: fed the previous ONNX stage's outputs, as the runtime does
                chain_out = runner.run(dict(zip([t.name for t in spec.inputs], chain_feed)))
                chain_wrong = chain_out[spec.exit_logits].argmax(1) != ref_logits.argmax(1)
                report.chain_prediction_mismatches[k] += int(chain_wrong.sum())
                if ties:
                    report.near_tied_rows[k] += int(tied.sum())
                    report.chain_near_tied_rows[k] += int(chain_tied.sum())
                    report.near_tied_prediction_mismatches[k] += int((wrong & tied).sum())
                    report.chain_near_tied_prediction_mismatches[k] += int((chain_wrong & chain_tied).sum())
                if k < k_last:
                    chain_feed = [chain_out[t.name] for t in spec.outputs]
    finally:
        for r in runners:
            r.close()
    if not report.ok or tol_fail:
        raise ExportError(
            "exported graphs disagree with PyTorch on real inputs: "
            f"prediction mismatches per stage {report.prediction_mismatches} (chained "
            f"{report.chain_prediction_mismatches}"
            + (f"; of which on near-tied rows {report.near_tied_prediction_mismatches} (chained "
               f"{report.chain_near_tied_prediction_mismatches}), which are allowed" if ties else "")
            + f"); {'; '.join(tol_fail[:4]) or 'logits within tolerance'} "
            f"(atol {atol}, rtol {rtol}). This is a bug in the method's export path — please report it"
        )
    return report
