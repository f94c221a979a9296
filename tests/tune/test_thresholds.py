import numpy as np
import pytest

from deploykit.errors import ConfigError
from deploykit.tune.bench import thresholds_for_fractions
from deploykit.tune.thresholds import choose, first_exit, pareto_front, simulate, sweep


def _toy(n=200, seed=0):
    rng = np.random.default_rng(seed)
    scores = rng.uniform(size=(3, n))
    # correctness rises with depth and with confidence, as in a real multi-exit model
    correct = np.stack([rng.uniform(size=n) < 0.4 + 0.5 * scores[k] + 0.1 * k for k in range(3)])
    correct[-1] = rng.uniform(size=n) < 0.97
    cum = np.array([1.0, 2.0, 3.0])
    return scores, correct, cum


def test_first_exit():
    scores = np.array([[0.9, 0.1, 0.1], [0.0, 0.8, 0.1], [0, 0, 0]])
    assert first_exit(scores, np.array([0.5, 0.5])).tolist() == [0, 1, 2]
    assert first_exit(scores, np.array([np.inf, np.inf])).tolist() == [2, 2, 2]
    assert first_exit(scores, np.array([[0.5, 0.5], [0.95, 0.5]])).tolist() == [[0, 1, 2], [2, 1, 2]]


def test_simulate_extremes():
    scores, correct, cum = _toy()
    acc, flops, frac = simulate(scores, correct, cum, 3.0, [None, None])
    assert flops == pytest.approx(1.0) and acc == pytest.approx(correct[-1].mean())
    assert frac.tolist() == [0, 0, 1]
    acc, flops, frac = simulate(scores, correct, cum, 3.0, [0.0, 0.0])
    assert flops == pytest.approx(1 / 3) and frac[0] == 1


def test_sweep_choose_and_front():
    scores, correct, cum = _toy()
    sw = sweep(scores, correct, cum, 3.0, levels=21)
    full = correct[-1].mean()
    i = choose(sw, full, max_drop=2.0)
    assert sw.accuracy[i] >= full - 0.02
    # nothing cheaper meets the same accuracy bar
    ok = sw.accuracy >= full - 0.02
    assert sw.flops_ratio[i] == pytest.approx(sw.flops_ratio[ok].min())
    j = choose(sw, full, flops_budget=0.5)
    assert sw.flops_ratio[j] <= 0.5 + 1e-9
    assert sw.accuracy[j] == pytest.approx(sw.accuracy[sw.flops_ratio <= 0.5 + 1e-9].max())
    front = pareto_front(sw.accuracy, sw.flops_ratio)
    assert np.all(np.diff(sw.flops_ratio[front]) >= 0) and np.all(np.diff(sw.accuracy[front]) > 0)


def test_choose_needs_one_objective():
    scores, correct, cum = _toy()
    sw = sweep(scores, correct, cum, 3.0, levels=5)
    with pytest.raises(ConfigError):
        choose(sw, 0.9)
    with pytest.raises(ConfigError, match="cheapest possible"):
        choose(sw, 0.9, flops_budget=0.1)


def test_thresholds_for_fractions():
    rng = np.random.default_rng(1)
    scores = rng.uniform(size=(4, 1000))
    thr = thresholds_for_fractions(scores, [0.4, 0.3, 0.2, 0.1])
    _, _, frac = simulate(scores, np.ones_like(scores, dtype=bool), np.arange(1, 5.0), 4.0, thr[:-1])
    np.testing.assert_allclose(frac, [0.4, 0.3, 0.2, 0.1], atol=0.002)
    with pytest.raises(ConfigError, match="sum to 1"):
        thresholds_for_fractions(scores, [0.5, 0.5, 0.5, 0.1])
    with pytest.raises(ConfigError, match="one per stage"):
        thresholds_for_fractions(scores, [0.5, 0.5])
