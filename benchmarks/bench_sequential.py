"""Early verdicts of SequentialRejectionTest, simulated from the statistics alone (numpy, CPU).

Each run draws the exact occupancy chain K_{m+1} = K_m + [U_m < (s - K_m) / s] (U uniform: the
retrieval of a new training image when the model produces s images equally often), vectorised
over runs; all schedules and the plain Eq. 10 test judge the same paths (common random numbers),
so their differences are paired. Decisions use the test's thresholds vectorised; a sample of runs
per cell is replayed through ``decide`` itself and must agree.

Scales (target 0.8, real IRS 1.0, alpha_e 0.05, the test's defaults otherwise):
- ImageNet: N = 1,281,166, budget 50,000; batches of 100, 1,000, 5,000 and one uneven schedule;
- digits:   N = 1,797, budget 600, batches of 100.
Coverages s / N: 0.3, 0.6, 0.7, 0.8 (the null: s = s_d), 0.9, 0.95. Each cell is run without early
pass (the default) and with ``pass_alpha=0.05``. False rejections at 0.8 and the rejections at 0.7
(sequential and plain) are also computed exactly (the chain absorbed at each look). Also timed:
building the test (all thresholds, cold) and one ``decide``. ``--spending-study`` adds the exact
operating characteristics behind the defaults (spending shape, interim_alpha).
Usage: python benchmarks/bench_sequential.py [--runs 10000] [--seed 0] [--spending-study]
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np

from irs_callbacks.stats import SequentialRejectionTest

TARGET, REAL, ALPHA, PASS_ALPHA = 0.8, 1.0, 0.05, 0.05
COVERAGES = (0.3, 0.6, 0.7, 0.8, 0.9, 0.95)
UNEVEN_BATCHES = (300, 1700, 3000, 5000, 7000, 8000, 10000, 15000)  # cumulative: 300, 2000, 5000, 10000, ...


def batch_looks(batch: int, budget: int) -> list[int]:
    return [*range(batch, budget, batch), budget]


def simulate(s: float, looks: list[int], runs: int, rng: np.random.Generator) -> np.ndarray:
    """K at each of the (sorted) look times, one row per run: the exact chain, one uniform per draw."""
    chunk = max(1, 2_000_000 // runs)  # uniforms drawn per block of draws: 16 MB
    budget = looks[-1]
    wanted = np.zeros(budget + 1, dtype=bool)
    wanted[looks] = True
    out = np.empty((runs, len(looks)), dtype=np.int64)
    k = np.zeros(runs)
    column, m = 0, 0
    while m < budget:
        steps = min(chunk, budget - m)
        new_below = s * (1.0 - rng.random((steps, runs)))  # a draw is new iff K < s (1 - U)
        for row in new_below:
            k += k < row
            m += 1
            if wanted[m]:
                out[:, column] = k
                column += 1
    return out


def thresholds(test: SequentialRejectionTest, looks: list[int]):
    """(reject iff K <= reject[j], early pass iff K >= early[j], final look?) at each look j."""
    reject = np.array([test.reject_threshold(m) for m in looks])
    early = np.array([test.pass_threshold(m) if test.pass_threshold(m) is not None else m + 1 for m in looks])
    return reject, early, np.asarray(looks) >= test.budget


def verdicts(test: SequentialRejectionTest, looks: list[int], k: np.ndarray):
    """(rejected, early_passed, samples_used) per run, from the test's thresholds."""
    looks_arr = np.asarray(looks)
    reject, early, is_final = thresholds(test, looks)
    rejects = k <= reject
    passes = ~rejects & ((k > test.k_final) | (k >= early) | is_final)
    stop = rejects | passes
    first = np.argmax(stop, axis=1)  # the last look always stops
    rows = np.arange(len(k))
    rejected = rejects[rows, first]
    early_passed = passes[rows, first] & ~is_final[first] & (k[rows, first] <= test.k_final)
    return rejected, early_passed, looks_arr[first]


