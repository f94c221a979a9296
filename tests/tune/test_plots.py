"""Plots a person reads at a glance: calibration zoomed on what matters, bench with spread and exit fractions."""

from __future__ import annotations

from deploykit.tune.calibrate import _zoom


def _report(max_drop=0.5):
    curve = [{"flops_ratio": f, "val_accuracy": a, "test_flops_ratio": f + 0.01, "test_accuracy": a - 0.002}
             for f, a in [(0.1, 0.60), (0.2, 0.90), (0.3, 0.965), (0.35, 0.972), (0.6, 0.975), (1.0, 0.975)]]
    return {"curve": curve, "objective": {"max_drop_points": max_drop},
            "val": {"full_accuracy": 0.975, "cascade_accuracy": 0.972, "flops_ratio": 0.35},
            "test": {"full_accuracy": 0.98, "cascade_accuracy": 0.978, "flops_ratio": 0.36}}


def test_calibration_zoom_shows_both_full_lines_the_band_and_the_choice_but_not_the_tail():
    (x_lo, x_hi), (y_lo, y_hi) = _zoom(_report())
    assert y_lo <= 97.5 - 0.5 and y_hi >= 98.0  # allowed-drop band on val, full depth on val and test
    assert x_lo <= 0.35 and x_hi >= 1.0  # the choice and full depth
    assert y_lo > 90.0 and x_lo > 0.1  # the useless low-accuracy tail is cut away, so the region isn't squeezed
