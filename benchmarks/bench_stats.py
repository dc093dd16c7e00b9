"""Speed of irs_callbacks.stats against the published approach, at ImageNet scale.

Baseline (written here from the IRS paper's description, Sec. 3.2-3.3 and appendix 10): one
scalar Temme evaluation per pmf call with a root finder (brentq) for G, log-factorial tables,
memoised Stirling values ("memorization techniques"), tail sums term by term, and bisection
over s for the MLE and both bounds. k_min walks the CDF k by k.

Cases: N = 1,281,166, n = 50,000, k = 45,000 (irs_infinity with both bounds) and the k_min
example (target 0.8, alpha 0.05). "cold" = imports + first call in a fresh interpreter; "warm"
= best of several repeats in this process. Also the whole `irs threshold` command, interpreter
start included. Usage: python benchmarks/bench_stats.py [--repeats 5] [--skip-baseline-estimate]
"""

from __future__ import annotations

import argparse
import functools
import math
import subprocess
import sys
import time

import numpy as np
from scipy.optimize import brentq

N_TRAIN, N_SAMPLES, N_LEARNED, TARGET, ALPHA = 1_281_166, 50_000, 45_000, 0.8, 0.05


# ----------------------------------------------------------------------------- baseline


class PaperBaseline:
    def __init__(self, n_train: int):
        self.log_factorial = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n_train + 1)))])

    @functools.lru_cache(maxsize=None)
    def log_stirling2(self, n: int, k: int) -> float:
        if k == n or k == 1:
            return 0.0
        v = n / k
        f = lambda g: g - v * math.exp(g - v)  # noqa: E731
        g = 0.0 if f(1e-300) >= 0 else brentq(f, 1e-300, 1 - 1e-15)  # G underflows for large v
        log_binom = self.log_factorial[n] - self.log_factorial[k] - self.log_factorial[n - k]
        return (
            0.5 * math.log((v - 1) / (v * (1 - g)))
            + (n - k) * math.log((v - 1) / (v - g))
            + n * math.log(k)
            - k * math.log(n)
            + k * (1 - g)
            + log_binom
        )

    def log_pmf(self, k: int, n: int, s: int) -> float:
        return self.log_stirling2(n, k) + self.log_factorial[s] - self.log_factorial[s - k] - n * math.log(s)

    def _logsum(self, terms) -> float:
        terms = list(terms)
        top = max(terms)
        return top + math.log(sum(math.exp(t - top) for t in terms))

    def irs_infinity(self, k: int, n: int, big_n: int, alpha: float):
        def ratio(s):  # likelihood(s+1) - likelihood(s)
            return self.log_pmf(k, n, s + 1) - self.log_pmf(k, n, s)

        lo, hi = k, big_n - 1
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if ratio(mid) < 0 else (mid + 1, hi)
        s_hat = lo
        log_alpha = math.log(alpha)

        def sf(s):
            return self._logsum(self.log_pmf(j, n, s) for j in range(k, min(n, s) + 1))

        def cdf(s):
            return self._logsum(self.log_pmf(j, n, s) for j in range(1, k + 1))

        lo, hi = k, s_hat
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if sf(mid) > log_alpha else (mid + 1, hi)
        s_lower = lo
        lo, hi = s_hat, big_n
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if cdf(mid) > log_alpha else (lo, mid - 1)
        return s_hat / big_n, s_lower / big_n, lo / big_n

    def rejection_threshold(self, big_n: int, target: float, n: int, alpha: float) -> int:
        s = round(target * big_n)
        total = 0.0
        for k in range(1, n + 1):
            total += math.exp(self.log_pmf(k, n, s))
            if total >= alpha:
                return k - 1
        return n


# ----------------------------------------------------------------------------- timing helpers


def best_of(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def cold_seconds(statement: str) -> float:
    """Imports + first call, timed inside a fresh interpreter."""
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def process_seconds(argv: list[str], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-baseline-estimate", action="store_true", help="the baseline estimate takes minutes")
    args = parser.parse_args()

    from irs_callbacks.stats import irs_infinity, rejection_threshold

    rows = []
    ours_est_cold = cold_seconds(
        f"from irs_callbacks.stats import irs_infinity; irs_infinity({N_LEARNED}, {N_SAMPLES}, {N_TRAIN}, {ALPHA})"
    )
    ours_thr_cold = cold_seconds(
        f"from irs_callbacks.stats import rejection_threshold; rejection_threshold({N_TRAIN}, {TARGET}, {N_SAMPLES}, {ALPHA})"
    )
    ours_est_warm, est = best_of(lambda: irs_infinity(N_LEARNED, N_SAMPLES, N_TRAIN, ALPHA), args.repeats)
    ours_thr_warm, k_min = best_of(lambda: rejection_threshold(N_TRAIN, TARGET, N_SAMPLES, ALPHA), args.repeats)

    base_thr_cold = cold_seconds(
        "import sys; sys.path.insert(0, 'benchmarks'); from bench_stats import PaperBaseline;"
        f" PaperBaseline({N_TRAIN}).rejection_threshold({N_TRAIN}, {TARGET}, {N_SAMPLES}, {ALPHA})"
    )
    baseline = PaperBaseline(N_TRAIN)
    base_thr_warm, base_k_min = best_of(
        lambda: baseline.rejection_threshold(N_TRAIN, TARGET, N_SAMPLES, ALPHA), max(1, args.repeats // 2)
    )
    rows.append(("rejection_threshold (k_min)", ours_thr_cold, base_thr_cold, ours_thr_warm, base_thr_warm))
    print(f"k_min: ours {k_min}, baseline {base_k_min}")
    print(f"irs_infinity(45000, 50000, N): ours {est}")

    if not args.skip_baseline_estimate:
        start = time.perf_counter()
        base_est = PaperBaseline(N_TRAIN).irs_infinity(N_LEARNED, N_SAMPLES, N_TRAIN, ALPHA)
        base_est_cold_in_process = time.perf_counter() - start
        base_est_warm, _ = best_of(lambda: baseline.irs_infinity(N_LEARNED, N_SAMPLES, N_TRAIN, ALPHA), 1)
        print(f"irs_infinity baseline: estimate {base_est[0]:.4%} [{base_est[1]:.4%}, {base_est[2]:.4%}]")
        rows.append(("irs_infinity (both bounds)", ours_est_cold, base_est_cold_in_process, ours_est_warm, base_est_warm))

    print()
    print(f"| case | ours cold | baseline cold | ours warm | baseline warm | warm speed-up |")
    print(f"|---|---|---|---|---|---|")
    for name, oc, bc, ow, bw in rows:
        print(f"| {name} | {oc * 1e3:.1f} ms | {bc * 1e3:.0f} ms | {ow * 1e3:.2f} ms | {bw * 1e3:.0f} ms | {bw / ow:.0f}x |")

    irs = [sys.executable, "-m", "irs_callbacks.cli"]
    whole = process_seconds([*irs, "threshold", "--n-train", str(N_TRAIN), "--target", str(TARGET), "--n-samples", str(N_SAMPLES)])
    bare = process_seconds([sys.executable, "-c", "import numpy, scipy.special"])
    print()
    print(f"`irs threshold` ImageNet example, whole process (interpreter start included): {whole:.2f} s")
    print(f"  for scale: python -c 'import numpy, scipy.special' alone: {bare:.2f} s")


if __name__ == "__main__":
    main()