def exact(test, s: float, looks: list[int], d_cap: int, plain_k_min: int | None = None):
    """Exact (P(reject), P(early pass)) for one schedule: the chain in repeats D = m - K, started at
    D = 0 and absorbed at every look; with ``plain_k_min``, the plain Eq. 10 test instead."""
    reject, early, is_final = thresholds(test, looks)
    if plain_k_min is not None:
        looks, reject, early, is_final = [looks[-1]], np.array([plain_k_min]), np.array([looks[-1] + 1]), np.array([True])
    d = np.arange(d_cap + 1)
    p = np.zeros(d_cap + 1)
    p[0] = 1.0
    rejected = early_passed = 0.0
    m = 0
    for j, look in enumerate(looks):
        for _ in range(look - m):
            moved = p * np.clip((m - d) / s, 0.0, 1.0)  # a repeat: K = m - d images seen of s
            p -= moved
            p[1:] += moved[:-1]
            m += 1
        k = m - d
        out = k <= (test.k_final if is_final[j] and plain_k_min is None else reject[j])
        rejected += p[out].sum()
        p[out] = 0.0
        if not is_final[j]:
            early_passed += p[(k >= early[j]) & (k <= test.k_final)].sum()
            p[(k >= early[j]) | (k > test.k_final)] = 0.0
    return rejected, early_passed


def replay(test, looks, k, rejected, early, used, runs: int = 100) -> None:
    """Check the vectorised verdicts against ``decide`` for the first runs."""
    for i in range(min(runs, len(k))):
        for j, m in enumerate(looks):
            decision = test.decide(m, int(k[i, j]))
            if decision.verdict != "continue":
                assert (decision.verdict == "reject") == rejected[i] and m == used[i], (i, m, decision)
                assert (decision.rule == "early_pass") == early[i], (i, m, decision)
                break


def pct(x, budget) -> str:
    return f"{100 * x / budget:.0f}%"


def run_scale(name, n_train, budget, schedules, runs, rng, report):
    s_d = TARGET * REAL * n_train
    tests = {
        "off": SequentialRejectionTest(n_train, TARGET, budget, ALPHA, real_irs=REAL),
        "on": SequentialRejectionTest(n_train, TARGET, budget, ALPHA, real_irs=REAL, pass_alpha=PASS_ALPHA),
    }
    test = tests["off"]
    print(
        f"\n{name}: N = {n_train:,}, budget {budget:,}, target {TARGET}, real {REAL} (s_d = {s_d:,.1f}); "
        f"alpha_e = {ALPHA}, interim_alpha = {test.interim_alpha:g}; k_min (Eq. 10) = {test.k_min:,}, "
        f"k_final = {test.k_final:,}; {runs:,} runs per cell"
    )
    all_looks = sorted({m for looks in schedules.values() for m in looks})
    index = {m: i for i, m in enumerate(all_looks)}
    paths = {}
    t0 = time.perf_counter()
    for coverage in COVERAGES:
        paths[coverage] = simulate(coverage * n_train, all_looks, runs, rng)
    print(f"simulation: {time.perf_counter() - t0:.1f} s")
    plain = {c: paths[c][:, -1] <= test.k_min for c in COVERAGES}

    print("samples used per verdict, in % of the budget: median / 90th percentile over the runs with that verdict")
    print(
        f"{'early pass':<10} {'schedule':<12} {'coverage':>8} {'rejected':>9} {'early pass':>10} "
        f"{'to reject':>15} {'to pass':>15}"
    )
    for setting, test in tests.items():
        for sched_name, looks in schedules.items():
            cols = [index[m] for m in looks]
            for coverage in COVERAGES:
                k = paths[coverage][:, cols]
                rejected, early, used = verdicts(test, looks, k)
                replay(test, looks, k, rejected, early, used)
                row = {
                    "rejected": rejected.mean(),
                    "early_pass": early.mean(),
                    "median_reject": float(np.median(used[rejected])) if rejected.any() else math.nan,
                    "p90_reject": float(np.percentile(used[rejected], 90)) if rejected.any() else math.nan,
                    "median_pass": float(np.median(used[~rejected])) if (~rejected).any() else math.nan,
                    "p90_pass": float(np.percentile(used[~rejected], 90)) if (~rejected).any() else math.nan,
                    "plain": plain[coverage].mean(),
                }
                if coverage in (0.7, 0.8):
                    d_cap = min(budget, int(3 * (budget - k.mean(axis=0)[-1])) + 100)
                    row["exact"], row["exact_early_pass"] = exact(test, coverage * n_train, looks, d_cap)
                    if coverage == 0.7:
                        row["exact_plain"], _ = exact(test, coverage * n_train, looks, d_cap, plain_k_min=test.k_min)
                report[name, setting, sched_name, coverage] = row
                to_reject = f"{pct(row['median_reject'], budget)} / {pct(row['p90_reject'], budget)}"
                to_pass = f"{pct(row['median_pass'], budget)} / {pct(row['p90_pass'], budget)}"
                print(
                    f"{setting:<10} {sched_name:<12} {coverage:>8.2f} {row['rejected']:>9.3f} {row['early_pass']:>10.3f} "
                    f"{to_reject if rejected.any() else '-':>15} {to_pass if (~rejected).any() else '-':>15}"
                )
    return tests


