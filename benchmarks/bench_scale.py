"""ImageNet-scale harness: reference-bank set-up and IRSMonitor evaluations of simulated models
whose true coverage is known.

Data (seeded): training features ``N x d`` Gaussian; held-out real features = noisy copies of
random training rows. A "model" of coverage c draws every sample from a fixed random subset of
``c N`` training rows (the row is encoded in a 1-pixel "image"); a custom extractor maps the image
back to that row's features plus noise (far smaller than the distance between rows), so each
sample retrieves its source row, the true IRS_inf is c, and after n valid samples
``E[N_learned] = m (1 - (1 - 1/m)^n)`` exactly (m = c N distinct rows drawn uniformly).

Printed: set-up timings (``ReferenceBank.from_features`` with its parts, the monitor's first
evaluation), each evaluation's verdict, samples used, N_learned against its exact expectation,
retrieval TFLOP/s (2 n N d / seconds, both the monitor's retrieval time and a bare
``FeatureBank.search`` of the same samples) and their fraction of a bare matrix product of the
same shape (bfloat16 on CUDA, float32 on CPU) timed in the same run.

    python benchmarks/bench_scale.py                          # CPU, N = 20,000 (under 2 minutes)
    python benchmarks/bench_scale.py --device cuda            # N = 1,281,166, budget 50,000, batches of 5,000

The monitor is used only through its public API (``IRSMonitor(model, reference=ReferenceConfig(bank=,
extractor=), num_samples=, batch_size=, target_irs=, log_dir=, options=MonitorOptions(device=))``,
``evaluate()`` and ``close()``), logging into a temporary folder so that nothing litters the repository.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import torch

from irs_callbacks import IRSMonitor, MonitorOptions, ReferenceBank, ReferenceConfig
from irs_callbacks.reference import measure_real
from irs_callbacks.retrieval import FeatureBank
from irs_callbacks.samplers import Sampler

IMAGENET = 1_281_166


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def make_features(n, d, device, seed):
    """Gaussian ``[n, d]`` float32 on the CPU, generated in chunks on ``device``."""
    out = torch.empty(n, d, dtype=torch.float32)
    g = torch.Generator(device=device).manual_seed(seed)
    step = max(1, 2 ** 24 // d)
    for s in range(0, n, step):
        out[s:s + step] = torch.randn(min(step, n - s), d, generator=g, device=device).cpu()
    return out


class CoverageModel(Sampler):
    """Draws from a fixed random subset of ``coverage * N`` training rows; sample i uses its own
    generator, so the draws do not depend on batch sizes or process counts."""

    def __init__(self, n_train, coverage, seed):
        g = torch.Generator().manual_seed(seed)
        self.n_train = n_train
        self.rows = torch.randperm(n_train, generator=g)[: max(1, round(coverage * n_train))]

    def generate(self, indices, generators):
        picks = torch.tensor([int(torch.randint(len(self.rows), (1,), generator=gen)) for gen in generators])
        rows = self.rows[picks]
        return ((rows.double() + 0.5) / self.n_train).float().view(-1, 1, 1, 1)  # one pixel in [0, 1]


class RowExtractor:
    """Maps a 1-pixel image back to its training row's features plus Gaussian noise."""

    def __init__(self, train, noise, seed):
        self.train, self.noise, self.seed = train, noise, seed
        self.generator = None

    def __call__(self, images):
        rows = (images[:, 0, 0, 0].double() * self.train.shape[0]).floor().long().clamp(0, self.train.shape[0] - 1)
        feats = self.train[rows.cpu()].to(images.device)
        if self.generator is None or self.generator.device != images.device:
            self.generator = torch.Generator(device=images.device).manual_seed(self.seed)
        return feats + self.noise * torch.randn(feats.shape, generator=self.generator, device=images.device)


def bare_product_tflops(n_queries, n_train, d, device, chunk, repeats=2):
    """TFLOP/s of ``[n, d] @ [d, N]`` in bfloat16 (CUDA) or float32 (CPU), in row chunks of N."""
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    a = torch.randn(n_queries, d, device=device, dtype=dtype)
    b = torch.randn(min(chunk, n_train), d, device=device, dtype=dtype)
    full, rest = divmod(n_train, b.shape[0])

    def run():
        for _ in range(full):
            a @ b.T
        if rest:
            a @ b[:rest].T

    run()
    best = min(timed(run, device)[0] for _ in range(repeats))
    return 2 * n_queries * n_train * d / best / 1e12, dtype


