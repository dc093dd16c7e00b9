"""Precision/recall/density/coverage: irs_callbacks.metrics.prdc vs the ``prdc`` package.

Each implementation runs in its own fresh subprocess on the same features (written once to a
temporary .npy file), so wall time and peak resident memory are measured alike. The peak is
the child's high-water RSS over its whole life (what ``ru_maxrss`` reports: interpreter,
imports and loaded features included). The increment is the computation's own high-water RSS
minus the RSS after imports + loading (the high-water mark is reset after loading through
``/proc/self/clear_refs``, so ``np.load``'s transient does not hide it; the peak is the larger
of the two marks). The child for ours imports only numpy and ``irs_callbacks.metrics`` (numpy
inputs never import torch; each child reports whether torch got loaded). Ratios are against
``prdc`` measured in the same run.

    .venv/bin/python benchmarks/bench_metrics.py                    # 10k x 10k, d = 2048, both
    .venv/bin/python benchmarks/bench_metrics.py --n 50000 --only ours
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

CHILD = r"""
import json, resource, sys, time
import numpy as np

def status(key):  # VmRSS (current) or VmHWM (high-water mark) of this process, MiB
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key + ":")) / 1024

which, path_r, path_f, k = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if which == "prdc":
    import prdc
    run = lambda r, f: {key: float(v) for key, v in prdc.compute_prdc(r, f, k).items()}
else:
    from irs_callbacks.metrics import prdc
    run = lambda r, f: prdc(r, f, k)
real, fake = np.load(path_r), np.load(path_f)
before, load_peak = status("VmRSS"), status("VmHWM")  # imports + features loaded; np.load's own peak
try:  # reset the high-water mark so that the computation's peak is measured apart from np.load's
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    reset = True
except OSError:
    reset = False
t0 = time.perf_counter()
out = run(real, fake)
seconds = time.perf_counter() - t0
compute_peak = status("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "peak_rss_mib": max(load_peak, compute_peak), "before_rss_mib": before,
                  "compute_peak_mib": compute_peak, "increment_mib": compute_peak - before,
                  "torch_imported": "torch" in sys.modules, **out}))
"""


def run(which, path_r, path_f, k):
    proc = subprocess.run([sys.executable, "-c", CHILD, which, path_r, path_f, str(k)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10_000, help="real and fake features each")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--only", choices=["both", "ours", "prdc"], default="both")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    real = rng.standard_normal((args.n, args.dim), dtype=np.float32)
    fake = (rng.standard_normal((args.n, args.dim), dtype=np.float32) * 1.05 + 0.02).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path_r, path_f = os.path.join(tmp, "real.npy"), os.path.join(tmp, "fake.npy")
        np.save(path_r, real)
        np.save(path_f, fake)
        del real, fake
        names = ["prdc", "ours"] if args.only == "both" else [args.only]
        results = {name: run(name, path_r, path_f, args.k) for name in names}
    print(f"N = M = {args.n:,}, d = {args.dim}, k = {args.k}")
    for name, r in results.items():
        print(f"  {name:5s} {r['seconds']:8.1f} s  peak RSS {r['peak_rss_mib']:8.0f} MiB "
              f"(after imports + features {r['before_rss_mib']:.0f} MiB, increment {r['increment_mib']:.0f} MiB)  "
              + "  ".join(f"{key}={r[key]:.6f}" for key in ("precision", "recall", "density", "coverage"))
              + f"  torch imported: {r['torch_imported']}")
    if len(results) == 2:
        a, b = results["prdc"], results["ours"]
        print(f"  speed-up x{a['seconds'] / b['seconds']:.2f}, peak RSS ratio ours/prdc "
              f"{b['peak_rss_mib'] / a['peak_rss_mib']:.3f}, increment ratio "
              f"{b['increment_mib'] / a['increment_mib']:.3f}, identical values: "
              f"{all(a[key] == b[key] for key in ('precision', 'recall', 'density', 'coverage'))}")


if __name__ == "__main__":
    main()
