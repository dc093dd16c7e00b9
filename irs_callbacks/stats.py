"""Coupon-collector statistics of the Image Retrieval Score (IRS paper, Sec. 3.1-3.3, appendix 6).

Notation (``SPEC.md``): ``N`` = ``n_train`` training images, ``n`` = ``n_samples`` synthetic
samples, ``k`` = ``n_learned`` distinct training images retrieved by them, ``s`` = number of
training images the model can produce (its "potential diversity"). Under the urn model every one
of the ``s`` images is equally likely, and the number ``K`` of distinct images after ``n`` draws has

    P(K = k | n, s) = S2(n, k) * s! / ((s - k)! * s^n)                          (Eq. 5)

with S2 the Stirling numbers of the second kind. Everything here works in natural-log space, is
exact for ``n <= EXACT_STIRLING_MAX_N`` (Stirling recurrence) and uses Temme's uniform asymptotic
(Eq. 6) beyond, whose relative error is below 0.066/n. Fractions (``estimate``, ``lower``,
``upper``, ``target_irs``, ``real_irs``) are fractions of ``n_train``; counts are plain ints.

This module needs numpy and scipy.special only: importing it must not import torch.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
from scipy.special import gammaln

from irs_callbacks.validation import check_fraction, check_int, check_positive, check_probability

__all__ = [
    "EXACT_STIRLING_MAX_N",
    "expected_irs",
    "log_stirling2",
    "log_pmf_distinct",
    "IRSEstimate",
    "irs_infinity",
    "ml_diversity",
    "adjusted_irs",
    "rejection_threshold",
    "Decision",
    "SequentialRejectionTest",
]

#: Largest ``n`` for which log S2(n, k) comes from the exact recurrence (a cached table).
EXACT_STIRLING_MAX_N = 1000

# Half-width of the summation window around the mean of K, in standard deviations (+ a margin):
# the occupancy distribution has sub-Gaussian tails, so the mass left out is below 1e-40.
_WINDOW_SIGMAS = 15.0
_WINDOW_MARGIN = 25


# --------------------------------------------------------------------------- Eq. 2


def expected_irs(n_samples, n_train) -> float:
    """Ideal IRS_alpha after ``n_samples`` draws when all ``n_train`` images are equally likely.

    Eq. 2: ``1 - (1 - 1/N)^n``, a fraction of ``n_train``.
    """
    n = check_int(n_samples, "n_samples")
    big_n = check_int(n_train, "n_train", 1)
    return float(-math.expm1(n * math.log1p(-1.0 / big_n))) if big_n > 1 else float(n > 0)


# --------------------------------------------------------------------------- Stirling numbers


_exact_rows: list[np.ndarray] = [np.zeros(1)]  # row n holds log S2(n, k) for k = 0..n


def _exact_log_stirling2_row(n: int) -> np.ndarray:
    """log S2(n, k), k = 0..n, from the recurrence S2(n, k) = k S2(n-1, k) + S2(n-1, k-1)."""
    while len(_exact_rows) <= n:
        m = len(_exact_rows)
        prev = _exact_rows[-1]
        row = np.full(m + 1, -np.inf)
        ks = np.arange(1, m)
        row[1:m] = np.logaddexp(np.log(ks) + prev[1:m], prev[0 : m - 1])
        row[m] = 0.0
        _exact_rows.append(row)
    return _exact_rows[n]


def _solve_temme_y(t: np.ndarray) -> np.ndarray:
    """y = 1 - G where G in (0, 1) solves G = v exp(G - v), v = 1 + t > 1 (Temme's saddle point).

    Equivalently G - ln G = v - ln v. Near v = 1 we solve for y (a series start, then Newton on
    h(y) = -y - ln(1 - y) = t - ln(1 + t)); for larger v for u = ln G (Newton on e^u - u = v - ln v,
    monotone from u = -(v - ln v)). Both avoid the cancellation of the branch point at v = 1.
    """
    y = np.empty_like(t)
    near = t < 0.75
    if near.any():
        tn = t[near]
        # c1 = t - ln(1 + t), by its series where the subtraction would cancel
        c1 = np.where(
            tn < 1e-2,
            tn**2 / 2 - tn**3 / 3 + tn**4 / 4 - tn**5 / 5 + tn**6 / 6 - tn**7 / 7,
            tn - np.log1p(tn),
        )
        yn = tn - 2 / 3 * tn**2 + 4 / 9 * tn**3 - 44 / 135 * tn**4  # series of 1 - G in t
        for _ in range(6):
            h = np.where(
                yn < 1e-2,
                yn**2 / 2 + yn**3 / 3 + yn**4 / 4 + yn**5 / 5 + yn**6 / 6 + yn**7 / 7,
                -yn - np.log1p(-yn),
            )
            yn = yn - (h - c1) * (1.0 - yn) / yn
            yn = np.clip(yn, np.finfo(float).tiny, 1.0 - 1e-16)
        y[near] = yn
    far = ~near
    if far.any():
        v = 1.0 + t[far]
        c = v - np.log(v)
        u = -c
        for _ in range(8):
            u = u - (np.exp(u) - u - c) / (np.exp(u) - 1.0)
        y[far] = -np.expm1(u)
    return y


def _log_binomial(n: int, k: np.ndarray) -> np.ndarray:
    return gammaln(n + 1.0) - gammaln(k + 1.0) - gammaln(n - k + 1.0)


def _temme_log_stirling2(n: int, k: np.ndarray) -> np.ndarray:
    """Temme's asymptotic (Eq. 6) in log space for 1 <= k <= n, exact at k in {1, 2, n-1, n}."""
    k = k.astype(float)
    out = np.empty_like(k)
    interior = (k >= 3) & (k <= n - 2)
    if interior.any():
        ki = k[interior]
        t = (n - ki) / ki  # v - 1 with v = n / k
        y = _solve_temme_y(t)  # 1 - G
        out[interior] = (
            0.5 * (np.log(t) - np.log1p(t) - np.log(y))  # sqrt((v - 1) / (v (1 - G)))
            + (n - ki) * (np.log(t) - np.log(t + y))  # ((v - 1) / (v - G))^(n - k)
            + n * np.log(ki)
            - ki * math.log(n)  # k^n / n^k
            + ki * y  # e^(k (1 - G))
            + _log_binomial(n, ki)
        )
    out[(k == 1) | (k == n)] = 0.0
    two = (k == 2) & (n > 2)
    out[two] = (n - 1) * math.log(2.0) + math.log1p(-(2.0 ** -(n - 1)))  # 2^(n-1) - 1
    below = (k == n - 1) & (n > 2)
    out[below] = math.log(n * (n - 1) / 2)  # C(n, 2)
    return out


def log_stirling2(n, k):
    """Natural log of the Stirling number of the second kind S2(n, k), vectorised over ``k``.

    Exact (recurrence) for ``n <= EXACT_STIRLING_MAX_N``, Temme's asymptotic (Eq. 6) beyond, with
    the closed forms at k = 1, 2, n - 1, n. Returns ``-inf`` where S2(n, k) = 0 (k > n, or k = 0 < n);
    a float for a scalar ``k``, else an array of ``k``'s shape.
    """
    n = check_int(n, "n")
    k_arr = np.asarray(k)
    if k_arr.size and (k_arr.dtype.kind not in "iu" and not np.all(np.mod(k_arr, 1) == 0)):
        raise ValueError(f"k must hold non-negative integers, got {k!r}")
    k_arr = k_arr.astype(np.int64)
    if k_arr.size and k_arr.min() < 0:
        raise ValueError(f"k must hold non-negative integers, got minimum {k_arr.min()}")
    out = np.full(k_arr.shape, -np.inf)
    valid = (k_arr <= n) & ((k_arr >= 1) | (n == 0))
    if n <= EXACT_STIRLING_MAX_N:
        out[valid] = _exact_log_stirling2_row(n)[k_arr[valid]]
    else:
        out[valid] = _temme_log_stirling2(n, k_arr[valid])
    return float(out) if np.ndim(k) == 0 else out


class _LogStirlingSegment:
    """log S2(n, k) over a contiguous, growing range of k, computed only once per k."""

    def __init__(self, n: int):
        self.n = n
        self.lo = self.hi = 0  # cached range [lo, hi)
        self.values = np.empty(0)

    def get(self, lo: int, hi: int) -> np.ndarray:
        """log S2(n, k) for k in [lo, hi)."""
        if hi <= lo:
            return np.empty(0)
        if self.hi <= self.lo:
            self.lo, self.hi = lo, hi
            self.values = log_stirling2(self.n, np.arange(lo, hi))
        else:
            if lo < self.lo:
                self.values = np.concatenate([log_stirling2(self.n, np.arange(lo, self.lo)), self.values])
                self.lo = lo
            if hi > self.hi:
                self.values = np.concatenate([self.values, log_stirling2(self.n, np.arange(self.hi, hi))])
                self.hi = hi
        return self.values[lo - self.lo : hi - self.lo]


# --------------------------------------------------------------------------- Eq. 5


def _log_falling(s, k):
    """log(s! / (s - k)!) for real s >= 0; -inf where the falling factorial vanishes (k > s)."""
    s = np.asarray(s, dtype=float)
    k = np.asarray(k, dtype=float)
    arg = s - k + 1.0
    with np.errstate(invalid="ignore"):
        out = gammaln(s + 1.0) - gammaln(np.where(arg > 0, arg, 1.0))
    return np.where(arg > 0, out, -np.inf)


def log_pmf_distinct(k, n_samples, s):
    """log P(K = k | n, s), Eq. 5: ``k`` distinct values after ``n_samples`` uniform draws from ``s``.

    Vectorised over ``k`` and ``s`` (broadcast together). ``s`` may be real (>= 1): the falling
    factorial is taken through the gamma function. Returns ``-inf`` for impossible ``k``.
    """
    n = check_int(n_samples, "n_samples")
    s_arr = np.asarray(s, dtype=float)
    if s_arr.size and (not np.all(np.isfinite(s_arr)) or s_arr.min() < 1):
        raise ValueError(f"s must be >= 1, got {s!r}")
    log_s2 = log_stirling2(n, k)
    with np.errstate(invalid="ignore"):
        out = log_s2 + _log_falling(s_arr, np.asarray(k, dtype=float)) - n * np.log(s_arr)
    out = np.where(np.isfinite(log_s2), out, -np.inf)
    return float(out) if np.ndim(out) == 0 else out


def _mean_sd_distinct(n: int, s: float) -> tuple[float, float]:
    """Mean and standard deviation of K after n uniform draws from s values."""
    a = math.exp(n * math.log1p(-1.0 / s)) if s > 1 else 0.0  # (1 - 1/s)^n
    b = math.exp(n * math.log1p(-2.0 / s)) if s > 2 else 0.0  # (1 - 2/s)^n
    mean = s * -math.expm1(n * math.log1p(-1.0 / s)) if s > 1 else 1.0
    var = s * (s - 1) * b + s * a - (s * a) ** 2
    return mean, math.sqrt(max(var, 0.0))


class _Occupancy:
    """Tail probabilities of K for one sample size ``n``, for any s, sharing one Stirling segment."""

    def __init__(self, n: int):
        self.n = n
        self.stirling = _LogStirlingSegment(n)

    def _window(self, s: float) -> tuple[int, int]:
        mean, sd = _mean_sd_distinct(self.n, s)
        half = _WINDOW_SIGMAS * sd + _WINDOW_MARGIN
        top = min(self.n, math.floor(s) + 1 if s != math.floor(s) else int(s))
        return max(1, math.floor(mean - half)), min(top, math.ceil(mean + half))

    def log_pmf(self, lo: int, hi: int, s: float) -> np.ndarray:
        """log P(K = k | n, s) for k in [lo, hi]."""
        ks = np.arange(lo, hi + 1, dtype=float)
        return self.stirling.get(lo, hi + 1) + _log_falling(s, ks) - self.n * math.log(s)

    def log_sf(self, k: int, s: float) -> float:
        """log P(K >= k | n, s)."""
        lo, hi = self._window(s)
        lo = max(lo, k)
        if lo > hi:
            return -np.inf if k > hi else 0.0
        return float(np.logaddexp.reduce(self.log_pmf(lo, hi, s)))

    def log_cdf(self, k: int, s: float) -> float:
        """log P(K <= k | n, s)."""
        lo, hi = self._window(s)
        hi = min(hi, k)
        if lo > hi:
            return -np.inf if k < lo else 0.0
        return float(np.logaddexp.reduce(self.log_pmf(lo, hi, s)))

    def quantile_below(self, s: float, alpha: float) -> int:
        """Largest k with P(K <= k | n, s) < alpha (0 if there is none)."""
        lo, hi = self._window(s)
        log_cdf = np.logaddexp.accumulate(self.log_pmf(lo, hi, s))
        below = np.flatnonzero(log_cdf < math.log(alpha))
        return lo + int(below[-1]) if below.size else 0


# --------------------------------------------------------------------------- Eqs. 7-9


@dataclass(frozen=True)
class IRSEstimate:
    """IRS_inf (Eq. 7) with its confidence interval (Eqs. 8-9, SPEC.md conventions).

    ``estimate``, ``lower`` and ``upper`` are fractions of ``n_train``; ``s_hat``, ``s_lower`` and
    ``s_upper`` the same as image counts. The interval bounds are each one-sided at ``alpha_e``.
    """

    estimate: float
    lower: float
    upper: float
    s_hat: int
    s_lower: int
    s_upper: int
    n_learned: int
    n_samples: int
    n_train: int
    alpha_e: float

    @property
    def irs_alpha(self) -> float:
        """IRS_alpha = n_learned / n_train (Eq. 4), at alpha = n_samples / n_train."""
        return self.n_learned / self.n_train

    def as_dict(self) -> dict:
        return {**asdict(self), "irs_alpha": self.irs_alpha}

    def __str__(self) -> str:
        return f"{self.estimate:.2%} [{self.lower:.2%}, {self.upper:.2%}]"


def _first_true(predicate, lo: int, hi: int) -> int:
    """Smallest integer x in [lo, hi] with predicate(x), for a predicate monotone False -> True;
    hi + 1 if there is none."""
    if not predicate(hi):
        return hi + 1
    while lo < hi:
        mid = (lo + hi) // 2
        if predicate(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _ml_diversity(k: int, n: int, big_n: int) -> int:
    """s_hat of Eq. 7 for validated k <= n, k <= N (ties toward the larger s)."""
    # MLE: log P(s + 1) - log P(s) = -ln(1 - k/(s+1)) - n ln(1 + 1/s) decreases in s.
    if k == n or k == big_n:
        return big_n  # k = n: P(s) = prod_{i<n} (1 - i/s) increases in s; k = N: s = N is all there is
    return _first_true(lambda s: -math.log1p(-k / (s + 1)) - n * math.log1p(1.0 / s) < 0, k, big_n - 1)


def ml_diversity(n_learned, n_samples, n_train) -> int:
    """The maximum-likelihood potential diversity s_hat of Eq. 7 alone (an image count; IRS_inf =
    s_hat / n_train), without the bounds: what :func:`irs_infinity` returns as ``s_hat``, at a
    fraction of its cost (a bisection over s)."""
    n = check_int(n_samples, "n_samples", 1)
    big_n = check_int(n_train, "n_train", 1)
    k = check_int(n_learned, "n_learned", 1)
    if k > n or k > big_n:
        raise ValueError(f"n_learned ({k}) cannot exceed n_samples ({n}) or n_train ({big_n})")
    return _ml_diversity(k, n, big_n)


def irs_infinity(n_learned, n_samples, n_train, alpha_e=0.05) -> IRSEstimate:
    """Maximum-likelihood potential diversity IRS_inf with its confidence interval.

    Estimate (Eq. 7): ``argmax_{s in [k, N]} P(K = k | n, s) / N``, ties toward the larger s (the
    likelihood is flat only for k = n = 1). Lower bound: the smallest s with
    ``P(K >= k | n, s) > alpha_e``; upper bound: the largest s <= N with ``P(K <= k | n, s) > alpha_e``
    (SPEC.md). If even s = N makes k implausibly large, all three are N.
    """
    n = check_int(n_samples, "n_samples", 1)
    big_n = check_int(n_train, "n_train", 1)
    k = check_int(n_learned, "n_learned", 1)
    alpha = check_probability(alpha_e, "alpha_e")
    if k > n:
        raise ValueError(f"n_learned ({k}) cannot exceed n_samples ({n})")
    if k > big_n:
        raise ValueError(f"n_learned ({k}) cannot exceed n_train ({big_n})")

    s_hat = _ml_diversity(k, n, big_n)
    occupancy = _Occupancy(n)
    log_alpha = math.log(alpha)
    # P(K >= k | s) grows with s: first s where it exceeds alpha.
    s_lower = _first_true(lambda s: occupancy.log_sf(k, s) > log_alpha, k, big_n)
    if s_lower > big_n:  # k too large even for s = N (more distinct images than chance allows)
        s_lower = s_hat = s_upper = big_n
    else:
        # P(K <= k | s) falls with s: last s where it still exceeds alpha (s = k always does).
        s_upper = _first_true(lambda s: occupancy.log_cdf(k, s) <= log_alpha, k, big_n) - 1
    # The interval contains the MLE except for discreteness at the edges; keep the order.
    s_lower, s_upper = min(s_lower, s_hat), max(s_upper, s_hat)
    return IRSEstimate(
        estimate=s_hat / big_n,
        lower=s_lower / big_n,
        upper=s_upper / big_n,
        s_hat=s_hat,
        s_lower=s_lower,
        s_upper=s_upper,
        n_learned=k,
        n_samples=n,
        n_train=big_n,
        alpha_e=alpha,
    )


def adjusted_irs(synthetic, real) -> float:
    """IRS_inf,a = IRS_inf(synthetic) / IRS_inf(real) (Sec. 3.4); may exceed 1.

    Each argument is an :class:`IRSEstimate` or a fraction of n_train. ``real`` is the same
    measurement for held-out real images against the training set (same extractor and distance).
    """

    def value(x, name):
        x = x.estimate if isinstance(x, IRSEstimate) else x
        if isinstance(x, bool) or not isinstance(x, numbers.Real) or not 0.0 <= float(x) <= 1.0:
            raise ValueError(f"{name} must be an IRSEstimate or a fraction in [0, 1], got {x!r}")
        return float(x)

    syn, ref = value(synthetic, "synthetic"), value(real, "real")
    if ref == 0.0:
        raise ValueError("real must be > 0: the real-data reference retrieved nothing")
    return syn / ref


# --------------------------------------------------------------------------- Eq. 10


def _target_diversity(n_train, target_irs, real_irs) -> tuple[int, float]:
    """(N, s_d) with s_d = target_irs * real_irs * N (SPEC.md: the target is relative to real data)."""
    big_n = check_int(n_train, "n_train", 1)
    target = check_fraction(target_irs, "target_irs")
    scale = 1.0 if real_irs is None else check_fraction(real_irs, "real_irs")
    s_d = target * scale * big_n
    if s_d < 1:
        raise ValueError(
            f"target_irs * real_irs * n_train must be >= 1 image, got {s_d:.3g}"
            f" (target_irs={target}, real_irs={real_irs}, n_train={big_n})"
        )
    return big_n, s_d


def rejection_threshold(n_train, target_irs, n_samples, alpha_e=0.05, *, real_irs=None) -> int:
    """k_min of Eq. 10: the largest k with ``P(K <= k | n, s_d) < alpha_e``, s_d = target * N.

    A checkpoint is rejected iff ``n_learned <= k_min``; a model that truly produces ``s_d``
    images is then wrongly rejected with probability below ``alpha_e``. With ``real_irs`` (the
    IRS_inf of held-out real data) the target is on the adjusted scale: s_d = target * real * N.
    Returns 0 when no count is rare enough at this budget (nothing can be rejected).
    """
    _, s_d = _target_diversity(n_train, target_irs, real_irs)
    n = check_int(n_samples, "n_samples", 1)
    alpha = check_probability(alpha_e, "alpha_e")
    return _Occupancy(n).quantile_below(s_d, alpha)


# --------------------------------------------------------------------------- sequential decision

#: A state of the occupancy chain whose probability falls below this is dropped from the
#: boundary computation; its mass is counted as error spent, so every bound stays a bound.
_NEGLIGIBLE = 1e-30
#: Relative margin kept below every error allowance: far above the float64 rounding of the chain
#: (about budget * 1e-16) and the dropped mass (about budget * 1e-30).
_SAFETY = 1e-9


def _chain_rates(s: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """P(repeat) = k / s and P(new image) = (s - k) / s for k = 0..size-1 distinct images so far.

    The exact occupancy chain K_{m+1} = K_m + Bernoulli((s - K_m) / s); for a non-integer s the
    chain stops at floor(s) + 1, where Eq. 5 (falling factorial through the gamma function) also
    puts its last mass, so the two agree for every real s >= 1."""
    k = np.arange(size, dtype=float)
    repeat = np.minimum(k / s, 1.0)
    return repeat, 1.0 - repeat


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


class _Chain:
    """Sub-probabilities P(K_m = k, not yet stopped) of the occupancy chain, on a window [lo, hi]
    of one buffer indexed by k (zero outside the window), advanced one draw at a time in place."""

    def __init__(self, s: float, budget: int):
        self.repeat, self.new = _chain_rates(s, budget + 2)
        self.p = np.zeros(budget + 2)
        self.p[0] = 1.0
        self.tmp = np.empty(budget + 2)
        self.lo = self.hi = 0

    def advance(self) -> None:
        lo, hi, p = self.lo, self.hi, self.p
        moved = np.multiply(p[lo : hi + 1], self.new[lo : hi + 1], out=self.tmp[: hi + 1 - lo])
        p[lo : hi + 1] *= self.repeat[lo : hi + 1]
        p[lo + 1 : hi + 2] += moved
        self.hi = hi + 1


@functools.lru_cache(maxsize=16)
def _rejection_boundary(s: float, budget: int, alpha: float, interim_alpha: float, exponent: float):
    """Rejection thresholds at every sample count, from the exact occupancy chain under s.

    Returns ``(c, error)``: reject after m draws iff K_m <= c[m]; c[budget] is the final threshold.
    c[m] for m < budget is the largest threshold with P(K_j <= c[j] for some j <= m) <=
    interim_alpha * (m / budget)^exponent; c[budget] the largest with the same probability over all
    j <= budget below alpha (the error left). ``error`` is that probability: the largest chance of a
    rejection under s over all schedules of looks.
    """
    fraction = np.arange(budget + 1, dtype=float) / budget
    allowance = interim_alpha * fraction**exponent * (1.0 - _SAFETY)
    allowance[budget] = alpha * (1.0 - _SAFETY)
    allowance = allowance.tolist()
    c = np.empty(budget + 1, dtype=np.int64)
    c[0] = -1
    chain, spent = _Chain(s, budget), 0.0
    p = chain.p
    for m in range(1, budget + 1):
        chain.advance()
        lo, hi = chain.lo, chain.hi
        while hi > lo and p[hi] < _NEGLIGIBLE:  # drop the negligible top (too few repeats), as spent
            spent += p[hi]
            p[hi] = 0.0
            hi -= 1
        limit = allowance[m]  # raise the boundary while the crossing probability allows
        while lo < hi and spent + p[lo] <= limit:
            spent += p[lo]
            p[lo] = 0.0
            lo += 1
        chain.lo, chain.hi = lo, hi
        c[m] = lo - 1
    return _read_only(c), float(spent)


@functools.lru_cache(maxsize=16)
def _pass_boundary(s: float, budget: int, pass_alpha: float, exponent: float):
    """Early-pass thresholds at every sample count, from the exact occupancy chain under s.

    Returns ``(v, error)``: pass after m < budget draws iff K_m >= v[m] (v[m] = m + 1: no pass
    possible), the smallest thresholds with P(K_j >= v[j] for some j <= m) <= pass_alpha *
    (m / budget)^exponent. ``error`` is that probability over all j < budget.
    """
    fraction = np.arange(budget + 1, dtype=float) / budget
    allowance = (pass_alpha * fraction**exponent * (1.0 - _SAFETY)).tolist()
    v = np.empty(budget + 1, dtype=np.int64)
    v[0], v[budget] = 1, budget + 1
    chain, spent = _Chain(s, budget), 0.0
    p = chain.p
    for m in range(1, budget):
        chain.advance()
        lo, hi = chain.lo, chain.hi
        while hi > lo and p[lo] < _NEGLIGIBLE:  # drop the negligible bottom (too many repeats), as spent
            spent += p[lo]
            p[lo] = 0.0
            lo += 1
        limit = allowance[m]  # lower the boundary while the crossing probability allows
        while hi > lo and spent + p[hi] <= limit:
            spent += p[hi]
            p[hi] = 0.0
            hi -= 1
        chain.lo, chain.hi = lo, hi
        v[m] = hi + 1
    return _read_only(v), float(spent)


class Decision(NamedTuple):
    """Outcome of one look: ``verdict`` is "reject", "pass" or "continue"; ``rule`` says which rule
    decided (see :class:`SequentialRejectionTest`): "deterministic", "interim", "early_pass",
    "final", or None while the verdict is "continue"."""

    verdict: str
    rule: str | None


class SequentialRejectionTest:
    """Reject / pass / continue after every batch while a budget of samples is drawn (Eq. 10).

    Built once per configuration, before any sampling; :meth:`decide` is then a table look-up that
    keeps no state, so every process of a multi-process run, given the same cumulative counts,
    takes the same decision, and batches may have any sizes. H0: the model produces
    ``s_d = target_irs * real_irs * N`` images uniformly; after m samples (invalid ones included)
    K_m = N_learned. Rules, in the order they are checked, with the label recorded as ``rule``:

    - ``"final"`` (m >= budget): reject iff ``K <= k_final``.
    - ``"deterministic"`` (SPEC.md, no error of its own): N_learned grows by at most the samples
      still to draw, so ``K + (budget - m) <= k_final`` already fixes "reject", and
      ``K > k_final`` fixes "pass" (no threshold ever exceeds k_final).
    - ``"interim"`` (statistical early rejection): ``K <= reject_threshold(m)``.
    - ``"early_pass"`` (only with ``pass_alpha``): ``K >= pass_threshold(m)``.

    Thresholds exist at *every* sample count m = 1..budget and are fixed in advance by an exact
    computation over the occupancy chain K_{m+1} = K_m + Bernoulli((s_d - K_m) / s_d) (real s_d
    allowed): the interim threshold at m is the largest c(m) such that the chance under H0 that
    K_j <= c(j) at *some* j <= m is at most ``interim_alpha * t ** spending_exponent`` (the
    error-spending function of the information fraction t = m / budget, fixed before sampling;
    linear by default); ``k_final`` is the
    largest threshold that keeps that chance over all j <= budget below ``alpha_e``: the last look
    uses the error left (capped at the plain Eq. 10 ``k_min``).

    Guarantee. A rejection at any look m, deterministic ones included, needs K_j <= c(j) for some
    j <= budget (a deterministic rejection implies K_budget <= k_final; a look past the budget
    implies it too, since K only grows). So, whatever the looks (any batch sizes, uneven, any
    number of processes, even chosen from the data), ``P(reject | s = s_d) <= rejection_error <
    alpha_e``; and since a larger s gives pathwise fewer repeats (couple the chains by one uniform
    per draw), P(reject | s) is smaller still for s > s_d. Likewise the early-pass boundary keeps
    ``P(K_j >= v(j) for some j < budget | s_d) = pass_error <= pass_alpha`` (spending
    ``pass_alpha * t ** pass_spending_exponent``), hence ``P(early pass | s <= s_d) <= pass_alpha``.
    The two boundaries
    are computed separately, each over all paths, so neither bound depends on which looks are
    taken. The price of needing no state: the bound is attained by a look after every sample;
    coarser schedules reject less often than that under H0 (0.045 instead of 0.048 with batches of
    5,000 at ImageNet scale). Building the table is one pass over the chain (about 3 us per sample
    of the budget: 0.2 s for 50,000 at ImageNet scale, cached per configuration); ``decide`` is a
    look-up (about 1 us).

    Choices, from exact operating characteristics (the same chain under the alternative; printed by
    ``benchmarks/bench_sequential.py --spending-study``), at ImageNet scale (N = 1,281,166, budget
    50,000, target 0.8) and at the digits scale (N = 1,797, budget 600, batches of 100):

    - ``interim_alpha = alpha_e / 5``: at the digits scale Eq. 10 leaves only 0.001 of alpha_e
      unused (P(K <= 477) = 0.049), so any interim error lowers the final threshold by one (power
      at coverage 0.7: 0.459 instead of 0.507); up to 0.4 alpha_e it stays one step, 0.5 alpha_e
      costs two (0.415). At ImageNet scale k_final is 48,742 instead of 48,744 (final power
      unchanged, 0.999).
    - linear spending (Pocock-like in information time) rather than t^1.5, t^2, t^3 (O'Brien-
      Fleming-like): with batches of 5,000, P(reject at the first look | coverage 0.3) = 0.80,
      0.75, 0.69, 0.55 and P(reject by 20,000 | coverage 0.6) = 0.84, 0.84, 0.82, 0.77; the final
      threshold moves by at most one.
    - early pass off by default (``pass_alpha=None``). A wrong early pass only keeps a checkpoint,
      the safe side for deletion, but a passed checkpoint's IRS_inf then rests on part of the
      budget (about half at coverage 0.95, less for better models), and that score is what users
      compare: the best checkpoint, ``top_k`` pruning, the TensorBoard curve. Turn it on
      (``pass_alpha=0.05``) to save sampling on checkpoints that are clearly diverse enough. Its
      spending is t^2: P(pass by 25,000 | coverage 0.95, batches of 5,000) = 0.54 against 0.57,
      0.56 and 0.46 for t, t^1.5 and t^3 (by 30,000: 0.80 against 0.79, 0.80, 0.76), while passes
      before a fifth of the budget stay rare (at most pass_alpha / 25; by 10,000 at coverage 0.95:
      0.008 against 0.022 for t), so a passed score rarely rests on few samples.

    Attributes: ``k_min`` (plain Eq. 10 at alpha_e: 48,744 in the paper's example, for display),
    ``k_final`` (the final threshold used, <= k_min; equal to it with ``interim_alpha=0``), ``s_d``,
    ``budget``, ``alpha_e``, ``interim_alpha``, ``pass_alpha``, ``rejection_error`` and
    ``pass_error`` (the exact worst cases over schedules, computed with the thresholds).
    """

    def __init__(
        self,
        n_train,
        target_irs,
        budget,
        alpha_e=0.05,
        *,
        real_irs=None,
        interim_alpha=None,
        pass_alpha=None,
        spending_exponent: float = 1.0,
        pass_spending_exponent: float = 2.0,
    ):
        self.n_train, self.s_d = _target_diversity(n_train, target_irs, real_irs)
        self.target_irs = float(target_irs)
        self.real_irs = None if real_irs is None else float(real_irs)
        self.budget = check_int(budget, "budget", 1)
        self.alpha_e = check_probability(alpha_e, "alpha_e")
        self.interim_alpha = self.alpha_e / 5 if interim_alpha is None else float(interim_alpha)
        if not 0.0 <= self.interim_alpha < self.alpha_e:
            raise ValueError(f"interim_alpha must be in [0, alpha_e) = [0, {self.alpha_e}), got {interim_alpha!r}")
        self.pass_alpha = None if pass_alpha is None else check_probability(pass_alpha, "pass_alpha")
        self.spending_exponent = check_positive(spending_exponent, "spending_exponent")
        self.pass_spending_exponent = check_positive(pass_spending_exponent, "pass_spending_exponent")

        #: plain Eq. 10 at alpha_e (what ``rejection_threshold`` and ``irs threshold`` print)
        self.k_min = _Occupancy(self.budget).quantile_below(self.s_d, self.alpha_e)
        if self.interim_alpha > 0:
            boundary, self.rejection_error = _rejection_boundary(
                self.s_d, self.budget, self.alpha_e, self.interim_alpha, self.spending_exponent
            )
            self.k_final = min(int(boundary[self.budget]), self.k_min)
            self._reject = _read_only(np.minimum(boundary, self.k_final))
        else:
            self.k_final = self.k_min
            self._reject = None
            tail = _Occupancy(self.budget).log_cdf(self.k_final, self.s_d) if self.k_final else -math.inf
            self.rejection_error = math.exp(tail)
        if self.pass_alpha is not None:
            self._pass, self.pass_error = _pass_boundary(
                self.s_d, self.budget, self.pass_alpha, self.pass_spending_exponent
            )
        else:
            self._pass, self.pass_error = None, 0.0

    @staticmethod
    def clear_cache() -> None:
        """Forget the threshold tables kept for the 16 latest configurations (instances with an equal
        configuration share one table); the next construction computes its table again."""
        _rejection_boundary.cache_clear()
        _pass_boundary.cache_clear()

    def reject_threshold(self, n_drawn) -> int:
        """Reject after ``n_drawn`` samples iff N_learned <= this (every rule; -1: nothing yet)."""
        m = check_int(n_drawn, "n_drawn")
        if m >= self.budget:
            return self.k_final
        deterministic = self.k_final - (self.budget - m)
        interim = -1 if self._reject is None else int(self._reject[m])
        return max(deterministic, interim, -1)

    def pass_threshold(self, n_drawn) -> int | None:
        """Early pass after ``n_drawn`` < budget samples iff N_learned >= this (None: no early pass
        configured, or at/after the budget, where the final rule decides). Values above n_drawn
        mean no early pass is possible yet; N_learned > k_final passes deterministically anyway."""
        m = check_int(n_drawn, "n_drawn")
        if self._pass is None or m >= self.budget:
            return None
        return int(self._pass[m])

    def decide(self, n_drawn, n_learned) -> Decision:
        """Verdict after ``n_drawn`` samples (invalid ones included) with ``n_learned`` retrieved.

        Cumulative counts; no state is kept, so looks may come at any sample counts."""
        m = check_int(n_drawn, "n_drawn")
        k = check_int(n_learned, "n_learned")
        if k > m:
            raise ValueError(f"n_learned ({k}) cannot exceed n_drawn ({m})")
        if m >= self.budget:
            return Decision("reject", "final") if k <= self.k_final else Decision("pass", "final")
        if k + (self.budget - m) <= self.k_final:
            return Decision("reject", "deterministic")
        if self._reject is not None and k <= self._reject[m]:
            return Decision("reject", "interim")
        if k > self.k_final:
            return Decision("pass", "deterministic")
        if self._pass is not None and k >= self._pass[m]:
            return Decision("pass", "early_pass")
        return Decision("continue", None)

    def __repr__(self) -> str:
        return (
            f"SequentialRejectionTest(n_train={self.n_train}, s_d={self.s_d:.1f}, budget={self.budget}, "
            f"alpha_e={self.alpha_e}, interim_alpha={self.interim_alpha}, pass_alpha={self.pass_alpha}, "
            f"k_min={self.k_min}, k_final={self.k_final})"
        )


