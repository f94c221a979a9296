"""The one exit step (deploykit/runtime/exit_step.py): results at original positions, survivors compacted."""

from __future__ import annotations

import numpy as np

from deploykit.runtime.exit_step import ExitState, exit_mask


def test_exit_mask_rules():
    s = np.array([0.2, 0.5, 0.9], np.float32)
    assert exit_mask(s, 0.5, last=False).tolist() == [False, True, True]  # score >= threshold
    assert exit_mask(s, None, last=False).tolist() == [False, False, False]  # exit off
    assert exit_mask(s, None, last=True).tolist() == [True, True, True]  # the last stage takes every row


def test_three_stages_write_results_at_original_positions():
    st = ExitState(5, 2)
    logits0 = np.arange(10, dtype=np.float32).reshape(5, 2)
    keep = st.step(0, [0.9, 0.1, 0.8, 0.2, 0.3], 0.7, False, logits0)
    assert keep.tolist() == [1, 3, 4] and st.rows.tolist() == [1, 3, 4]
    calls = []

    def lazy(where, all_exit):  # a device runner gathers only the exiting rows
        calls.append((where.tolist(), all_exit))
        return np.full((len(where), 2), 7.0, np.float32)

    keep = st.step(1, [0.1, 0.95, 0.2], 0.7, False, lazy)
    assert keep.tolist() == [0, 2] and st.rows.tolist() == [1, 4] and calls == [([1], False)]
    assert st.step(2, [0.0, 0.0], 0.7, True, np.array([[1, 2], [3, 4]], np.float32)) is None
    assert st.exit_stage.tolist() == [0, 2, 0, 1, 2]
    np.testing.assert_array_equal(st.score, np.array([0.9, 0.0, 0.8, 0.95, 0.0], np.float32))
    np.testing.assert_array_equal(st.logits[[0, 2]], logits0[[0, 2]])
    np.testing.assert_array_equal(st.logits[3], [7, 7])
    np.testing.assert_array_equal(st.logits[[1, 4]], [[1, 2], [3, 4]])
    np.testing.assert_allclose(st.probs().sum(1), 1.0, rtol=1e-6)


def test_no_exit_keeps_every_row():
    st = ExitState(3, 2)
    keep = st.step(0, [0.1, 0.2, 0.3], None, False, np.zeros((3, 2), np.float32))
    assert keep.tolist() == [0, 1, 2] and (st.exit_stage == -1).all()


def test_nonfinite_rows_are_found_wherever_they_exited():
    """serve-ray refuses these rows as Cascade.run does (a NaN never reaches a client as a number)."""
    st = ExitState(4, 2)
    st.step(0, np.array([0.9, 0.1, 0.9, 0.1], np.float32), 0.5, False,
            np.array([[1, 0], [0, 1], [np.nan, 0], [0, 0]], np.float32))
    st.step(1, np.array([np.inf, 0.2], np.float32), None, True, np.array([[0, 1], [1, 0]], np.float32))
    assert st.nonfinite_rows().tolist() == [1, 2]
    clean = ExitState(1, 2)
    clean.step(0, np.array([0.5], np.float32), None, True, np.array([[0, 1]], np.float32))
    assert clean.nonfinite_rows().tolist() == []
