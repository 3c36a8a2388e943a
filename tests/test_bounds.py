"""Tests of probunlearn.bounds (SPEC §5): closed forms, monotonicity, exactness of M_sigma against
an independent LP reference, vectorisation, input checks, and a coverage simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, stats

from probunlearn import bounds

ALPHA = 0.01


def eps1(n, alpha=ALPHA):
    return math.sqrt(math.log(1 / alpha) / (2 * n))


def eps2(n, alpha=ALPHA):
    return math.sqrt(math.log(2 / alpha) / (2 * n))


def atom_std_upper(v, eps):
    """Max std over the band around an atom at v (0 < v < 1, eps < 1/2), derived by hand.

    The band allows mass p0 in [0, eps] at 0, eps at 1 and 1 - eps - p0 at v; the variance is a
    concave quadratic in p0 with vertex where the mean equals v/2, i.e. p0 = 1/2 - eps + eps/v.
    """
    p0 = min(max(0.5 - eps + eps / v, 0.0), eps)
    mean = v * (1 - eps - p0) + eps
    second = v * v * (1 - eps - p0) + eps
    return math.sqrt(second - mean * mean)


# ---------------------------------------------------------------------------------------------
# closed forms


@pytest.mark.parametrize("n", [1, 5, 40, 1000])
def test_closed_forms_all_zeros_and_all_ones(n):
    zeros, ones = np.zeros(n), np.ones(n)
    e1, e2 = eps1(n), eps2(n)
    # M_bin: Beta(1, n) quantile for k = 0; 1 for k = n.
    assert bounds.binary_leak_upper(zeros) == pytest.approx(1 - ALPHA ** (1 / n), rel=1e-10)
    assert bounds.binary_leak_upper(ones) == 1.0
    # exceedance: F_n(x) = 1 for zeros, 0 below 1 for ones.
    assert bounds.exceedance_upper(zeros, 0.3) == pytest.approx(min(1.0, e1))
    assert bounds.exceedance_upper(ones, 0.3) == 1.0
    # mean: [0, min(1, eps1)] for zeros, [max(0, 1 - eps1), 1] for ones.
    assert bounds.mean_bounds(zeros) == pytest.approx((0.0, min(1.0, e1)))
    assert bounds.mean_bounds(ones) == pytest.approx((max(0.0, 1 - e1), 1.0))
    assert bounds.mean_upper(zeros) == pytest.approx(min(1.0, e1))
    # std: Bernoulli(p) with p <= min(eps2, 1/2) of mass moved to the far end.
    p = min(e2, 0.5)
    expected_std = math.sqrt(p * (1 - p))
    assert bounds.std_upper(zeros) == pytest.approx(expected_std, abs=1e-12)
    assert bounds.std_upper(ones) == pytest.approx(expected_std, abs=1e-12)
    assert bounds.ed_score(zeros) == pytest.approx(min(1.0, e1) + 2 * expected_std)
    assert bounds.ed_score(zeros, ed_weight=0.5) == pytest.approx(min(1.0, e1) + 0.5 * expected_std)
    # leak@k
    assert bounds.leak_at_k(zeros, 1) == 0.0 and bounds.leak_at_k(ones, n) == 1.0


@pytest.mark.parametrize("v", [0.1, 0.5, 0.8])
@pytest.mark.parametrize("n", [30, 300])
def test_closed_forms_single_atom(v, n):
    scores = np.full(n, v)
    e1, e2 = eps1(n), eps2(n)
    assert bounds.mean_bounds(scores) == pytest.approx((v * (1 - e1), v + e1 * (1 - v)), abs=1e-12)
    assert bounds.exceedance_upper(scores, v) == pytest.approx(e1)  # P(s > v): F_n(v) = 1
    assert bounds.exceedance_upper(scores, v - 1e-9) == 1.0
    assert bounds.std_upper(scores) == pytest.approx(atom_std_upper(v, e2), abs=1e-12)
    if v == 0.5:  # at v = 1/2 the optimum is symmetric: eps2 at 0 and at 1, std = sqrt(eps2 / 2)
        assert bounds.std_upper(scores) == pytest.approx(math.sqrt(e2 / 2), abs=1e-12)


def test_closed_forms_one_sample():
    for value in (0.0, 0.4, 1.0):  # eps1, eps2 > 1 at n = 1: the band is vacuous
        assert bounds.mean_bounds([value]) == (0.0, 1.0)
        assert bounds.std_upper([value]) == 0.5
        assert bounds.ed_score([value]) == pytest.approx(2.0)
        assert bounds.exceedance_upper([value], 0.5) == 1.0
    assert bounds.binary_leak_upper([0]) == pytest.approx(1 - ALPHA)
    assert bounds.binary_leak_upper([True]) == 1.0
    assert bounds.leak_at_k([1], 1) == 1.0 and bounds.leak_at_k([0], 1) == 0.0


def test_dkw_epsilon():
    assert bounds.dkw_epsilon(50, 0.05) == pytest.approx(eps1(50, 0.05))
    assert bounds.dkw_epsilon(50, 0.05, two_sided=True) == pytest.approx(eps2(50, 0.05))
    # two-sided DKW at alpha is one-sided at alpha / 2
    assert bounds.dkw_epsilon(7, 0.1, two_sided=True) == pytest.approx(bounds.dkw_epsilon(7, 0.05))
    with pytest.raises(ValueError, match="num_samples"):
        bounds.dkw_epsilon(0)


def test_binary_leak_upper_matches_beta_quantile():
    leaks = np.zeros(20)
    leaks[:7] = 1
    assert bounds.binary_leak_upper(leaks, alpha=0.05) == pytest.approx(stats.beta.ppf(0.95, 8, 13))
    # the Clopper-Pearson bound solves P(Binomial(n, p) <= k) = alpha
    p = bounds.binary_leak_upper(leaks, alpha=0.05)
    assert stats.binom.cdf(7, 20, p) == pytest.approx(0.05, rel=1e-8)


def test_mean_bounds_by_hand():
    scores = np.array([0.2, 0.6, 0.6, 1.0])  # F_n = 0, 1/4, 3/4, 1 on [0,.2), [.2,.6), [.6,1), {1}
    e = eps1(4, alpha=0.5)  # 0.2944
    upper = 0.2 * 1 + 0.4 * (1 - max(0.25 - e, 0)) + 0.4 * (1 - (0.75 - e))
    lower = 0.2 * (1 - e) + 0.4 * (1 - (0.25 + e)) + 0.4 * (1 - min(0.75 + e, 1))
    assert bounds.mean_bounds(scores, alpha=0.5) == pytest.approx((lower, upper), abs=1e-12)


def test_leak_at_k_by_hand():
    assert bounds.leak_at_k([1, 0, 0, 0], 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2)
    assert bounds.leak_at_k([1, 1, 0, 0, 0], 3) == pytest.approx(1 - 1 / 10)  # 1 - C(3,3)/C(5,3)
    assert bounds.leak_at_k([1, 1, 1, 0, 0], 3) == 1.0  # fewer clean samples than k
    np.testing.assert_allclose(bounds.leak_at_k([1, 0, 0, 0], [1, 2, 3, 4]), [0.25, 0.5, 0.75, 1.0])
    # large n against exact integer arithmetic
    n, c = 1024, 37
    leaks = np.zeros(n)
    leaks[:c] = 1
    for k in (1, 10, 500, 1000):
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert bounds.leak_at_k(leaks, k) == pytest.approx(exact, rel=1e-10, abs=1e-14)
    # 2-D: mean over questions by default, per question on request
    two = np.array([[1, 0, 0, 0], [1, 1, 1, 1]])
    assert bounds.leak_at_k(two, 2) == pytest.approx((0.5 + 1.0) / 2)
    np.testing.assert_allclose(bounds.leak_at_k(two, 2, average=False), [0.5, 1.0])
    np.testing.assert_allclose(bounds.leak_at_k(two, [1, 2], average=False), [[0.25, 0.5], [1, 1]])
    np.testing.assert_allclose(bounds.leak_at_k(two, [1, 2]), [0.625, 0.75])


# ---------------------------------------------------------------------------------------------
# monotonicity


def _all_upper(scores, alpha=ALPHA):
    leaks = np.asarray(scores) >= 0.5
    return np.array([
        bounds.binary_leak_upper(leaks, alpha),
        bounds.exceedance_upper(scores, 0.45, alpha),
        bounds.mean_upper(scores, alpha),
        -bounds.mean_bounds(scores, alpha)[0],  # lower bound: must not decrease
        bounds.std_upper(scores, alpha),
        bounds.ed_score(scores, alpha),
    ])


@pytest.mark.parametrize("seed", range(4))
def test_more_samples_never_loosen(seed):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.beta(0.7, 1.5, size=rng.integers(3, 40)), 2)
    previous = _all_upper(scores)
    for repeat in (2, 4, 16):  # same empirical distribution, more samples
        current = _all_upper(np.tile(scores, repeat))
        assert (current <= previous + 1e-12).all(), (repeat, current, previous)
        previous = current


@pytest.mark.parametrize("seed", range(4))
def test_larger_alpha_never_loosens(seed):
    rng = np.random.default_rng(100 + seed)
    scores = np.where(rng.random(60) < 0.3, 0.0, rng.beta(3, 2, size=60))
    previous = _all_upper(scores, 1e-4)
    for alpha in (1e-3, 0.01, 0.05, 0.2, 0.5):
        current = _all_upper(scores, alpha)
        assert (current <= previous + 1e-12).all(), (alpha, current, previous)
        previous = current


# ---------------------------------------------------------------------------------------------
# M_sigma: exactness against an independent reference


def _band(scores, eps, x):
    cdf = (np.asarray(scores)[None, :] <= np.asarray(x)[:, None]).mean(axis=1)
    return np.maximum(cdf - eps, 0.0), np.minimum(cdf + eps, 1.0)


def reference_max_std(scores, alpha):
    """Brute force: min over c (bounded Brent, G is convex) of an LP max_p sum_i p_i (x_i - c)^2
    over probability vectors p on a fine support (a 201-point grid plus the samples) whose CDF
    stays in the band at every support point. L and U only jump at samples, so on this support the
    constraints are exact; the LP knows nothing of the clip(t, L, U) structure."""
    n = len(scores)
    support = np.unique(np.concatenate([np.linspace(0, 1, 201), scores]))
    lower, upper = _band(scores, eps2(n, alpha), support)
    cum = np.tril(np.ones((support.size, support.size)))
    a_ub = np.vstack([cum, -cum])
    b_ub = np.concatenate([upper, -lower])

    def worst_second_moment(c):
        res = optimize.linprog(
            -((support - c) ** 2), A_ub=a_ub, b_ub=b_ub, A_eq=np.ones((1, support.size)),
            b_eq=[1.0], bounds=(0, None), method="highs",
        )
        assert res.status == 0
        return -res.fun

    best = optimize.minimize_scalar(worst_second_moment, bounds=(0, 1), method="bounded",
                                    options={"xatol": 1e-10})
    return math.sqrt(best.fun)


CASES = [
    (np.array([0.2, 0.7, 0.7, 0.75, 0.9, 1.0, 1.0, 1.0]), 0.5),
    (np.array([0.0, 0.0, 0.5, 1.0, 1.0] * 3), 0.2),
    (np.where(np.random.default_rng(0).random(100) < 0.85, 0.0, 1.0), 0.01),
    (np.round(np.random.default_rng(1).beta(2, 5, 12), 3), 0.1),
    (np.random.default_rng(2).beta(0.5, 0.5, 25), 0.05),
    (np.where(np.random.default_rng(3).random(40) < 0.5, 0.0, 0.9), 0.01),
    (np.random.default_rng(4).uniform(0.3, 0.4, 60), 0.01),
    (np.round(np.random.default_rng(5).uniform(0, 1, 30), 1), 0.5),
]


@pytest.mark.parametrize("scores, alpha", CASES)
def test_std_upper_equals_brute_force(scores, alpha):
    assert bounds.std_upper(scores, alpha) == pytest.approx(reference_max_std(scores, alpha), abs=1e-6)


def test_std_upper_is_max_over_levels_on_many_rows():
    """Step 3 of the derivation (the knot search) against a dense scan of t: for each row,
    Var(clip(t, L, U)) on 4001 levels t plus the knots never exceeds M_sigma and comes within
    grid resolution of it; many rows with ties and atoms at 0 and 1."""
    rng = np.random.default_rng(11)
    n, alpha = 24, 0.05
    scores = np.round(rng.beta(0.4, 0.6, size=(150, n)), 1)
    fast = bounds.std_upper(scores, alpha)
    e = eps2(n, alpha)
    levels = np.unique(np.concatenate([np.linspace(0, 1, 4001), np.clip(np.arange(n + 1) / n + e, 0, 1),
                                       np.clip(np.arange(n + 1) / n - e, 0, 1)]))
    for row, value in zip(scores, fast):
        support = np.unique(np.concatenate([[0.0, 1.0], row]))
        lower, upper = _band(row, e, support)
        cdf = np.clip(levels[:, None], lower[None, :], upper[None, :])
        cdf[:, -1] = 1.0
        mass = np.diff(cdf, axis=1, prepend=0.0)
        mean = mass @ support
        scanned = np.sqrt((mass @ support**2 - mean**2).max())
        assert scanned <= value + 1e-12
        assert scanned >= value - 1e-5


def relaxation_std_bound(scores, alpha):
    """A looser construction from the literature, evaluated exactly (its grid versions are
    looser still): Var(F) <= E_F[eta(s)], eta(x) = max over the DKW mean interval [m_lo, m_hi]
    of (x - m)^2, maximised over the band *without* monotonicity: F = U where eta decreases,
    L where it increases."""
    m_lo, m_hi = bounds.mean_bounds(scores, alpha / 2)  # eps1(alpha/2) = eps2(alpha)
    mid = 0.5 * (m_lo + m_hi)

    def eta(x):
        return np.maximum((x - m_lo) ** 2, (x - m_hi) ** 2)

    knots = np.unique(np.concatenate([[0.0, mid, 1.0], scores]))
    left, right = knots[:-1], knots[1:]
    lower, upper = _band(scores, eps2(len(scores), alpha), left)
    cdf = np.where(right <= mid, upper, lower)
    return math.sqrt(eta(1.0) - np.sum(cdf * (eta(right) - eta(left))))


@pytest.mark.parametrize("seed", range(6))
def test_std_upper_between_empirical_std_and_looser_constructions(seed):
    rng = np.random.default_rng(200 + seed)
    n = [5, 20, 64, 128, 512, 1024][seed]
    scores = np.where(rng.random(n) < 0.2, 1.0, rng.beta(1 + seed, 3, size=n))
    for alpha in (0.01, 0.1):
        value = bounds.std_upper(scores, alpha)
        assert scores.std() - 1e-12 <= value <= 0.5
        assert value <= relaxation_std_bound(scores, alpha) + 1e-12


# ---------------------------------------------------------------------------------------------
# vectorisation


def test_two_d_equals_row_by_row():
    rng = np.random.default_rng(7)
    scores = np.round(rng.beta(0.6, 0.9, size=(9, 33)), 2)  # ties and atoms at 0 and 1
    scores[0] = 0.0
    scores[1] = 1.0
    scores[2] = 0.37
    leaks = scores >= 0.5
    xs = np.array([0.0, 0.25, 0.5, 0.99])
    lower, upper = bounds.mean_bounds(scores)
    results = {
        "bin": bounds.binary_leak_upper(leaks),
        "exc": bounds.exceedance_upper(scores, 0.5),
        "exc_many": bounds.exceedance_upper(scores, xs),
        "lower": lower,
        "upper": upper,
        "mean_upper": bounds.mean_upper(scores),
        "std": bounds.std_upper(scores),
        "ed": bounds.ed_score(scores, ed_weight=1.5),
        "leak3": bounds.leak_at_k(leaks, [1, 3], average=False),
    }
    assert results["std"].shape == (9,) and results["exc_many"].shape == (9, 4)
    for i, row in enumerate(scores):
        assert results["bin"][i] == bounds.binary_leak_upper(row >= 0.5)
        assert results["exc"][i] == bounds.exceedance_upper(row, 0.5)
        np.testing.assert_array_equal(results["exc_many"][i], bounds.exceedance_upper(row, xs))
        np.testing.assert_array_equal(
            results["exc_many"][i], [bounds.exceedance_upper(row, x) for x in xs]
        )
        assert (results["lower"][i], results["upper"][i]) == pytest.approx(bounds.mean_bounds(row), abs=1e-14)
        assert results["mean_upper"][i] == pytest.approx(bounds.mean_upper(row), abs=1e-14)
        assert results["std"][i] == pytest.approx(bounds.std_upper(row), abs=1e-14)
        assert results["ed"][i] == pytest.approx(bounds.ed_score(row, ed_weight=1.5), abs=1e-14)
        np.testing.assert_allclose(results["leak3"][i], bounds.leak_at_k(row >= 0.5, [1, 3]))
    assert bounds.leak_at_k(leaks, 3) == pytest.approx(results["leak3"][:, 1].mean())
    assert isinstance(bounds.std_upper(scores[0]), float)


# ---------------------------------------------------------------------------------------------
# bad inputs

SCORE_FUNCTIONS = [
    lambda s, **kw: bounds.exceedance_upper(s, 0.5, **kw),
    bounds.mean_bounds,
    bounds.mean_upper,
    bounds.std_upper,
    bounds.ed_score,
]
LEAK_FUNCTIONS = [bounds.binary_leak_upper]


@pytest.mark.parametrize("func", SCORE_FUNCTIONS + LEAK_FUNCTIONS)
@pytest.mark.parametrize(
    "bad, message",
    [
        ([0.2, 1.5], r"\[0, 1\]"),
        ([-0.1, 0.0], r"\[0, 1\]"),
        ([0.2, np.nan], "NaN"),
        ([], "empty"),
        (np.zeros((2, 0)), "empty"),
        (np.zeros((2, 2, 2)), "1-D"),
        (["a", "b"], "numbers"),
    ],
)
def test_bad_scores_raise(func, bad, message):
    with pytest.raises(ValueError, match=message):
        func(bad)


@pytest.mark.parametrize("func", SCORE_FUNCTIONS + LEAK_FUNCTIONS)
@pytest.mark.parametrize("alpha", [0, 1, -0.1, 1.5, float("nan"), "x"])
def test_bad_alpha_raises(func, alpha):
    with pytest.raises(ValueError, match="alpha"):
        func([0.0, 1.0], alpha=alpha)


def test_other_bad_arguments_raise():
    with pytest.raises(ValueError, match="0/1"):
        bounds.binary_leak_upper([0.0, 0.5])
    with pytest.raises(ValueError, match="0/1"):
        bounds.leak_at_k([0.0, 0.5], 1)
    for k in (0, 5, -1, [1, 5], 1.5, []):
        with pytest.raises(ValueError, match="k"):
            bounds.leak_at_k([0, 1, 1, 0], k)
    for x in (np.nan, np.inf, [[0.1]]):
        with pytest.raises(ValueError, match="x"):
            bounds.exceedance_upper([0.1, 0.2], x)
    for lam in (-1.0, np.inf, "big"):
        with pytest.raises(ValueError, match="ed_weight"):
            bounds.ed_score([0.1, 0.2], ed_weight=lam)


# ---------------------------------------------------------------------------------------------
# coverage simulation: each bound is below the true value in >= 1 - alpha of trials

COVERAGE_ALPHA = 0.1
TRIALS = 2000
THRESHOLD = 0.5  # leak iff s >= THRESHOLD; exceedance at x = THRESHOLD


def _beta_moments(a, b):
    mean = a / (a + b)
    return mean, mean * mean + a * b / ((a + b) ** 2 * (a + b + 1))


def _distributions():
    """name -> (sampler(rng, shape), mean, std, P(s >= .5), P(s > .5)), all computed analytically."""
    out = {}
    m, m2 = _beta_moments(2, 5)
    p = stats.beta.sf(THRESHOLD, 2, 5)
    out["beta(2,5)"] = (lambda rng, shape: rng.beta(2, 5, shape), m, math.sqrt(m2 - m * m), p, p)
    grid = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    out["uniform{0,.25,..,1}"] = (
        lambda rng, shape: rng.choice(grid, shape), 0.5, math.sqrt(0.125), 0.6, 0.4,
    )
    out["bernoulli(.3)"] = (
        lambda rng, shape: (rng.random(shape) < 0.3).astype(float), 0.3, math.sqrt(0.21), 0.3, 0.3,
    )
    m, m2 = _beta_moments(5, 2)
    p = 0.4 * stats.beta.sf(THRESHOLD, 5, 2)

    def mixture(rng, shape):
        return np.where(rng.random(shape) < 0.6, 0.0, rng.beta(5, 2, shape))

    mean, second = 0.4 * m, 0.4 * m2
    out[".6 delta0 + .4 beta(5,2)"] = (mixture, mean, math.sqrt(second - mean * mean), p, p)
    return out


@pytest.mark.parametrize("name", list(_distributions()))
def test_coverage_simulation(name):
    sampler, mean, std, p_leak, p_exceed = _distributions()[name]
    # the analytic truths agree with a huge reference sample
    reference = sampler(np.random.default_rng(0), 2_000_000)
    assert reference.mean() == pytest.approx(mean, abs=2e-3)
    assert reference.std() == pytest.approx(std, abs=2e-3)
    assert (reference >= THRESHOLD).mean() == pytest.approx(p_leak, abs=2e-3)

    slack = 3 * math.sqrt(COVERAGE_ALPHA * (1 - COVERAGE_ALPHA) / TRIALS)
    rng = np.random.default_rng(10 + list(_distributions()).index(name))
    tol = 1e-12  # exact ties (e.g. Bernoulli) are not failures
    for n in (10, 50, 200):
        scores = sampler(rng, (TRIALS, n))
        lower, upper = bounds.mean_bounds(scores, COVERAGE_ALPHA)
        failures = {
            "M_bin": bounds.binary_leak_upper(scores >= THRESHOLD, COVERAGE_ALPHA) < p_leak - tol,
            "exceedance": bounds.exceedance_upper(scores, THRESHOLD, COVERAGE_ALPHA) < p_exceed - tol,
            "mean_upper": upper < mean - tol,
            "mean_lower": lower > mean + tol,
            "std_upper": bounds.std_upper(scores, COVERAGE_ALPHA) < std - tol,
        }
        for bound, failed in failures.items():
            assert failed.mean() <= COVERAGE_ALPHA + slack, (name, n, bound, failed.mean())
        # the bounds are not vacuous: at n = 200 they sit close to the truth
        if n == 200:
            assert np.median(upper) < mean + 0.15
            assert np.median(bounds.std_upper(scores, COVERAGE_ALPHA)) < std + 0.2
