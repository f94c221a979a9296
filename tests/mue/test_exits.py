import math

import numpy as np
import torch

from deploykit.runtime.exit_rules import cosine_per_sample, decoder_threshold, exits, layer_fraction


def test_cosine_is_per_sample_frobenius_and_ignores_pads():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 5, 4)), rng.normal(size=(3, 5, 4))
    mask = np.array([[1, 1, 1, 0, 0], [1] * 5, [1, 0, 0, 0, 0]], np.float64)
    got = cosine_per_sample(a, b, mask)
    for r in range(3):
        keep = mask[r] > 0
        x, y = a[r][keep].ravel(), b[r][keep].ravel()
        assert math.isclose(got[r], x @ y / (np.linalg.norm(x) * np.linalg.norm(y)), rel_tol=1e-6)
    # pads can hold anything: the score doesn't change
    a2 = a.copy()
    a2[0, 3:] = 1e3
    assert np.allclose(cosine_per_sample(a2, b, mask), got)
    # torch and numpy agree; one decoder token [B, D]
    t = cosine_per_sample(torch.tensor(a[:, 0]), torch.tensor(b[:, 0]))
    assert np.allclose(t.numpy(), cosine_per_sample(a[:, 0], b[:, 0]))


def test_exit_is_strict_and_one_never_exits():
    s = np.array([0.5, 0.9, 0.95, 1.0])
    assert exits(s, 0.9).tolist() == [False, False, True, True]
    assert not exits(s, 1.0).any() and not exits(s, None).any() and not exits(s + 1e-7, 1.0).any()


def test_decoder_threshold_matches_reference_schedule():
    n, theta = 16, 0.9
    for step in range(6):  # steps < (N+1)/3 = 5.67 run at full depth
        assert decoder_threshold(step, theta, n, decay=True) == 1.0
    assert math.isclose(decoder_threshold(6, theta, n, True), 0.9 * 0.9 + 0.1 * math.exp(-7 / 17))
    assert math.isclose(decoder_threshold(6, theta, n, True), 0.876, abs_tol=1e-3)
    assert math.isclose(decoder_threshold(16, theta, n, True), 0.847, abs_tol=1e-3)
    assert decoder_threshold(0, theta, n, decay=False) == theta
    assert decoder_threshold(3, None, n, True) is None


def test_layer_fraction():
    assert layer_fraction(6, 6, [6, 6], 6, 6) == 1.0
    assert layer_fraction(2, 6, [3], 6, 6) == 11 / 18
