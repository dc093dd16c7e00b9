"""N3 rejection sampling (detailed-balance paper, Algorithm 1) on a diffusion model trained on digits.

Takes the UNet left by the README's main command (``examples/train_unconditional.py`` writes
``runs/digits/unet``), draws ``--num-seeds`` DDIM samples once, runs the N3 sampler over them in
one feature space (the "selection" space) and compares the accepted samples with plain sampling
of the same count, in a *different* feature space (the "evaluation" space, a differently seeded
random Inception), so that selecting in a space does not trivially improve scores measured in it
(the paper makes the same point with DINO vs Inception, its Fig. 6). Reports IRS_inf,a with its
interval, FID against the training digits, and coverage. Random-Inception features are huge
(norms ~1e8: untrained batch norms pass activations through), so FID is computed on features
divided by one constant per space, the training features' mean per-dimension standard deviation
(FID scales by its square; no ranking changes).

    python examples/train_unconditional.py --output-dir runs/digits
    python benchmarks/n3_on_digits.py --unet runs/digits/unet
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel
from sklearn.datasets import load_digits

from diadm.n3 import N3RejectionSampler
from irs_callbacks.features import extract_features, get_extractor
from irs_callbacks.metrics import fid
from irs_callbacks.reference import ReferenceBank
from irs_callbacks.samplers import Sampler


class CachedSampler(Sampler):
    """Serves images generated once, by seed (= index), so N3 and plain sampling see the same draws."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def generate(self, indices, generators):
        return self.images[torch.as_tensor(indices)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet", default="runs/digits/unet", help="UNet2DModel directory (save_pretrained)")
    parser.add_argument("--num-seeds", type=int, default=4000, help="pool of generated samples")
    parser.add_argument("--inference-steps", type=int, default=25)
    parser.add_argument("--input-size", type=int, default=75, help="random-inception input size")
    parser.add_argument("--batch-size", type=int, default=500)
    args = parser.parse_args()
    torch.manual_seed(0)

    digits = torch.from_numpy(load_digits().images).float().div(16).unsqueeze(1)  # [1797, 1, 8, 8] in [0, 1]
    unet = UNet2DModel.from_pretrained(args.unet).eval()
    schedule = Path(args.unet).parent / "scheduler"  # the noise schedule the example trained with, saved beside
    scheduler = (DDIMScheduler.from_config(DDIMScheduler.load_config(schedule)) if schedule.is_dir()
                 else DDIMScheduler(num_train_timesteps=1000))
    pipe = DDIMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)

    start = time.perf_counter()
    chunks = []
    for lo in range(0, args.num_seeds, args.batch_size):
        seeds = range(lo, min(lo + args.batch_size, args.num_seeds))
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        with torch.no_grad():
            chunks.append(_pipe_pt(pipe, generators, args.inference_steps))
    images = torch.cat(chunks)
    print(f"generated {len(images)} samples in {time.perf_counter() - start:.0f} s")

    select = get_extractor("random-inception", input_size=args.input_size, device="cpu")
    evaluate = get_extractor("random-inception", input_size=args.input_size, seed=1, device="cpu")
    train_select = extract_features(select, digits, batch_size=args.batch_size, progress=False)

    n3 = N3RejectionSampler(train_select, extractor=select, device="cpu")
    result = n3.run(CachedSampler(images), range(len(images)), batch_size=args.batch_size, progress=False)
    accepted = result.accepted_seeds
    plain = torch.arange(len(accepted))  # plain sampling: the first seeds, same count
    print(f"N3 accepted {len(accepted)} of {len(images)} samples ({result.acceptance_rate:.1%}); "
          f"{len(images) - result.covered} seeds rejected, {len(digits) - result.covered} training digits uncovered")

    train_eval = extract_features(evaluate, digits, batch_size=args.batch_size, progress=False)
    sample_eval = extract_features(evaluate, images, batch_size=args.batch_size, progress=False)
    sample_select = extract_features(select, images, batch_size=args.batch_size, progress=False)
    rows = []
    for space, train_f, sample_f in (("evaluation (random-inception seed 1)", train_eval, sample_eval),
                                     ("selection (random-inception seed 0)", train_select, sample_select)):
        reference = ReferenceBank.from_features(train_f, distance="euclidean")
        scale = train_f.std(dim=0).mean()
        for name, idx in (("plain sampling", plain), ("N3 accepted", accepted)):
            score = reference.score(sample_f[idx])
            rows.append((space, name, len(idx), score, fid(train_f / scale, sample_f[idx] / scale)))

    print()
    print("| feature space | samples | n | N_learned | IRS_inf [bounds] | IRS_inf,a | FID vs training digits (scaled) |")
    print("|---|---|---|---|---|---|---|")
    for space, name, n, score, fid_value in rows:
        print(f"| {space} | {name} | {n} | {score.n_learned} | {score.irs_inf} | {score.adjusted:.3f} | {fid_value:.2f} |")


def _pipe_pt(pipe, generators, steps) -> torch.Tensor:
    """Images in [0, 1], NCHW, one per generator."""
    out = pipe(batch_size=len(generators), generator=generators, num_inference_steps=steps, output_type="np").images
    return torch.from_numpy(out).permute(0, 3, 1, 2).float()


if __name__ == "__main__":
    main()