def summarise(name, budget, schedules, runs, report, checks):
    se_alpha = math.sqrt(ALPHA * (1 - ALPHA) / runs)
    se_pass = math.sqrt(PASS_ALPHA * (1 - PASS_ALPHA) / runs)
    print(f"\n{name}, summary (standard errors from {runs:,} runs):")
    for setting in ("off", "on"):
        for sched_name in schedules:
            null = report[name, setting, sched_name, 0.8]
            r7 = report[name, setting, sched_name, 0.7]
            se = math.sqrt(max(null["rejected"] * (1 - null["rejected"]), 1e-12) / runs)
            line = (
                f"  early pass {setting:<3} {sched_name:<11} false rejections at 0.8: {null['rejected']:.4f} +- {se:.4f} "
                f"(exact {null['exact']:.4f}); rejected at 0.7: {r7['rejected']:.3f}, plain Eq. 10 {r7['plain']:.3f} "
                f"(exact {r7['exact']:.4f}, plain {r7['exact_plain']:.4f})"
            )
            checks.append((f"{name} {setting} {sched_name}: false rejections <= alpha_e + 3 SE (exact <= alpha_e)",
                           null["rejected"] <= ALPHA + 3 * se_alpha and null["exact"] <= ALPHA))
            checks.append((f"{name} {setting} {sched_name}: rejected at 0.7 >= plain - 0.05 "
                           f"(simulated {r7['rejected'] - r7['plain']:+.3f}, exact {r7['exact'] - r7['exact_plain']:+.4f})",
                           r7["exact"] >= r7["exact_plain"] - 0.05))
            if setting == "on":
                line += f"; wrong early passes at 0.8: {null['early_pass']:.4f} (exact {null['exact_early_pass']:.4f})"
                checks.append((f"{name} {sched_name}: wrong early passes <= pass_alpha + 3 SE (exact <= pass_alpha)",
                               null["early_pass"] <= PASS_ALPHA + 3 * se_pass and null["exact_early_pass"] <= PASS_ALPHA))
            print(line)
            if name.startswith("ImageNet"):
                m3 = report[name, setting, sched_name, 0.3]["median_reject"]
                m6 = report[name, setting, sched_name, 0.6]["median_reject"]
                checks.append((f"{name} {setting} {sched_name}: median to reject 0.3 <= 10% ({pct(m3, budget).strip()})",
                               m3 <= 0.10 * budget))
                checks.append((f"{name} {setting} {sched_name}: median to reject 0.6 <= 45% ({pct(m6, budget).strip()})",
                               m6 <= 0.45 * budget))
                if setting == "on":
                    m95 = report[name, setting, sched_name, 0.95]["median_pass"]
                    checks.append((f"{name} {sched_name}: median to pass 0.95 <= 60% ({pct(m95, budget).strip()})",
                                   m95 <= 0.60 * budget))


def timings(n_train, budget) -> dict:
    """Cold construction (all thresholds) and one decide, best of 3."""
    out = {}
    for setting, kwargs in (("off", {}), ("on", {"pass_alpha": PASS_ALPHA})):
        best = math.inf
        for _ in range(3):
            SequentialRejectionTest.clear_cache()
            t0 = time.perf_counter()
            test = SequentialRejectionTest(n_train, TARGET, budget, ALPHA, real_irs=REAL, **kwargs)
            best = min(best, time.perf_counter() - t0)
        out[setting] = best
    calls = 20_000
    t0 = time.perf_counter()
    for i in range(calls):
        test.decide(25_000, 24_700 + i % 100)
    out["decide"] = (time.perf_counter() - t0) / calls
    return out


