"""Exact nearest-neighbour search (IRS retrieval, paper Sec. 3.2) against plain ``torch.cdist``.

Two modes, every figure with a baseline measured in the same run on the same data:

``--mode search`` (default): queries per second and effective TFLOP/s (2 n N d / seconds) of
  (a) naive: ``torch.cdist(bank, query_batch).argmin(0)`` per query batch (the published
      BeyondFID approach, batch 2048);
  (b) ``FeatureBank`` with each ``--screen`` dtype (float32; float16 / bfloat16 are emulated
      exactly on the CPU and run on tensor cores on CUDA), torch backend;
  (c) ``FeatureBank`` with the faiss backend (float32), when faiss imports;
  and a bare matrix product of the same shape (float32 on CPU, bfloat16 on CUDA) as the hardware
  reference. Every bank must agree with float64-exact answers; the naive float32 cdist may not
  (its agreement is printed).

``--mode score``: one score from features, warm (second call in the process), at several N:
  ours = ``ReferenceBank.from_features(train, reference_features=held)`` + ``.score(samples)``
  (real-data measurement, duplicate count, IRS_inf, adjusted IRS) against the plain cdist
  pipeline (``cdist(held, train).argmin`` and ``cdist(samples, train).argmin``, batch 2048, then
  the same ``irs_infinity`` / ``adjusted_irs``). Issue 10 asks for ours to be at least as fast at
  every N.

    python benchmarks/bench_retrieval.py                                  # CPU search, N = 10k and 100k
    python benchmarks/bench_retrieval.py --mode score                     # CPU, N = 1,197 ... 50,000
    python benchmarks/bench_retrieval.py --device cuda --n 100000 1281166 --queries 50000 --batch 5000
"""

from __future__ import annotations

import argparse
import time

import torch

from irs_callbacks.reference import ReferenceBank
from irs_callbacks.retrieval import FeatureBank, faiss_available
from irs_callbacks.stats import adjusted_irs, irs_infinity


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats, cpu_time=False):
    """Best wall-clock seconds of ``repeats`` calls after a warm-up (with ``cpu_time``: also the
    best process CPU seconds, which other jobs on a loaded machine inflate less)."""
    fn()  # warm-up (allocations, kernel selection)
    sync(device)
    best = best_cpu = float("inf")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return (best, best_cpu, out) if cpu_time else (best, out)


