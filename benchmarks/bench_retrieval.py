"""Queries per second of exact nearest-neighbour search (IRS retrieval, paper Sec. 3.2).

Compares, in one run and on the same data:
  (a) naive: ``torch.cdist(bank, query_batch).argmin(0)`` per query batch (the published
      BeyondFID approach, batch 2048);
  (b) irs_callbacks FeatureBank, torch backend (exact, ties to the lowest index);
  (c) irs_callbacks FeatureBank, faiss backend (exact after re-ranking), when faiss imports.
Ratios are against (a) measured in the same run. With ``--device cuda`` a float16 bank is also
timed and the achieved memory bandwidth (bank bytes read per second / peak) is printed.

    .venv/bin/python benchmarks/bench_retrieval.py                     # CPU, N = 10k and 100k
    .venv/bin/python benchmarks/bench_retrieval.py --device cuda --peak-gbps 3350
"""

from __future__ import annotations

import argparse
import time

import torch

from irs_callbacks.retrieval import FeatureBank, faiss_available

PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}  # SXM HBM peak, GB/s


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    fn()  # warm-up (allocations, kernel selection)
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


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
    return bank.to(device), queries.to(device)


def peak_bandwidth(args):
    if args.peak_gbps:
        return args.peak_gbps
    if torch.cuda.is_available() and torch.device(args.device).type == "cuda":
        name = torch.cuda.get_device_name()
        for key, value in PEAK_GBPS.items():
            if key in name:
                return value
    return None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000], help="bank sizes")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--queries", type=int, default=2048, help="queries per timing")
    p.add_argument("--batch", type=int, nargs="+", default=[2048, 256],
                   help="query batch sizes (2048 is the published setting)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", choices=["gaussian", "relu"], default="gaussian")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--no-faiss", action="store_true")
    p.add_argument("--peak-gbps", type=float, default=None, help="peak memory bandwidth for the float16 line")
    args = p.parse_args()
    dev = args.device
    print(f"device={dev} threads={torch.get_num_threads()} dim={args.dim} queries={args.queries} data={args.data}")
    for n in args.n:
        bank, queries = make_data(n, args.queries, args.dim, args.data, dev)
        fb_torch = FeatureBank(bank, backend="torch")
        fb_faiss = None if (args.no_faiss or not faiss_available()) else FeatureBank(bank, backend="faiss", device=dev)
        fb_half = FeatureBank(bank, backend="torch", dtype=torch.float16) if torch.device(dev).type == "cuda" else None
        for batch in args.batch:
            def naive():
                return torch.cat([torch.cdist(bank, queries[s:s + batch]).argmin(0)
                                  for s in range(0, args.queries, batch)])

            t_naive, i_naive = timed(naive, dev, args.repeats)
            rows = [("naive cdist+argmin", t_naive, i_naive)]
            for name, fb in [("torch backend", fb_torch), ("faiss backend", fb_faiss), ("torch fp16 bank", fb_half)]:
                if fb is None:
                    continue
                fb.block_size = batch

                def run(fb=fb):
                    return torch.cat([fb.search(queries[s:s + batch])[0] for s in range(0, args.queries, batch)])

                t, idx = timed(run, dev, args.repeats)
                rows.append((name, t, idx))
            print(f"\nN={n:,} batch={batch}")
            for name, t, idx in rows:
                agree = (idx.cpu() == i_naive.cpu()).float().mean().item()
                line = (f"  {name:20s} {args.queries / t:10.1f} queries/s  {t:8.3f} s  x{t_naive / t:5.2f} vs naive"
                        f"  agreement with naive {agree:.4f}")
                if name == "torch fp16 bank":
                    bytes_read = n * args.dim * 2 * -(-args.queries // batch)
                    gbps = bytes_read / t / 1e9
                    peak = peak_bandwidth(args)
                    line += f"  bank read {gbps:.1f} GB/s" + (f" = {gbps / peak:.1%} of {peak:.0f} GB/s" if peak else "")
                print(line, flush=True)
        del bank, queries, fb_torch, fb_faiss, fb_half


if __name__ == "__main__":
    main()
