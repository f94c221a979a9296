"""Pure risk-control functions: binomial tail, Hoeffding-Bentkus, upper bounds, fixed-sequence Learn-then-Test."""

import math

import numpy as np
import pytest

from deploykit.tune import risk


@pytest.mark.parametrize("k,n,p", [(0, 360, 0.01), (3, 360, 0.01), (20, 1000, 0.03), (5, 10, 0.5),
                                   (10, 100000, 0.0002), (0, 1, 0.3)])
def test_binom_cdf_matches_scipy(k, n, p):
    stats = pytest.importorskip("scipy.stats")
    assert risk.binom_cdf(k, n, p) == pytest.approx(stats.binom.cdf(k, n, p), rel=1e-9, abs=1e-15)


def test_binom_cdf_known_values_and_edges():
    assert risk.binom_cdf(0, 360, 0.01) == pytest.approx(0.99 ** 360)  # no losses: (1 - p)^n
    assert risk.binom_cdf(2, 4, 0.5) == pytest.approx(11 / 16)
    assert risk.binom_cdf(-1, 10, 0.5) == 0.0 and risk.binom_cdf(10, 10, 0.5) == 1.0
    assert risk.binom_cdf(3, 10, 0.0) == 1.0 and risk.binom_cdf(3, 10, 1.0) == 0.0


def test_pvalues_monotone_in_alpha_and_losses():
    alphas = np.linspace(0.005, 0.3, 40)
    for bound in risk.BOUNDS:
        losses = np.r_[np.ones(7), np.zeros(193)]
        p = [risk.pvalue(losses, a, bound) for a in alphas]
        assert all(a >= b - 1e-15 for a, b in zip(p, p[1:])), bound  # more slack, stronger evidence
        more = np.r_[np.ones(12), np.zeros(188)]
        assert all(risk.pvalue(more, a, bound) >= risk.pvalue(losses, a, bound) - 1e-15 for a in alphas)


def test_binomial_is_tighter_than_hb_for_01_losses():
    for k in (0, 2, 9, 30):
        losses = np.r_[np.ones(k), np.zeros(300 - k)]
        for a in (0.01, 0.05, 0.1):
            assert risk.pvalue(losses, a, "binomial") <= risk.pvalue(losses, a, "hb") + 1e-15
    # Bentkus is e x the binomial tail at ceil(n r)
    assert risk.bentkus_pvalue(0.01, 300, 0.05) == pytest.approx(math.e * risk.binom_cdf(3, 300, 0.05))
    assert risk.hoeffding_pvalue(0.0, 300, 0.05) == pytest.approx(0.95 ** 300)


def test_binomial_refuses_non_binary_losses():
    with pytest.raises(ValueError, match="0/1"):
        risk.pvalue(np.array([0.5, 0.0]), 0.1, "binomial")
    assert 0 <= risk.pvalue(np.array([0.5, 0.0]), 0.1, "hb") <= 1
    with pytest.raises(ValueError, match="unknown bound"):
        risk.pvalue(np.zeros(3), 0.1, "chernoff")


def test_upper_bound():
    zeros = np.zeros(360)
    # zero losses: the bound solves (1 - u)^n = delta
    assert risk.upper_bound(zeros, 0.1) == pytest.approx(1 - 0.1 ** (1 / 360), abs=1e-6)
    losses = np.r_[np.ones(5), np.zeros(395)]
    u_b, u_hb = risk.upper_bound(losses, 0.05, "binomial"), risk.upper_bound(losses, 0.05, "hb")
    assert losses.mean() < u_b < u_hb < 1
    assert risk.pvalue(losses, u_b, "binomial") <= 0.05 < risk.pvalue(losses, u_b - 1e-4, "binomial")
    assert risk.upper_bound(losses, 0.01) > u_b  # more confidence, looser bound


def test_min_samples():
    assert risk.min_samples(0.005, 0.1) == 460
    assert risk.binom_cdf(0, 460, 0.005) <= 0.1 < risk.binom_cdf(0, 459, 0.005)
    assert risk.min_samples(0.01, 0.05) == 299


def test_fixed_sequence_stops_at_first_non_rejection():
    assert risk.fixed_sequence(np.array([0.01, 0.02, 0.5, 0.01]), 0.05) == 1  # the later 0.01 does not count
    assert risk.fixed_sequence(np.array([0.2, 0.01]), 0.05) == -1
    assert risk.fixed_sequence(np.array([0.01, 0.01]), 0.05) == 1


def test_learn_then_test_picks_nothing_when_nothing_passes():
    losses = np.ones((5, 100), dtype=np.int8)  # every candidate is always wrong
    r = risk.learn_then_test(losses, 0.01, 0.1)
    assert r.last == -1 and len(r.certified) == 0
    # too few samples to certify epsilon even with zero losses
    r = risk.learn_then_test(np.zeros((3, 100), np.int8), 0.005, 0.1)
    assert r.last == -1


def test_learn_then_test_along_a_path():
    rng = np.random.default_rng(0)
    rates = np.linspace(0.0, 0.2, 21)  # losses grow along the path
    losses = (rng.random((21, 2000)) < rates[:, None]).astype(np.int8)
    r = risk.learn_then_test(losses, 0.05, 0.1, stop_early=False)
    assert 0 <= r.last < 21
    assert rates[r.last] <= 0.05  # the chosen candidate's true risk is within epsilon here
    assert (r.pvalues[: r.last + 1] <= 0.1).all() and r.pvalues[r.last + 1] > 0.1
    with pytest.raises(ValueError):
        risk.learn_then_test(losses, 0.05, 1.5)


def test_guarantee_holds_empirically_on_a_known_risk_curve():
    """Over many calibration draws the chosen candidate's true risk exceeds epsilon in at most ~delta of them."""
    rng = np.random.default_rng(1)
    rates = np.linspace(0.0, 0.1, 41)
    eps, delta, bad = 0.03, 0.1, 0
    for _ in range(300):
        losses = (rng.random((41, 400)) < rates[:, None]).astype(np.int8)
        r = risk.learn_then_test(losses, eps, delta)
        bad += r.last >= 0 and rates[r.last] > eps
    assert bad / 300 <= delta


def test_losses():
    assert risk.consistency_loss(np.array([1, 2, 3]), np.array([1, 0, 3])).tolist() == [0, 1, 0]
    correct, full = np.array([True, False, False, True]), np.array([True, True, False, False])
    assert risk.accuracy_loss(correct, full).tolist() == [0, 1, 0, 0]


def test_shared_threshold_path_is_fixed_and_ordered():
    p = risk.shared_threshold_path()
    assert p[0] == 1.0 and p[-1] == 0.0 and (np.diff(p) < 0).all()
    np.testing.assert_array_equal(p, risk.shared_threshold_path())
