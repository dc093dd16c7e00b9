"""Benchmark of IRSMonitor evaluations on sklearn digits (CPU friendly).

1. Time split of one evaluation with the example's settings (extractor, budget, batch size), as
   fractions of the evaluation: sampling, feature extraction, and the monitor's own share
   (retrieval + statistics + logging on the training loop's thread; the TensorBoard images,
   histogram and saved evaluation run on a background thread, timed separately). Two samplers: (a) the example's DDIM pipeline on its
   (untrained) UNet -- rejected early, as in the example; (b) a "diverse model" that pays the same
   DDIM sampling cost but returns held-out real digits -- it uses (nearly) the whole budget.
2. Samples used to reach a verdict, against the full budget, for samplers of known diversity:
   real held-out digits (without replacement), real digits of 5, 2 and 1 classes, one image.

    python benchmarks/bench_monitor.py                  # example settings
    python benchmarks/bench_monitor.py --extractor-input-size 299 --budget 1000
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from irs_callbacks import IRSMonitor, MonitorOptions, PipelineSampler, ReferenceConfig
from irs_callbacks.samplers import Sampler


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--extractor", default="random-inception")
    p.add_argument("--extractor-input-size", type=int, default=75)
    p.add_argument("--budget", type=int, default=600, help="samples per evaluation (example default)")
    p.add_argument("--batch-size", type=int, default=100, help="samples per round (example default)")
    p.add_argument("--num-inference-steps", type=int, default=10)
    p.add_argument("--target-irs", type=float, default=0.8)
    p.add_argument("--repeats", type=int, default=1, help="timed evaluations (after one warm-up)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--no-images", action="store_true", help="log_images=False (scalars + histogram only)")
    return p.parse_args()


def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.from_numpy(d.images).float().div(16).unsqueeze(1), torch.from_numpy(d.target)


class Pool(Sampler):
    """Real digits from ``pool``: index i -> pool[i] (without replacement) or a seeded draw."""

    def __init__(self, images, replace):
        self.images, self.replace = images, replace

    def generate(self, indices, generators):
        if not self.replace:
            return self.images[torch.as_tensor(indices) % len(self.images)]
        return self.images[[int(torch.randint(len(self.images), (1,), generator=g)) for g in generators]]


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    x, y = digits()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, held = perm[:1197], perm[1197:]  # 600 held-out digits: the budget, without replacement
    extractor_options = {"input_size": args.extractor_input_size} if args.extractor_input_size else {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        monitor = IRSMonitor(reference=ReferenceConfig(train_data=x[train], extractor=args.extractor,
                                                       extractor_options=extractor_options, progress=False),
                             num_samples=args.budget, batch_size=args.batch_size, target_irs=args.target_irs,
                             log_dir=tmp, options=MonitorOptions(log_images=not args.no_images))
        bank = monitor.prepare()
        print(f"reference bank: N_train={bank.n_train}, real IRS_inf={bank.real}, built in "
              f"{time.perf_counter() - t0:.1f} s ({args.extractor}, input {args.extractor_input_size})")

        # 1. time split with the example's sampler cost
        torch.manual_seed(0)
        unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
                           norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D"))
        pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000))
        pipe.set_progress_bar_config(disable=True)

        class DiverseAtPipelineCost(Pool):
            def generate(self, indices, generators):
                pipe(batch_size=len(indices), generator=generators, num_inference_steps=args.num_inference_steps,
                     output_type="pt")
                return super().generate(indices, generators)

        print(f"\n1. time split of one evaluation (budget {args.budget}, rounds of {args.batch_size}, "
              f"{args.num_inference_steps} DDIM steps; mean of {args.repeats} after a warm-up):")
        for name, sampler in [("(a) example UNet (untrained)", PipelineSampler(pipe, num_inference_steps=args.num_inference_steps)),
                              ("(b) diverse, same sampling cost", DiverseAtPipelineCost(x[held], False))]:
            monitor.evaluate(sampler, step=0)  # warm-up
            rows, background = [], 0.0
            for r in range(args.repeats):
                rows.append(monitor.evaluate(sampler, step=r + 1))
                before = monitor.display_seconds
                monitor.flush()  # TensorBoard images etc., run on the worker thread
                background += (monitor.display_seconds - before) / args.repeats
            t = {k: sum(r.timing[k] for r in rows) / len(rows) for k in rows[0].timing}
            used = rows[-1].samples_used
            print(f"   {name}: {rows[-1].verdict} after {used} samples, {t['total']:.3f} s per evaluation")
            for key in ("sampling", "features", "monitor", "retrieval", "logging"):
                print(f"      {key:<9} {t[key]:7.3f} s  {t[key] / t['total']:6.1%}"
                      + ("   (part of monitor)" if key in ("retrieval", "logging") else ""))
            print(f"      background logging {background:.3f} s on the worker thread "
                  f"({background / t['total']:.1%} of the evaluation if it ran in the loop)")

        # 2. samples used against the budget
        print(f"\n2. samples used to reach the verdict (budget {args.budget}, target_irs {args.target_irs}):")
        cases = [("held-out real digits, no replacement", Pool(x[held], False)),
                 ("real digits of 5 classes", Pool(x[held][y[held] < 5], True)),
                 ("real digits of 2 classes", Pool(x[held][y[held] < 2], True)),
                 ("real digits of 1 class", Pool(x[held][y[held] == 0], True)),
                 ("a single image", Pool(x[held][:1], True))]
        if args.budget > len(held):
            print(f"   (budget {args.budget} > {len(held)} held-out digits: the real sampler repeats them)")
        for name, sampler in cases:
            res = monitor.evaluate(sampler)
            adj = "n/a" if res.adjusted is None else f"{res.adjusted:.3f}"
            print(f"   {name:<38} {res.verdict:<6} ({str(res.rule):<13}) {res.samples_used:>5}/{res.budget} "
                  f"= {res.samples_used / res.budget:6.1%}  N_learned {res.n_learned:>4}  adjusted {adj}")


if __name__ == "__main__":
    main()
