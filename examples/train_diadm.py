"""Train a small DiADM (feature-conditioned diffusion model) on sklearn's digits, on a CPU, in a few minutes.

    python examples/train_diadm.py                   # DiADM + detailed-balance timesteps + IRSMonitor
    python examples/train_diadm.py --unconditional --timesteps uniform --steps 400 --out runs/uncond

What it shows:
- pseudo-labels: every training image's features (random Inception v3 at 75x75, the library's default
  extractor at a CPU-friendly size) are computed once by ``PseudoLabelDataset`` and cached as a reference bank;
- the detailed-balance noise levels replace diffusers' uniform timesteps (two lines, marked "DiADM:");
- condition dropout (p = 0.1) so the same model also samples unconditionally / with guidance;
- ``IRSMonitor`` watches diversity during training, using the same bank as reference (lines marked "IRS:");
- the trained ``DiADMPipeline`` (model, scheduler, feature bank) is saved with ``save_pretrained``.

Data: 1,797 8x8 grey digits (values 0..16) scaled to [-1, 1]. Model: UNet2DModel (32, 64) channels, no attention,
about 1.2 M parameters with the feature projection.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def load_digits_tensor() -> torch.Tensor:
    """The sklearn digits as float32 [1797, 1, 8, 8] in [0, 1]."""
    from sklearn.datasets import load_digits

    return torch.from_numpy(load_digits().images).float().div(16.0).unsqueeze(1)


UNET_CONFIG = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=1,
                   down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                   norm_num_groups=8)
EXTRACTOR, EXTRACTOR_OPTIONS = "random-inception", {"input_size": 75}


def build_dataset(images: torch.Tensor, cache_dir: str, progress: bool = True):
    """PseudoLabelDataset over (images in [-1, 1]) with features of the [0, 1] images, cached in cache_dir."""
    from torch.utils.data import TensorDataset

    from diadm import PseudoLabelDataset

    return PseudoLabelDataset(TensorDataset(images * 2 - 1), EXTRACTOR, feature_source=images, value_range=(0, 1),
                              cache_dir=cache_dir, device="cpu", progress=progress, **EXTRACTOR_OPTIONS)


def train(dataset, *, steps: int = 1500, batch_size: int = 64, lr: float = 2e-3, timesteps: str = "detailed-balance",
          unconditional: bool = False, condition_dropout: float = 0.1, seed: int = 0, monitor=None,
          log_every: int = 100):
    """Train a DiADMUNet2DModel on ``dataset`` (PseudoLabelDataset items); returns (pipeline, seconds).

    ``unconditional=True`` trains the same architecture on the zero condition only (a plain unconditional model
    of exactly the same size); ``timesteps`` is "uniform" (diffusers' default) or "detailed-balance".
    """
    from diffusers import DDIMScheduler, DDPMScheduler

    from diadm import DetailedBalanceNoiseSampler, DiADMPipeline, DiADMUNet2DModel

    torch.manual_seed(seed)
    model = DiADMUNet2DModel(unet_config=UNET_CONFIG, feature_dim=dataset.feature_dim, feature_mean=dataset.feature_mean)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    noise_sampler = DetailedBalanceNoiseSampler()  # DiADM: detailed-balance noise levels (line 1 of 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 100))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(seed))
    pipeline = DiADMPipeline(model, DDIMScheduler.from_config(noise_scheduler.config), dataset.bank.features)
    pipeline.set_progress_bar_config(disable=True)
    sampler = pipeline.as_irs_sampler(num_inference_steps=25)  # conditions fixed per sample index
    if unconditional:  # the unconditional model samples under the zero condition
        def sampler(n, generator):
            zeros = torch.zeros(n, dataset.feature_dim)
            return pipeline(batch_size=n, conditions=zeros, generator=generator, num_inference_steps=25,
                            output_type="pt").images
    gen = torch.Generator().manual_seed(seed + 1)
    step, started, running = 0, time.perf_counter(), 0.0
    while step < steps:
        for batch in loader:
            clean, features = batch["image"], batch["features"]
            noise = torch.randn(clean.shape, generator=gen)
            bsz = clean.shape[0]
            if timesteps == "uniform":
                t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), generator=gen)
            else:
                t = noise_sampler.sample_timesteps(bsz, noise_scheduler, generator=gen)  # DiADM: line 2 of 2
            noisy = noise_scheduler.add_noise(clean, noise, t)
            if unconditional:
                features = torch.zeros_like(features)
            else:
                features = features * (torch.rand(bsz, 1, generator=gen) >= condition_dropout)  # condition dropout
            model.train()
            pred = model(noisy, t, features).sample
            loss = torch.nn.functional.mse_loss(pred, noise)  # epsilon prediction: loss weight 1 (Eq. 5)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            lr_schedule.step()
            step += 1
            running += loss.item()
            if log_every and step % log_every == 0:
                print(f"step {step:5d}  loss {running / log_every:.4f}  {time.perf_counter() - started:6.1f} s",
                      flush=True)
                running = 0.0
            if monitor is not None:
                model.eval()
                if monitor.step(step, sampler=sampler):  # IRS: once per step; True = stop training
                    print(f"IRSMonitor asked to stop at step {step}")
                    steps = step
            if step >= steps:
                break
    model.eval()
    return pipeline, time.perf_counter() - started


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--timesteps", choices=("detailed-balance", "uniform"), default="detailed-balance")
    parser.add_argument("--unconditional", action="store_true", help="train on the zero condition only")
    parser.add_argument("--no-monitor", action="store_true", help="train without IRSMonitor")
    parser.add_argument("--eval-every", type=int, default=500, help="IRSMonitor evaluation interval (steps)")
    parser.add_argument("--out", default="runs/diadm-digits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this tiny model)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)

    images = load_digits_tensor()
    dataset = build_dataset(images, cache_dir=os.path.join(args.out, "feature_cache"))
    print(f"{len(dataset)} images, pseudo-labels of dimension {dataset.feature_dim}; "
          f"IRS_inf(real) = {dataset.bank.real}")

    monitor = None
    if not args.no_monitor:
        from irs_callbacks import IRSMonitor, MonitorOptions, ReferenceConfig

        monitor = IRSMonitor(  # IRS: the pseudo-label bank is also the reference bank
            reference=ReferenceConfig(bank=dataset.bank, extractor=EXTRACTOR, extractor_options=EXTRACTOR_OPTIONS),
            every_n_steps=args.eval_every, start_step=args.eval_every, num_samples=512, batch_size=256,
            log_dir=os.path.join(args.out, "irs"), options=MonitorOptions(log_images=False, device="cpu"))

    pipeline, seconds = train(dataset, steps=args.steps, batch_size=args.batch_size, timesteps=args.timesteps,
                              unconditional=args.unconditional, seed=args.seed, monitor=monitor)
    print(f"trained {args.steps} steps in {seconds:.0f} s")
    if monitor is not None:
        for record in monitor.history:
            print({k: record.get(k) for k in ("step", "verdict", "n_learned", "estimate", "lower", "upper", "adjusted")})
        monitor.close()
    pipeline.save_pretrained(os.path.join(args.out, "pipeline"))
    images = pipeline(batch_size=64, num_inference_steps=25, generator=torch.Generator().manual_seed(0),
                      output_type="pt").images
    try:
        from torchvision.utils import save_image

        save_image(images, os.path.join(args.out, "samples.png"), nrow=8)
        print(f"samples: {os.path.join(args.out, 'samples.png')}")
    except Exception as error:  # pragma: no cover - image writing is optional
        print(f"could not write samples.png ({error})")


if __name__ == "__main__":
    main()
