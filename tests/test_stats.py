"""irs_callbacks.stats against independent truth: exact integer Stirling numbers, the exact
distribution of the number of distinct draws (a Markov chain in exact rationals), the papers'
worked numbers, and properties."""

import math
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

from irs_callbacks import stats
from irs_callbacks.stats import (
    SequentialRejectionTest,
    adjusted_irs,
    expected_irs,
    irs_infinity,
    log_pmf_distinct,
    log_stirling2,
    rejection_threshold,
)

# ----------------------------------------------------------------------------- exact references


def stirling2_exact(n: int, k: int) -> int:
    """S2(n, k) in exact integers from the explicit alternating sum."""
    if k > n or (k == 0) != (n == 0):
        return 0
    total = sum((-1) ** j * math.comb(k, j) * (k - j) ** n for j in range(k + 1))
    return total // math.factorial(k)


def distinct_pmf_exact(n: int, s: int) -> list[Fraction]:
    """P(K = k | n, s), k = 0..n, by the chain K_{m+1} = K_m + [new value], in exact rationals."""
    p = [Fraction(1)] + [Fraction(0)] * n
    for _ in range(n):
        q = [Fraction(0)] * (n + 1)
        for k, pk in enumerate(p):
            if pk:
                q[k] += pk * Fraction(k, s)
                if k < n:
                    q[k + 1] += pk * Fraction(s - k, s)
        p = q
    return p


def distinct_pmf_float(n: int, s_values: np.ndarray) -> np.ndarray:
    """The same chain in float64, vectorised over s: array [len(s), n + 1]."""
    s = np.asarray(s_values, dtype=float)[:, None]
    p = np.zeros((s.shape[0], n + 1))
    p[:, 0] = 1.0
    ks = np.arange(n + 1)
    for _ in range(n):
        stay = p * ks / s
        move = np.zeros_like(p)
        move[:, 1:] = p[:, :-1] * np.maximum(s - ks[:-1], 0) / s
        p = stay + move
    return p


def brute_force_interval(pmf_by_s, k: int, n_train: int, alpha) -> tuple[int, int, int]:
    """(s_hat, s_lower, s_upper) by scanning every s in [k, N] (SPEC.md conventions)."""
    s_range = range(k, n_train + 1)
    best = max(pmf_by_s[s][k] for s in s_range)
    s_hat = max(s for s in s_range if pmf_by_s[s][k] == best)  # ties toward larger s
    lower = [s for s in s_range if sum(pmf_by_s[s][k:]) > alpha]
    upper = [s for s in s_range if sum(pmf_by_s[s][: k + 1]) > alpha]
    if not lower:
        return n_train, n_train, n_train
    return s_hat, min(min(lower), s_hat), max(max(upper), s_hat)