def expected_learned(m, n):
    """E[distinct rows] after n uniform draws from m rows."""
    return m * -math.expm1(n * math.log1p(-1 / m)) if m > 1 else float(n > 0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=None, help="training rows (default 20,000 on CPU, 1,281,166 on CUDA)")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--budget", type=int, default=None, help="samples per evaluation (default 2,000 CPU / 50,000 CUDA)")
    p.add_argument("--batch", type=int, default=None, help="samples per round (default 500 CPU / 5,000 CUDA)")
    p.add_argument("--heldout", type=int, default=None, help="held-out real features (default min(N/4, 50,000))")
    p.add_argument("--coverage", type=float, nargs="+", default=[1.0, 0.85, 0.5, 0.1])
    p.add_argument("--target", type=float, default=0.8)
    p.add_argument("--screen", default=None,
                   help="screen dtype of the set-up parts and the bare search (default: the device's); the monitor "
                        "always uses the device's default screen")
    p.add_argument("--noise", type=float, default=0.05, help="noise per dimension (rows are ~sqrt(2d) apart)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    n = args.n or (IMAGENET if cuda else 20_000)
    d = args.dim
    budget = args.budget or (50_000 if cuda else 2_000)
    batch = args.batch or (5_000 if cuda else 500)
    n_held = args.heldout or min(n // 4, 50_000)
    options = {} if args.screen is None else {"screen_dtype": args.screen}
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device {device} ({name}); N = {n:,}, d = {d}, held-out {n_held:,}, budget {budget:,}, "
          f"batches of {batch:,}, target IRS {args.target}", flush=True)

    t_data = time.perf_counter()
    train = make_features(n, d, device, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    held_rows = torch.randint(n, (n_held,), generator=g)
    held = train[held_rows] + args.noise * torch.randn(n_held, d, generator=g)
    print(f"data: {time.perf_counter() - t_data:.1f} s (not part of any timing below)", flush=True)

    # set-up, part by part (the same public steps from_features takes), then from_features itself
    t_init, ref = timed(lambda: ReferenceBank(train), device)
    t_bank, bank = timed(lambda: ref.bank(device=device, **options), device)
    t_real, _ = timed(lambda: measure_real(train, held, bank=bank), device)
    t_dup, dup = timed(lambda: bank.duplicate_count, device)
    print(f"set-up parts: ReferenceBank checks {t_init:.2f} s, FeatureBank on {device} {t_bank:.2f} s "
          f"({bank.screen_dtype}, screen {bank.screen_bytes / 2**30:.2f} GiB, master on {bank.master_device}), "
          f"real measurement ({n_held:,} queries) {t_real:.2f} s, duplicate count {t_dup:.2f} s ({dup})", flush=True)
    del ref, bank
    t_from, ref = timed(lambda: ReferenceBank.from_features(train, reference_features=held, device=device), device)
    print(f"set-up: ReferenceBank.from_features {t_from:.2f} s; real IRS_inf {ref.real.estimate:.4f} "
          f"[{ref.real.lower:.4f}, {ref.real.upper:.4f}]", flush=True)

    tflops_bare, bare_dtype = bare_product_tflops(batch, n, d, device, chunk=32768 if cuda else 8192)
    print(f"bare {bare_dtype} matrix product [{batch:,} x {d}] @ [{d} x {n:,}]: {tflops_bare:.2f} TFLOP/s", flush=True)

    extractor = RowExtractor(train, args.noise, args.seed + 2)
    workdir = tempfile.mkdtemp(prefix="bench_scale_")
    here = os.getcwd()
    os.chdir(workdir)
    try:
        for i, coverage in enumerate(args.coverage):
            model = CoverageModel(n, coverage, args.seed + 10 + i)
            monitor = IRSMonitor(model, reference=ReferenceConfig(bank=ref, extractor=extractor), num_samples=budget,
                                 batch_size=batch, target_irs=args.target, log_dir=workdir,
                                 options=MonitorOptions(device=device, tensorboard=False, log_images=False))
            t_eval, result = timed(lambda: monitor.evaluate(step=None), device)
            monitor.close()
            m = len(model.rows)
            valid = result.samples_used
            expect = expected_learned(m, valid)
            var = m * (1 - 1 / m) ** valid + m * (m - 1) * (1 - 2 / m) ** valid - m * m * (1 - 1 / m) ** (2 * valid)
            t_ret = result.timing.get("retrieval", float("nan"))
            tflops = 2 * valid * n * d / t_ret / 1e12 if t_ret > 0 else float("nan")
            # the same samples through a bare FeatureBank.search (no sampling/extraction/statistics)
            feats = extractor(model.sample(list(range(valid)), result.seed).to(device))
            fbank = ref.bank(device=device, **options)
            fbank.search(feats[:batch])
            t_search = 0.0
            for s in range(0, valid, batch):
                t, _ = timed(lambda s=s: fbank.search(feats[s:s + batch]), device)
                t_search += t
            tflops_search = 2 * valid * n * d / t_search / 1e12
            adjusted = "n/a" if result.adjusted is None else f"{result.adjusted:.3f}"
            estimate = "n/a" if result.estimate is None else f"{result.estimate.estimate:.3f}"
            print(f"coverage {coverage:.2f}: {'first ' if i == 0 else ''}evaluation {t_eval:.2f} s -> "
                  f"{result.verdict} ({result.rule}), samples {valid:,}/{budget:,}, N_learned {result.n_learned:,} "
                  f"vs expected {expect:,.1f} +- {math.sqrt(max(var, 0)):.1f}, IRS_inf {estimate}, adjusted {adjusted}",
                  flush=True)
            print(f"    retrieval in the monitor {t_ret:.3f} s = {tflops:.2f} TFLOP/s ({tflops / tflops_bare:.1%} of the "
                  f"bare product); bare FeatureBank.search {t_search:.3f} s = {tflops_search:.2f} TFLOP/s "
                  f"({tflops_search / tflops_bare:.1%})", flush=True)
    finally:
        os.chdir(here)


if __name__ == "__main__":
    main()
