"""Cost of ReferenceBank.score_indices at ImageNet scale (the monitor calls it once per evaluation).

N = 1,281,166 training images, 50,000 samples retrieving from a non-uniform distribution over
1,000,000 of them, and a real reference of R queries (default 50,000, the paper's split size; with
--real 10000 the samples are the side to subsample). Printed, best of --repeats:

- ``irs_infinity`` of the samples alone (the floor: the score needs it whatever the matching);
- ``score_indices`` cold (the real side at this alpha not yet cached) and warm (cached, as in
  every evaluation of a run after the first);
- the previous real_at: IRS_inf of 32 seeded random subsets of the real queries, averaged.

    python benchmarks/bench_score_indices.py [--real 50000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from irs_callbacks.reference import ReferenceBank
from irs_callbacks.stats import irs_infinity

N_TRAIN, N_SAMPLES, PRODUCIBLE = 1_281_166, 50_000, 1_000_000


def draws(rng, n, weights, rows):
    return rows[rng.choice(len(weights), size=n, p=weights)]


def best(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", type=int, default=50_000, help="real reference queries (default 50,000)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    weights = 1.0 / np.arange(1, PRODUCIBLE + 1) ** 0.5
    weights /= weights.sum()
    rows = rng.permutation(N_TRAIN)[:PRODUCIBLE]
    real_rows = draws(rng, args.real, weights, rows)
    real = irs_infinity(len(np.unique(real_rows)), args.real, N_TRAIN)
    bank = ReferenceBank(torch.zeros(N_TRAIN, 1), real=real, real_nearest=torch.from_numpy(real_rows),
                         metadata={"duplicate_count": 0})
    samples = torch.from_numpy(draws(rng, N_SAMPLES, weights, rows))
    k = len(np.unique(samples.numpy()))

    floor = best(lambda: irs_infinity(k, N_SAMPLES, N_TRAIN), args.repeats)
    t = time.perf_counter()
    result = bank.score_indices(samples)
    cold = time.perf_counter() - t
    warm = best(lambda: bank.score_indices(samples), args.repeats)

    def previous():
        generator = torch.Generator().manual_seed(0)
        m = round(N_SAMPLES * real.n_train / N_TRAIN)
        queries = torch.from_numpy(real_rows)
        if m >= len(queries):
            return
        for _ in range(32):
            subset = queries[torch.randperm(len(queries), generator=generator)[:m]]
            irs_infinity(int(torch.unique(subset).numel()), m, real.n_train)

    old = best(previous, 1)
    print(f"N = {N_TRAIN:,}, {N_SAMPLES:,} samples (N_learned {k:,}), {args.real:,} real queries; "
          f"matching: {result.alpha_matching} at alpha {result.matched_alpha:.4g}; IRS_inf,a {result.adjusted:.4f}")
    print(f"irs_infinity of the samples alone (floor): {floor * 1e3:8.1f} ms")
    print(f"score_indices, cold (real side computed):  {cold * 1e3:8.1f} ms")
    print(f"score_indices, warm (real side cached):    {warm * 1e3:8.1f} ms  ({warm / floor:.2f}x the floor)")
    if args.real > N_SAMPLES:
        print(f"previous real_at (32 random subsets):      {old * 1e3:8.1f} ms  (cold score_indices is "
              f"{old / cold:.1f}x faster)")


if __name__ == "__main__":
    main()