# ----------------------------------------------------------------------------- Stirling numbers


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 30, 200, 1000])
def test_log_stirling2_exact_regime_matches_integers(n):
    ks = np.unique(np.r_[0:min(n + 2, 40), np.linspace(0, n + 1, 25).astype(int), n - 3 : n + 2].clip(0, n + 1))
    got = log_stirling2(n, ks)
    for k, value in zip(ks, got):
        exact = stirling2_exact(n, int(k))
        if exact == 0:
            assert value == -np.inf
        else:
            assert value == pytest.approx(math.log(exact), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("n", [1001, 1500, 2500])
def test_log_stirling2_temme_regime_within_temme_bound(n):
    ks = sorted({1, 2, 3, 4, n // 100, n // 10, n // 3, n // 2, (9 * n) // 10, n - 10, n - 3, n - 2, n - 1, n})
    got = log_stirling2(n, np.array(ks))
    for k, value in zip(ks, got):
        # Temme: relative error of S2 below 0.066 / n, so the log is off by less than that
        assert abs(value - math.log(stirling2_exact(n, k))) < 0.066 / n, k


def test_log_stirling2_temme_at_small_n_and_near_v_equal_1(monkeypatch):
    monkeypatch.setattr(stats, "EXACT_STIRLING_MAX_N", 0)  # force the asymptotic everywhere
    for n in (5, 10, 20, 60):
        for k in range(1, n + 1):
            exact = math.log(stirling2_exact(n, k))
            assert abs(log_stirling2(n, k) - exact) < 0.066 / n + 1e-12, (n, k)
    # v -> 1 at large n: k = n - 3 has a closed form through C(n, 4), C(n, 5), C(n, 6)
    n = 200_000
    exact = math.comb(n, 4) + 10 * math.comb(n, 5) + 15 * math.comb(n, 6)
    assert log_stirling2(n, n - 3) == pytest.approx(math.log(exact), abs=1e-6)


def test_log_stirling2_is_vectorised_and_scalar():
    assert isinstance(log_stirling2(10, 3), float)
    assert log_stirling2(10, [[1, 2], [3, 4]]).shape == (2, 2)
    assert log_stirling2(10, 11) == -np.inf


# ----------------------------------------------------------------------------- Eq. 5 and Eq. 2


@pytest.mark.parametrize("n,s", [(1, 1), (5, 3), (12, 12), (20, 7), (15, 40)])
def test_log_pmf_distinct_equals_exact_chain(n, s):
    exact = distinct_pmf_exact(n, s)
    got = log_pmf_distinct(np.arange(n + 1), n, s)
    for k in range(n + 1):
        if exact[k] == 0:
            assert got[k] == -np.inf
        else:
            assert got[k] == pytest.approx(math.log(exact[k]), abs=1e-11)


@pytest.mark.parametrize("n,s", [(800, 2000), (50_000, 1_000_000), (50_000, 60_000)])
def test_log_pmf_distinct_sums_to_one(n, s):
    log_p = log_pmf_distinct(np.arange(1, n + 1), n, s)
    tolerance = 1e-10 if n <= stats.EXACT_STIRLING_MAX_N else 0.066 / n
    assert abs(np.logaddexp.reduce(log_p)) < tolerance


@pytest.mark.parametrize("n,big_n", [(1, 1), (1, 2), (2, 2), (10, 7), (30, 30), (7, 50)])
def test_expected_irs_is_mean_of_exact_distribution(n, big_n):
    pmf = distinct_pmf_exact(n, big_n)
    mean = sum(k * p for k, p in enumerate(pmf)) / big_n
    assert expected_irs(n, big_n) == pytest.approx(float(mean), rel=1e-12)


def test_expected_irs_small_values():
    assert expected_irs(0, 10) == 0.0
    assert expected_irs(2, 2) == pytest.approx(0.75)
    assert expected_irs(10**6, 10**6) == pytest.approx(1 - math.exp(-1), rel=1e-6)


# ----------------------------------------------------------------------------- Eqs. 7-9 against brute force


GRID = [(1, 1), (1, 4), (2, 1), (3, 2), (4, 7), (10, 20), (25, 20), (60, 40), (12, 12), (8, 3)]


@pytest.mark.parametrize("n,big_n", GRID)
def test_irs_infinity_equals_exact_brute_force(n, big_n):
    alpha = Fraction(1, 20)
    pmf_by_s = {s: distinct_pmf_exact(n, s) for s in range(1, big_n + 1)}
    for k in range(1, min(n, big_n) + 1):
        result = irs_infinity(k, n, big_n, alpha_e=0.05)
        expected = brute_force_interval(pmf_by_s, k, big_n, alpha)
        assert (result.s_hat, result.s_lower, result.s_upper) == expected, (n, big_n, k)
        assert result.estimate == result.s_hat / big_n


@pytest.mark.parametrize("n,big_n", [(50, 90), (120, 300), (400, 250)])
def test_irs_infinity_asymptotic_regime_within_one_image(monkeypatch, n, big_n):
    """With Temme's formula forced on, estimates stay within +-1 image of the exact chain."""
    monkeypatch.setattr(stats, "EXACT_STIRLING_MAX_N", 0)
    pmf = distinct_pmf_float(n, np.arange(1, big_n + 1))
    pmf_by_s = {s: pmf[s - 1] for s in range(1, big_n + 1)}
    for k in sorted({1, 2, n // 4, n // 2, (3 * n) // 4, min(n, big_n) - 1, min(n, big_n)}):
        if not 1 <= k <= min(n, big_n):
            continue
        result = irs_infinity(k, n, big_n)
        expected = brute_force_interval(pmf_by_s, k, big_n, 0.05)
        got = (result.s_hat, result.s_lower, result.s_upper)
        assert all(abs(a - b) <= 1 for a, b in zip(got, expected)), (k, got, expected)


def test_rejection_threshold_equals_exact_quantile():
    for big_n, target, n in [(39, 1.0, 15), (32, 1.0, 15), (50, 0.5, 30), (20, 0.75, 40), (100, 0.9, 9)]:
        s_d = target * big_n
        assert s_d == int(s_d)
        pmf = distinct_pmf_exact(n, int(s_d))
        cdf = np.cumsum([float(p) for p in pmf])
        below = [k for k in range(n + 1) if cdf[k] < 0.05]
        assert rejection_threshold(big_n, target, n) == (max(below) if below else 0)


# ----------------------------------------------------------------------------- paper numbers (SPEC.md)


def test_imagenet_rejection_threshold():
    assert rejection_threshold(1_281_166, 0.8, 50_000, 0.05) == 48_744


def test_echonet_real_and_synthetic_and_adjusted():
    real = irs_infinity(1159, 1277, 7465, 0.05)
    synthetic = irs_infinity(692, 1277, 7465, 0.05)
    assert (round(100 * real.estimate, 2), round(100 * real.lower, 2), round(100 * real.upper, 2)) == (86.70, 75.20, 100.0)
    assert (round(100 * synthetic.estimate, 2), round(100 * synthetic.lower, 2), round(100 * synthetic.upper, 2)) == (
        12.36,
        11.86,
        12.94,
    )
    assert round(100 * adjusted_irs(synthetic, real), 1) == 14.3
    assert adjusted_irs(synthetic.estimate, real.estimate) == adjusted_irs(synthetic, real)


def test_appendix6_small_training_sets():
    # n = 15 samples of a model that produces only 10 distinct images
    assert 10 <= rejection_threshold(39, 1.0, 15)  # N = 39: rejected
    assert 10 > rejection_threshold(32, 1.0, 15)  # N = 32: not rejected


def test_imagenet_early_deterministic_rejection():
    test = SequentialRejectionTest(1_281_166, 0.8, 50_000, interim_alpha=0)
    assert test.k_min == test.k_final == 48_744
    # "more than 1,257 duplicates among the first 2,000 samples": rejected with no statistics
    assert test.decide(2000, 2000 - 1258) == ("reject", "deterministic")
    assert test.decide(2000, 2000 - 1200).verdict == "continue"
    assert test.decide(48_745, 48_745) == ("pass", "deterministic")
    assert test.decide(50_000, 48_744) == ("reject", "final")
    assert test.decide(50_000, 48_745) == ("pass", "final")


def test_target_on_adjusted_scale():
    # s_d = target * real * N: with real = 0.5 the threshold equals the one for target 0.4
    assert rejection_threshold(10_000, 0.8, 2000, real_irs=0.5) == rejection_threshold(10_000, 0.4, 2000)


# ----------------------------------------------------------------------------- properties


def test_interval_ordering_and_monotonicity():
    big_n, n = 5000, 800
    previous = None
    for k in range(1, n + 1, 17):
        r = irs_infinity(k, n, big_n)
        assert 0 < r.lower <= r.estimate <= r.upper <= 1
        if previous is not None:  # more distinct images -> more potential diversity
            assert r.estimate >= previous.estimate and r.lower >= previous.lower and r.upper >= previous.upper
        previous = r
    # the same k from more samples means less diversity
    estimates = [irs_infinity(300, n, big_n).estimate for n in (300, 400, 800, 1600, 3200)]
    assert estimates == sorted(estimates, reverse=True)
    # the interval narrows as the sample grows at a fixed true diversity
    widths = [irs_infinity(int(round(2000 * (1 - (1 - 1 / 2000) ** n))), n, big_n) for n in (200, 800, 3200)]
    assert [w.upper - w.lower for w in widths] == sorted([w.upper - w.lower for w in widths], reverse=True)


def test_rejection_threshold_monotone():
    by_target = [rejection_threshold(10_000, t, 3000) for t in (0.1, 0.3, 0.5, 0.8, 1.0)]
    assert by_target == sorted(by_target) and by_target[0] < by_target[-1]
    by_alpha = [rejection_threshold(10_000, 0.8, 3000, a) for a in (0.001, 0.01, 0.05, 0.2)]
    assert by_alpha == sorted(by_alpha) and by_alpha[0] < by_alpha[-1]
    by_n = [rejection_threshold(10_000, 0.8, n) for n in (100, 1000, 3000, 10_000)]
    assert by_n == sorted(by_n)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda: irs_infinity(6, 5, 10), "n_learned"),
        (lambda: irs_infinity(11, 20, 10), "n_learned"),
        (lambda: irs_infinity(-1, 5, 10), "n_learned"),
        (lambda: irs_infinity(2.5, 5, 10), "n_learned"),
        (lambda: irs_infinity(2, 5.5, 10), "n_samples"),
        (lambda: irs_infinity(2, 5, 0), "n_train"),
        (lambda: irs_infinity(2, 5, "10"), "n_train"),
        (lambda: irs_infinity(2, 5, 10, alpha_e=0), "alpha_e"),
        (lambda: irs_infinity(2, 5, 10, alpha_e=1), "alpha_e"),
        (lambda: irs_infinity(True, 5, 10), "n_learned"),
        (lambda: rejection_threshold(100, 0, 10), "target_irs"),
        (lambda: rejection_threshold(100, 1.01, 10), "target_irs"),
        (lambda: rejection_threshold(100, 0.5, 10, alpha_e=1.5), "alpha_e"),
        (lambda: rejection_threshold(100, 0.5, -3), "n_samples"),
        (lambda: rejection_threshold(100, 0.5, 10, real_irs=0), "real_irs"),
        (lambda: expected_irs(-1, 10), "n_samples"),
        (lambda: log_stirling2(5, [1, -2]), "k"),
        (lambda: log_stirling2(5, 1.5), "k"),
        (lambda: log_pmf_distinct(2, 5, 0.5), "s"),
        (lambda: adjusted_irs(0.5, 0.0), "real"),
        (lambda: adjusted_irs(1.5, 0.5), "synthetic"),
        (lambda: SequentialRejectionTest(100, 0.5, 0), "budget"),
        (lambda: SequentialRejectionTest(100, 0.5, 50, interim_alpha=0.05), "interim_alpha"),
        (lambda: SequentialRejectionTest(100, 0.5, 50).decide(10, 11), "n_learned"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_extreme_inputs_give_ordered_answers():
    """Edges that hang the published implementation return (pytest-timeout guards the run) with
    ordered bounds and the exact values at the extremes."""
    for k, n, big_n in [
        (1, 50_000, 1_281_166),
        (50_000, 50_000, 1_281_166),
        (1_281_166, 5_000_000, 1_281_166),
        (1, 1, 10**9),
        (10**6, 10**6, 10**9),
        (1, 10**7, 10**9),
        (999_999, 10**7, 10**6),
    ]:
        r = irs_infinity(k, n, big_n)
        assert r.lower <= r.estimate <= r.upper
    assert irs_infinity(1_281_166, 5_000_000, 1_281_166).estimate == 1.0
    assert irs_infinity(1, 50_000, 1_281_166).estimate == 1 / 1_281_166
    for target in (1e-6, 0.5, 1.0):
        rejection_threshold(1_281_166, target, 10**6)
    test = SequentialRejectionTest(1_281_166, 0.8, 10**5, pass_alpha=0.05)
    assert test.rejection_error <= test.alpha_e and test.pass_error <= test.pass_alpha
    assert test.k_final <= test.k_min == rejection_threshold(1_281_166, 0.8, 10**5)
    looks = range(0, 10**5 + 1, 2_500)
    rejects = [test.reject_threshold(m) for m in looks]
    assert rejects == sorted(rejects) and rejects[-1] == test.k_final
    assert rejects[0] == -1 and all(-1 <= r < m for r, m in zip(rejects[1:], looks[1:]))
    passes = [test.pass_threshold(m) for m in looks[:-1]]
    assert all(r < p for r, p in zip(rejects, passes))  # never both verdicts at one count
    assert SequentialRejectionTest(1_281_166, 0.8, 10**6, interim_alpha=0).k_final == rejection_threshold(1_281_166, 0.8, 10**6)


# ----------------------------------------------------------------------------- sequential decision
# (the exact error bounds of SequentialRejectionTest are in tests/test_sequential.py)


def test_interim_alpha_zero_gives_eq10_threshold():
    plain = rejection_threshold(10_000, 0.7, 2000)
    assert SequentialRejectionTest(10_000, 0.7, 2000, interim_alpha=0).k_final == plain
    with_interim = SequentialRejectionTest(10_000, 0.7, 2000)
    assert with_interim.k_min == plain and plain - 3 <= with_interim.k_final <= plain


# ----------------------------------------------------------------------------- import hygiene


def test_stats_and_cli_import_no_torch():
    code = (
        "import sys, irs_callbacks, irs_callbacks.stats, irs_callbacks.cli;"
        "irs_callbacks.cli.build_parser();"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _likelihood_argmax(k: int, n: int, big_n: int) -> int:
    """Eq. 7 by brute force: the s in [k, N] maximising P(K = k | n, s) = C(s, k) S(n, k) k! / s^n, i.e.
    s (s - 1) ... (s - k + 1) / s^n (the Stirling factor does not depend on s), compared exactly in
    integers over every s; ties toward the larger s."""
    best_s, best_num, best_den, falling = None, 0, 1, math.factorial(k)
    for s in range(k, big_n + 1):
        if s > k:
            falling = falling * s // (s - k)
        den = s ** n
        if falling * best_den >= best_num * den:
            best_s, best_num, best_den = s, falling, den
    return best_s


def test_ml_diversity_is_the_likelihood_maximum():
    from irs_callbacks.stats import ml_diversity

    cases = ((1, 1, 10), (5, 5, 40), (30, 50, 200), (17, 60, 90), (120, 121, 400), (200, 300, 200), (692, 1277, 7465))
    for k, n, big_n in cases:
        s_hat = _likelihood_argmax(k, n, big_n)
        assert ml_diversity(k, n, big_n) == irs_infinity(k, n, big_n).s_hat == s_hat, (k, n, big_n)
    # the paper's EchoNet-Dynamic example: IRS_inf = 12.36 %
    assert round(100 * ml_diversity(692, 1277, 7465) / 7465, 2) == 12.36
    with pytest.raises(ValueError, match="cannot exceed"):
        ml_diversity(6, 5, 40)


@pytest.mark.parametrize("argv, message", [
    ("threshold --n-train 100 --target 0.5 --n-samples 50 --alpha 0",
     "--alpha must be a number in the open interval (0, 1), got 0.0"),
    ("threshold --n-train 100 --target 1.5 --n-samples 50", "--target must be a number in (0, 1], got 1.5"),
    ("threshold --n-train 100 --target 0.5 --n-samples 50 --real-irs 2", "--real-irs must be a number in (0, 1]"),
    ("threshold --n-train 100 --target 0.5 --n-samples 50 --schedule 10 --interim-alpha 0.2",
     "--interim-alpha must be in [0, --alpha) = [0, 0.05), got 0.2"),
    ("threshold --n-train 100 --target 0.5 --n-samples 0 --schedule 10", "--n-samples must be an integer >= 1, got 0"),
    ("threshold --n-train 100 --target 0.5 --n-samples 50 --schedule 10 --pass-alpha 1", "--pass-alpha must be"),
    ("estimate --n-train 100 --n-samples 50 --n-learned 60", "--n-learned (60) cannot exceed --n-samples (50)"),
    ("estimate --n-train 100 --n-samples 50 --n-learned 20 --real-n-samples 10 --real-n-learned 20",
     "--real-n-learned (20) cannot exceed --real-n-samples (10)"),
])
def test_cli_statistics_errors_name_the_options(argv, message, capsys):
    """Errors of the statistics name the command-line option, not the Python argument (alpha_e, budget, ...)."""
    from irs_callbacks.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv.split())
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"error: {message}" in err and len(err.strip().splitlines()) == 1, err
    assert not any(name in err for name in ("alpha_e", "target_irs", "budget", "n_samples", "n_learned", "real_irs"))
