"""Shared pieces of the monitor tests: sklearn digits, samplers with known diversity, a fast
extractor (the 8x8 pixels themselves), a tiny diffusers pipeline. Not a test module."""

from __future__ import annotations

import functools

import torch

from irs_callbacks.samplers import Sampler


@functools.lru_cache(maxsize=1)
def digits():
    """(images [1797, 1, 8, 8] float in [0, 1], labels [1797])."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.from_numpy(d.images).float().div(16).unsqueeze(1), torch.from_numpy(d.target)


def split(n_train: int = 1200, seed: int = 0):
    """Disjoint (train indices, held-out indices) of the digits."""
    x, _ = digits()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return perm[:n_train], perm[n_train:]


def pixels(images):
    """Fast extractor: the (RGB-expanded) pixels as features."""
    return images.flatten(1)


class PoolSampler(Sampler):
    """Real digits from ``pool`` (indices into the digits): sample i is ``pool[i]`` (without
    replacement), or a pool entry drawn with sample i's own generator (with replacement)."""

    def __init__(self, pool, replace: bool, value_range=(0.0, 1.0)):
        self.pool, self.replace, self.value_range = torch.as_tensor(pool), replace, value_range
        self.calls = 0

    def generate(self, indices, generators):
        self.calls += 1
        x, _ = digits()
        if self.replace:
            rows = [int(torch.randint(len(self.pool), (1,), generator=g)) for g in generators]
        else:
            rows = indices
        images = x[self.pool[rows]]
        lo, hi = self.value_range
        return images * (hi - lo) + lo


class NaNSampler(PoolSampler):
    """Like PoolSampler, but every ``every``-th global sample is NaN (and one is +Inf)."""

    def __init__(self, pool, every: int = 10):
        super().__init__(pool, replace=True)
        self.every = every

    def generate(self, indices, generators):
        images = super().generate(indices, generators).clone()
        for j, i in enumerate(indices):
            if i % self.every == 0:
                images[j] = float("nan") if i % (2 * self.every) == 0 else float("inf")
        return images


def classes(labels_wanted, pool):
    _, y = digits()
    pool = torch.as_tensor(pool)
    keep = torch.zeros(len(pool), dtype=torch.bool)
    for c in labels_wanted:
        keep |= y[pool] == c
    return pool[keep]


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)


def tiny_pipeline(seed: int = 0, unet=None):
    from diffusers import DDIMPipeline, DDIMScheduler

    return DDIMPipeline(unet=unet if unet is not None else tiny_unet(seed), scheduler=DDIMScheduler(num_train_timesteps=100))


def make_monitor(log_dir=None, *, bank=None, train=None, images=False, tensorboard=True, seed=0, fixed_noise=True,
                 **kwargs):
    """An IRSMonitor on the training digits (pixel features), without image logging by default.
    ``bank``: a ready ReferenceBank instead of the training digits; other keyword arguments go to
    IRSMonitor (num_samples 500 and batch_size 50 unless given)."""
    from irs_callbacks import IRSMonitor
    from irs_callbacks.monitor import MonitorOptions, ReferenceConfig

    x, _ = digits()
    train_indices, _ = split()
    if bank is not None:
        reference = ReferenceConfig(bank=bank, extractor=pixels)
    else:
        reference = ReferenceConfig(train_data=x[train_indices] if train is None else train, extractor=pixels,
                                    progress=False)
    kwargs.setdefault("num_samples", 500)
    kwargs.setdefault("batch_size", 50)
    options = MonitorOptions(log_images=images, tensorboard=tensorboard, seed=seed, fixed_noise=fixed_noise)
    return IRSMonitor(reference=reference, log_dir=log_dir, options=options, **kwargs)