def spending_study() -> None:
    """Exact operating characteristics behind the defaults (SequentialRejectionTest's docstring)."""
    n_train, budget = 1_281_166, 50_000
    looks = batch_looks(5000, budget)
    print("\nspending shape (interim_alpha = alpha_e / 5), ImageNet scale, batches of 5,000, exact:")
    print(f"{'exponent':>8} {'k_final':>8} {'P(reject at 5,000 | 0.3)':>25} {'P(reject by 20,000 | 0.6)':>26}")
    for exponent in (1.0, 1.5, 2.0, 3.0):
        test = SequentialRejectionTest(n_train, TARGET, budget, ALPHA, real_irs=REAL, spending_exponent=exponent)
        first, _ = exact(test, 0.3 * n_train, looks[:1], 200)
        by_20k, _ = exact(test, 0.6 * n_train, looks[:4], 600)
        print(f"{exponent:>8g} {test.k_final:>8,} {first:>25.3f} {by_20k:>26.3f}")
    print(f"\nearly-pass spending shape (pass_alpha = {PASS_ALPHA}), ImageNet scale, batches of 5,000, exact:")
    print(f"{'exponent':>8} {'P(pass by 10,000 | 0.95)':>25} {'by 25,000':>10} {'by 30,000':>10}")
    for exponent in (1.0, 1.5, 2.0, 3.0):
        test = SequentialRejectionTest(
            n_train, TARGET, budget, ALPHA, real_irs=REAL, pass_alpha=PASS_ALPHA, pass_spending_exponent=exponent
        )
        passed = [exact(test, 0.95 * n_train, looks[:j], 800)[1] for j in (2, 5, 6)]
        print(f"{exponent:>8g} {passed[0]:>25.3f} {passed[1]:>10.3f} {passed[2]:>10.3f}")
    print("\ninterim_alpha (linear spending), exact; digits: batches of 100:")
    print(f"{'interim_alpha / alpha_e':>23} {'k_final ImageNet':>16} {'k_final digits':>14} {'P(reject | 0.7) digits':>23}")
    for fraction in (0.0, 0.1, 0.2, 0.4, 0.5):
        big = SequentialRejectionTest(n_train, TARGET, budget, ALPHA, real_irs=REAL, interim_alpha=fraction * ALPHA)
        small = SequentialRejectionTest(1_797, TARGET, 600, ALPHA, real_irs=REAL, interim_alpha=fraction * ALPHA)
        power, _ = exact(small, 0.7 * 1_797, batch_looks(100, 600), 600)
        print(f"{fraction:>23g} {big.k_final:>16,} {small.k_final:>14,} {power:>23.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spending-study", action="store_true", help="also print the exact study behind the defaults")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    threads = os.environ.get("OMP_NUM_THREADS")
    print(f"load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs); OMP_NUM_THREADS={threads}")

    report, checks = {}, []
    imagenet = {
        "batch 100": batch_looks(100, 50_000),
        "batch 1000": batch_looks(1000, 50_000),
        "batch 5000": batch_looks(5000, 50_000),
        "uneven": list(np.cumsum(UNEVEN_BATCHES)),
    }
    assert imagenet["uneven"][-1] == 50_000
    run_scale("ImageNet", 1_281_166, 50_000, imagenet, args.runs, rng, report)
    digits = {"batch 100": batch_looks(100, 600)}
    run_scale("digits", 1_797, 600, digits, args.runs, rng, report)
    summarise("ImageNet", 50_000, imagenet, args.runs, report, checks)
    summarise("digits", 600, digits, args.runs, report, checks)

    cost = timings(1_281_166, 50_000)
    per_count = cost["off"] / 50_001
    print(
        f"\ncost at ImageNet scale: building the test (all 50,001 thresholds, cold) {cost['off'] * 1e3:.0f} ms without early "
        f"pass, {cost['on'] * 1e3:.0f} ms with it = {per_count * 1e6:.1f} us per sample count "
        f"({per_count / 2e-3:.4f} of the 2 ms allowed per threshold); decide() {cost['decide'] * 1e6:.2f} us"
    )
    checks.append(("threshold at a new sample count <= 2 ms", per_count <= 2e-3))
    if args.spending_study:
        spending_study()
    print("\nacceptance:")
    for label, ok in checks:
        print(f"  {'ok  ' if ok else 'FAIL'} {label}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s; load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