def make_data(n, n_queries, dim, kind, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        bank, queries = torch.randn(n, dim, generator=g), torch.randn(n_queries, dim, generator=g)
    else:  # "relu": non-negative, correlated, clustered -- closer to CNN pooled features
        basis = torch.randn(64, dim, generator=g) / 8
        centres = torch.randn(256, 64, generator=g)

        def draw(m):
            z = centres[torch.randint(0, 256, (m,), generator=g)] + 0.5 * torch.randn(m, 64, generator=g)
            return torch.relu(z @ basis + 0.3 * torch.randn(m, dim, generator=g))

        bank, queries = draw(n), draw(n_queries)
    return bank, queries.to(device)


def bare_product(n_queries, n, dim, device, repeats, chunk=32768):
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    a = torch.randn(n_queries, dim, device=device, dtype=dtype)
    b = torch.randn(min(chunk, n), dim, device=device, dtype=dtype)

    def run():
        for s in range(0, n, b.shape[0]):
            a @ b[: min(b.shape[0], n - s)].T

    t, _ = timed(run, device, repeats)
    return 2 * n_queries * n * dim / t / 1e12, dtype


def search_mode(args):
    dev = args.device
    print(f"device={dev} threads={torch.get_num_threads()} dim={args.dim} queries={args.queries} data={args.data}")
    for n in args.n:
        bank, queries = make_data(n, args.queries, args.dim, args.data, dev)
        banks = [(f"FeatureBank {s}", FeatureBank(bank, device=dev, screen_dtype=s, backend="torch")) for s in args.screen]
        if not args.no_faiss and faiss_available():
            banks.append(("FeatureBank faiss", FeatureBank(bank, device=dev, screen_dtype="float32", backend="faiss")))
        bank_dev = bank.to(dev)
        for batch in args.batch:
            def naive():
                return torch.cat([torch.cdist(bank_dev, queries[s:s + batch]).argmin(0)
                                  for s in range(0, args.queries, batch)])

            t_naive, i_naive = timed(naive, dev, args.repeats)
            tf_bare, bare_dtype = bare_product(batch, n, args.dim, dev, args.repeats)
            flop = 2 * args.queries * n * args.dim
            print(f"\nN={n:,} batch={batch}: bare {bare_dtype} product {tf_bare:.3f} TFLOP/s")
            rows = [("naive cdist+argmin", t_naive, i_naive)]
            for name, fb in banks:
                fb.block_size = batch

                def run(fb=fb):
                    return torch.cat([fb.search(queries[s:s + batch])[0] for s in range(0, args.queries, batch)])

                t, idx = timed(run, dev, args.repeats)
                rows.append((name, t, idx))
            exact = rows[1][2].cpu() if len(rows) > 1 else None  # every bank is exact: they must all agree
            for name, t, idx in rows:
                line = (f"  {name:22s} {args.queries / t:10.1f} queries/s  {t:8.3f} s  x{t_naive / t:5.2f} vs naive"
                        f"  {flop / t / 1e12:7.3f} TFLOP/s = {flop / t / 1e12 / tf_bare:6.1%} of bare")
                agree = (idx.cpu() == exact).float().mean().item() if exact is not None else float("nan")
                line += f"  agreement with exact {agree:.4f}"
                print(line, flush=True)
        del bank, queries, banks, bank_dev


def score_mode(args):
    dev = args.device
    print(f"device={dev} threads={torch.get_num_threads()} dim={args.dim}: one score from features, warm, "
          f"best of {args.repeats}")
    for n in args.score_n:
        m = min(n // 2, args.score_queries)
        g = torch.Generator().manual_seed(n)
        train = torch.randn(n, args.dim, generator=g)
        held = train[torch.randint(n, (m,), generator=g)] + 0.5 * torch.randn(m, args.dim, generator=g)
        samples = train[torch.randint(n, (m,), generator=g)] + 0.5 * torch.randn(m, args.dim, generator=g)

        def ours():
            ref = ReferenceBank.from_features(train, reference_features=held, device=dev)
            result = ref.score(samples, device=dev)
            return result.n_learned, result.adjusted

        def cdist_pipeline():
            t, h, s = train.to(dev), held.to(dev), samples.to(dev)
            real = torch.cat([torch.cdist(t, h[i:i + 2048]).argmin(0) for i in range(0, m, 2048)])
            fake = torch.cat([torch.cdist(t, s[i:i + 2048]).argmin(0) for i in range(0, m, 2048)])
            real_est = irs_infinity(int(torch.unique(real).numel()), m, n)
            k = int(torch.unique(fake).numel())
            return k, adjusted_irs(irs_infinity(k, m, n), real_est)

        t_ours, c_ours, (k_ours, a_ours) = timed(ours, dev, args.repeats, cpu_time=True)
        t_base, c_base, (k_base, a_base) = timed(cdist_pipeline, dev, args.repeats, cpu_time=True)
        print(f"  N={n:>7,} queries={m:>6,} (real and synthetic)  ours {t_ours:7.3f} s  cdist {t_base:7.3f} s  "
              f"x{t_base / t_ours:5.2f}  (CPU time {c_ours:7.3f} s vs {c_base:7.3f} s: x{c_base / c_ours:5.2f})  "
              f"N_learned {k_ours} vs {k_base}, adjusted {a_ours:.4f} vs {a_base:.4f}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["search", "score"], default="search")
    p.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000], help="bank sizes (search)")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--queries", type=int, default=2048, help="queries per timing (search)")
    p.add_argument("--batch", type=int, nargs="+", default=[2048, 256],
                   help="query batch sizes (2048 is the published setting)")
    p.add_argument("--screen", nargs="+", default=None,
                   help="screen dtypes (default: float32 float16 bfloat16 on CPU, float16 bfloat16 float32 on CUDA)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", choices=["gaussian", "relu"], default="gaussian")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--no-faiss", action="store_true")
    p.add_argument("--score-n", type=int, nargs="+", default=[1_197, 5_000, 20_000, 50_000],
                   help="training set sizes (score); 1,197 = the digits example's training split")
    p.add_argument("--score-queries", type=int, default=1_000, help="real and synthetic queries (score): min(N/2, this)")
    args = p.parse_args()
    if args.screen is None:
        args.screen = ["float16", "bfloat16", "float32"] if torch.device(args.device).type == "cuda" else ["float32", "float16", "bfloat16"]
    (search_mode if args.mode == "search" else score_mode)(args)


if __name__ == "__main__":
    main()
