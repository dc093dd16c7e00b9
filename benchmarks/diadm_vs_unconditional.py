"""DiADM vs unconditional, uniform vs detailed-balance timesteps: IRS and FID side by side (sklearn digits, CPU).

    python benchmarks/diadm_vs_unconditional.py                 # defaults: 800 steps per arm, ~15-20 min on 2 cores
    python benchmarks/diadm_vs_unconditional.py --steps 200 --samples 512   # quick smoke run

Four arms, identical architecture (DiADMUNet2DModel, the unconditional arms always get the zero condition, so the
parameter count is the same), optimiser, steps, batch size and seed:

    condition in {unconditional, DiADM (pseudo-labels, condition dropout 0.1)} x
    timesteps in {uniform (diffusers' default), detailed-balance (gamma 6, sigma_eps 0.05)}

Each arm draws ``--samples`` images (DDIM, ``--inference-steps``; DiADM with the "cycle" strategy, so every training
instance is used once when samples = N) and is scored against the 1,797 training images in the feature space of the
library's default extractor (random-init Inception v3, here at 75x75 input to fit a CPU):

- IRS_inf with its one-sided 95% bounds, and IRS_inf,a = IRS_inf / IRS_inf(real), with IRS_inf(real) from the
  paper's split of the training set (half queries, half bank); the interval of IRS_inf,a divides IRS_inf's bounds
  by the real point estimate (the real measurement's own uncertainty is not propagated);
- FID between sample and training features (``irs_callbacks.metrics.fid``, float64 mean/covariance, the same
  features as IRS, divided by one common constant -- see ``scaled_fid``). With ~2k samples in 2048 dimensions it is
  biased upwards and only comparable between arms of the same run.

Tiny models trained for minutes: the numbers show the method's direction on toy data, not the paper's results.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _example():
    spec = importlib.util.spec_from_file_location("train_diadm", ROOT / "examples" / "train_diadm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scaled_fid(train_features: torch.Tensor, sample_features: torch.Tensor) -> float:
    """FID (irs_callbacks.metrics.fid, float64) after dividing both feature sets by one constant, the training
    features' mean per-dimension standard deviation: the random-init Inception's raw features have norms ~1e8, so
    raw FIDs are ~1e14; a common scale factor c changes FID by exactly c^2 and no ranking."""
    from irs_callbacks.metrics import fid

    scale = train_features.double().std(0).mean()
    return fid(train_features.double() / scale, sample_features.double() / scale)


def sample_arm(pipeline, n: int, *, unconditional: bool, inference_steps: int, batch: int = 256, seed: int = 0):
    pipeline.reset_cycle(seed)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch):
        b = min(batch, n - start)
        conditions = torch.zeros(b, pipeline.feature_bank.config.feature_dim) if unconditional else None
        out.append(pipeline(batch_size=b, conditions=conditions, condition_strategy="cycle", generator=gen,
                            num_inference_steps=inference_steps, output_type="pt").images)
    return torch.cat(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=None, help="samples per arm (default N = 1797)")
    parser.add_argument("--inference-steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "diadm-bench-cache"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ex = _example()
    from irs_callbacks.features import extract_features, get_extractor

    t0 = time.perf_counter()
    images = ex.load_digits_tensor()
    dataset = ex.build_dataset(images, cache_dir=args.cache_dir, progress=False)
    bank, train_features = dataset.bank, dataset.bank.features
    extractor = get_extractor(ex.EXTRACTOR, device="cpu", **ex.EXTRACTOR_OPTIONS)
    n = args.samples or len(dataset)
    print(f"features: {time.perf_counter() - t0:.0f} s; N = {bank.n_train}, d = {bank.dim}, real = {bank.real}",
          flush=True)

    rows = []
    for unconditional in (True, False):
        for timesteps in ("uniform", "detailed-balance"):
            name = "unconditional" if unconditional else "DiADM"
            pipeline, seconds = ex.train(dataset, steps=args.steps, batch_size=args.batch_size, timesteps=timesteps,
                                         unconditional=unconditional, seed=args.seed, log_every=0)
            t1 = time.perf_counter()
            samples = sample_arm(pipeline, n, unconditional=unconditional, inference_steps=args.inference_steps,
                                 seed=args.seed)
            feats = extract_features(extractor, samples, batch_size=128, value_range=(0, 1), progress=False)
            score = bank.score(feats)
            fid = scaled_fid(train_features, feats)
            rows.append((name, timesteps, seconds, time.perf_counter() - t1, score, fid))
            est = score.irs_inf
            print(f"{name:13s} {timesteps:16s} train {seconds:5.0f} s  IRS_inf {est.estimate:.3f} "
                  f"[{est.lower:.3f}, {est.upper:.3f}]  adjusted {score.adjusted:.3f}  FID {fid:.2f}", flush=True)

    print()
    print(f"Digits (N = {bank.n_train}), {args.steps} steps x batch {args.batch_size} per arm, seed {args.seed}, "
          f"{n} samples per arm, DDIM {args.inference_steps} steps, features: random Inception v3 @75px "
          f"(d = {bank.dim}); {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch threads {args.threads}; total {time.perf_counter() - t0:.0f} s")
    print()
    print("| model | timesteps | IRS_alpha | IRS_inf [95% bounds] | IRS_inf,a [bounds] | FID (same features, scaled) "
          "| train s | sample+score s |")
    print("|---|---|---|---|---|---|---|---|")
    real = bank.real
    for name, timesteps, seconds, eval_s, score, fid in rows:
        est = score.irs_inf
        lo, hi = est.lower / real.estimate, est.upper / real.estimate
        print(f"| {name} | {timesteps} | {score.irs_alpha:.3f} | {est.estimate:.3f} [{est.lower:.3f}, {est.upper:.3f}]"
              f" | {score.adjusted:.3f} [{lo:.3f}, {hi:.3f}] | {fid:.2f} | {seconds:.0f} | {eval_s:.0f} |")
    print(f"| real (held-out half of train) | - | {real.irs_alpha:.3f} | {real.estimate:.3f} "
          f"[{real.lower:.3f}, {real.upper:.3f}] | 1 | - | - | - |")
    return rows


if __name__ == "__main__":
    main()
