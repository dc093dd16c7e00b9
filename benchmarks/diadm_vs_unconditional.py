"""Does feature conditioning (DiADM) make a diffusion model more diverse? Paired arms, several seeds.

    python benchmarks/diadm_vs_unconditional.py                      # CPU: 8x8 digits, 3 seeds per arm
    python benchmarks/diadm_vs_unconditional.py --device cuda        # GPU: 32x32 digits, diffusers' default UNet
    python benchmarks/diadm_vs_unconditional.py --steps 2 --samples 64 --inference-steps 2 --seeds 0   # smoke run

Two arms, everything equal except the condition (IRS paper, Sec. 3.5 and Table 3):

- "unconditional": a ``DiADMUNet2DModel`` that only ever sees the zero condition (the placeholder label of an
  unconditional model: the same parameter count, the feature projection simply unused);
- "DiADM": the same model fed each training image's feature vector (its pseudo-label), with condition dropout
  (``--condition-dropout``, the zero condition); sampled with the "cycle" strategy, so that the N samples use
  every training image's feature exactly once, and ``--guidance-scale`` (1 = plain conditional prediction).

Both arms: the same UNet, initialisation, data order and noise (seed by seed), the detailed-balance noise levels
(gamma 6, sigma_eps 0.05), AdamW, EMA weights (diffusers ``EMAModel`` with warm-up) used for sampling, DDIM with
``--inference-steps`` steps, N samples. Scores, in the space of the library's default extractor (random-init
Inception v3, the same network that gives the pseudo-labels), against all N training images:

- IRS_inf,a = IRS_inf / IRS_inf(real) with the interval of IRS_inf divided by the same real estimate; the real
  measurement is the paper's split of the training set at the samples' sampling rate (``ReferenceBank.score``);
- FID (``irs_callbacks.metrics.fid``, float64) between sample and training features. Until the default extractor
  is calibrated (``"calibration"`` in its identity), its raw features have norms ~1e8, so both feature sets are
  divided by one constant, the training features' mean per-dimension standard deviation, the same for every arm
  and seed (FID scales by exactly its square; rankings do not change). A calibrated extractor's features are
  used as they are. With N ~ 2k samples in d = 2048 FID is biased upwards: compare arms of one run only;
- condition hits: the fraction of samples whose nearest training image is the image whose feature they were
  conditioned on (DiADM's mechanism at work; chance is 1/N; for the unconditional arm the same "cycle" indices
  are used, so its value is the chance level); same digit: the fraction whose nearest training image shows the
  same digit as the conditioning image (chance about 0.1): whether the condition steers at least the class.

Per seed the two arms are paired (same seed); the conclusion is drawn from the paired differences
DiADM - unconditional with a two-sided 95 % Student-t interval over seeds: "higher" / "lower" only when the
interval excludes 0, otherwise "no difference resolved". Intervals of IRS_inf,a cover the sampling
uncertainty of one model only, not the seed-to-seed variation of training.

``--device cuda`` runs the large configuration: 32x32 digits (bilinear), diffusers' default ``UNet2DModel``
(block_out_channels (224, 448, 672, 896), 2 layers per block, attention in the three lower-resolution down
blocks, 274 M parameters), bf16 autocast, the extractor at its full 299 px; ``--time-budget`` (default 330 s
there) caps the training steps, chosen once from a measured step time before any arm runs so that every arm
gets the same steps.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import tempfile
import time

import numpy as np
import torch

SMALL = dict(resolution=8, block_out_channels=(32, 64), layers_per_block=1, attention=False, norm_num_groups=8,
             steps=6000, batch_size=64, learning_rate=2e-3, inference_steps=50, extractor_input_size=75,
             eval_batch_size=256, time_budget=None)
# diffusers' UNet2DModel defaults (block_out_channels, layers_per_block, block types), at 32x32 with 1 channel
LARGE = dict(resolution=32, block_out_channels=(224, 448, 672, 896), layers_per_block=2, attention=True,
             norm_num_groups=32, steps=2000, batch_size=64, learning_rate=1e-4, inference_steps=25,
             extractor_input_size=None, eval_batch_size=256, time_budget=330.0)
ARMS = ("unconditional", "DiADM")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--config", choices=("small", "large"), default=None,
                   help="small: 8x8, (32, 64) UNet; large: 32x32, diffusers' default UNet "
                        "(default: small on cpu, large on cuda)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="training steps per arm (default: the config's)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--ema-decay", type=float, default=0.9999, help="EMAModel max decay (warm-up power 2/3)")
    p.add_argument("--condition-dropout", type=float, default=0.1)
    p.add_argument("--guidance-scale", type=float, default=1.0)
    p.add_argument("--pseudo-labels", choices=("random-inception", "pixels"), default="random-inception",
                   help="the DiADM conditions: the scoring extractor's features (the method), or the raw pixels (a "
                        "condition that pins down the training image; scores stay in the random-Inception space)")
    p.add_argument("--samples", type=int, default=None, help="samples per arm and seed (default N = 1797)")
    p.add_argument("--inference-steps", type=int, default=None, help="DDIM steps (default: the config's)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole run; caps the steps (default: none on cpu, 330 on cuda)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "diadm-bench-cache"))
    p.add_argument("--save-dir", default=None, help="save each arm's EMA pipeline as SAVE_DIR/<arm>-seed<k>")
    return p.parse_args(argv)


def digits(resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 1,797 digits as float32 [N, 1, r, r] in [0, 1] (bilinear when r != 8), and their labels [N]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.from_numpy(data.images).float().div(16.0).unsqueeze(1)
    if resolution != 8:
        x = torch.nn.functional.interpolate(x, size=resolution, mode="bilinear", align_corners=False).clamp(0, 1)
    return x, torch.from_numpy(data.target)


def unet_config(cfg: dict) -> dict:
    n = len(cfg["block_out_channels"])
    down = ["DownBlock2D"] + ["AttnDownBlock2D" if cfg["attention"] else "DownBlock2D"] * (n - 1)
    up = ["AttnUpBlock2D" if cfg["attention"] else "UpBlock2D"] * (n - 1) + ["UpBlock2D"]
    return dict(sample_size=cfg["resolution"], in_channels=1, out_channels=1, layers_per_block=cfg["layers_per_block"],
                block_out_channels=tuple(cfg["block_out_channels"]), down_block_types=tuple(down),
                up_block_types=tuple(up), norm_num_groups=cfg["norm_num_groups"])


def fid_on_features(identity: dict, train_features: torch.Tensor, sample_features: torch.Tensor) -> float:
    """FID of the extractor's features; uncalibrated random-Inception features (no ``"calibration"`` in the
    extractor identity) are first divided by the training features' mean per-dimension standard deviation."""
    from irs_callbacks.metrics import fid

    train, samples = train_features.double(), sample_features.double()
    if identity.get("name") == "random-inception" and "calibration" not in identity:
        scale = train.std(0).mean()
        train, samples = train / scale, samples / scale
    return fid(train, samples)


class Run:
    """One training + evaluation of one arm and seed."""

    def __init__(self, args, cfg, dataset, device):
        self.args, self.cfg, self.dataset, self.device = args, cfg, dataset, device
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None

    def _ctx(self):
        import contextlib

        return self.autocast if self.autocast is not None else contextlib.nullcontext()

    def build(self, arm: str, seed: int):
        from diffusers import DDPMScheduler
        from diffusers.training_utils import EMAModel

        from diadm import DetailedBalanceNoiseSampler, DiADMUNet2DModel

        torch.manual_seed(seed)  # the same initial weights in both arms
        dropout = self.args.condition_dropout if arm == "DiADM" else 0.0
        model = DiADMUNet2DModel(unet_config=unet_config(self.cfg), feature_dim=self.dataset.feature_dim,
                                 condition_dropout=dropout, feature_mean=self.dataset.feature_mean).to(self.device)
        self.model, self.arm, self.seed = model, arm, seed
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
        self.noise_sampler = DetailedBalanceNoiseSampler()
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=self.cfg["learning_rate"], weight_decay=0.0)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / 100))
        self.ema = EMAModel(model.parameters(), decay=self.args.ema_decay, use_ema_warmup=True, power=2 / 3)
        self.loader = torch.utils.data.DataLoader(self.dataset, batch_size=self.cfg["batch_size"], shuffle=True,
                                                  drop_last=True, generator=torch.Generator().manual_seed(seed))
        self.gen = torch.Generator().manual_seed(seed + 1)
        return self

    def train(self, steps: int) -> float:
        model, started, step = self.model, time.perf_counter(), 0
        model.train()
        while step < steps:
            for batch in self.loader:
                clean = batch["image"].to(self.device)
                features = batch["features"].to(self.device)
                if self.arm == "unconditional":
                    features = torch.zeros_like(features)
                noise = torch.randn(clean.shape, generator=self.gen).to(self.device)
                t = self.noise_sampler.sample_timesteps(clean.shape[0], self.noise_scheduler, generator=self.gen)
                noisy = self.noise_scheduler.add_noise(clean, noise, t.to(self.device))
                with self._ctx():
                    pred = model(noisy, t.to(self.device), features).sample
                loss = torch.nn.functional.mse_loss(pred.float(), noise)  # epsilon error: weight 1 (Eq. 5)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                self.optimizer.step()
                self.lr_schedule.step()
                self.ema.step(model.parameters())
                step += 1
                if step >= steps:
                    break
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    def save(self, path: str) -> None:
        """The EMA weights as a ``DiADMPipeline`` (DDIM scheduler, the training features as its bank)."""
        from diffusers import DDIMScheduler

        from diadm import DiADMPipeline

        self.ema.store(self.model.parameters())
        self.ema.copy_to(self.model.parameters())
        try:
            DiADMPipeline(self.model, DDIMScheduler.from_config(self.noise_scheduler.config),
                          self.dataset.bank.features).save_pretrained(path)
        finally:
            self.ema.restore(self.model.parameters())

    def sample(self, n: int, inference_steps: int):
        """n images in [0, 1] with the EMA weights; returns (images, condition indices of the cycle)."""
        from diffusers import DDIMScheduler

        from diadm import DiADMPipeline

        self.ema.store(self.model.parameters())
        self.ema.copy_to(self.model.parameters())
        self.model.eval()
        pipe = DiADMPipeline(self.model, DDIMScheduler.from_config(self.noise_scheduler.config),
                             self.dataset.bank.features)
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        pipe.reset_cycle(self.seed)
        gen = torch.Generator(device=self.device).manual_seed(self.seed)
        images, indices = [], []
        try:
            for start in range(0, n, self.cfg["eval_batch_size"]):
                b = min(self.cfg["eval_batch_size"], n - start)
                index, conditions = pipe.draw_conditions(b, "cycle")  # both arms walk the same cycle
                if self.arm == "unconditional":
                    conditions = torch.zeros_like(conditions)
                with self._ctx():
                    out = pipe(batch_size=b, conditions=conditions, generator=gen, num_inference_steps=inference_steps,
                               guidance_scale=self.args.guidance_scale if self.arm == "DiADM" else 1.0,
                               output_type="pt").images
                images.append(out.float().cpu())
                indices.append(index)
        finally:
            self.ema.restore(self.model.parameters())
        return torch.cat(images), torch.cat(indices)


def t_interval(values, level=0.95):
    """(mean, half-width) of a two-sided Student-t interval over seeds (half-width nan for one value)."""
    from scipy.stats import t

    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), float(t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


def verdict(diff_mean: float, half: float, higher_is: str, lower_is: str) -> str:
    if not math.isfinite(half):
        return "one seed: no interval"
    if diff_mean - half > 0:
        return higher_is
    if diff_mean + half < 0:
        return lower_is
    return "no difference resolved"


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = dict(SMALL if (args.config or ("small" if device.type == "cpu" else "large")) == "small" else LARGE)
    for key in ("steps", "batch_size", "learning_rate", "inference_steps", "time_budget"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    from diadm import PseudoLabelDataset
    from irs_callbacks.features import extract_features, get_extractor

    t0 = time.perf_counter()
    images, labels = digits(cfg["resolution"])
    options = {"input_size": cfg["extractor_input_size"]} if cfg["extractor_input_size"] else {}
    extractor = get_extractor("random-inception", device=device, **options)
    dataset = PseudoLabelDataset(torch.utils.data.TensorDataset(images * 2 - 1), extractor, feature_source=images,
                                 value_range=(0, 1), cache_dir=args.cache_dir, device=device, progress=False)
    bank = dataset.bank  # the scoring space
    if args.pseudo_labels == "pixels":
        from irs_callbacks.reference import ReferenceBank

        pixels = ReferenceBank.from_features(images.flatten(1), extractor_identity={"name": "pixels"}, measure=False)
        dataset = PseudoLabelDataset(dataset.dataset, bank=pixels)
    n = args.samples or len(dataset)
    print(f"features: {time.perf_counter() - t0:.0f} s; N = {bank.n_train}, d = {bank.dim}, real = {bank.real}",
          flush=True)

    steps = cfg["steps"]
    if cfg["time_budget"]:  # choose the steps once, from a measured step and sampling time
        probe = Run(args, cfg, dataset, device).build("DiADM", args.seeds[0])
        probe.train(3)
        step_s = probe.train(10) / 10
        t1 = time.perf_counter()
        probe.sample(min(n, cfg["eval_batch_size"]), cfg["inference_steps"])
        sample_s = (time.perf_counter() - t1) * n / min(n, cfg["eval_batch_size"]) * 1.5  # + features, scoring
        runs = len(ARMS) * len(args.seeds)
        left = cfg["time_budget"] - (time.perf_counter() - t0) - runs * sample_s
        fit = int(left / (runs * step_s))
        print(f"time budget {cfg['time_budget']:.0f} s: {step_s * 1e3:.0f} ms per step, about {sample_s:.0f} s to "
              f"sample and score an arm; {fit} steps fit, running {min(fit, steps)}", flush=True)
        steps = max(1, min(fit, steps))
        del probe

    results = {arm: [] for arm in ARMS}
    for seed in args.seeds:
        for arm in ARMS:
            run = Run(args, cfg, dataset, device).build(arm, seed)
            train_s = run.train(steps)
            t1 = time.perf_counter()
            samples, indices = run.sample(n, cfg["inference_steps"])
            feats = extract_features(extractor, samples, batch_size=128, value_range=(0, 1), progress=False)
            score = bank.score(feats, device=device)
            nearest = bank.bank(device=device).search(feats.to(device))[0].cpu()
            hits = float((nearest == indices).float().mean())
            same_digit = float((labels[nearest] == labels[indices]).float().mean())
            fid = fid_on_features(bank.extractor_identity, bank.features, feats)
            est, real = score.irs_inf, score.real
            row = dict(seed=seed, adjusted=score.adjusted, lower=est.lower / real.estimate,
                       upper=est.upper / real.estimate, irs_inf=est.estimate, fid=fid, hits=hits, same_digit=same_digit,
                       train_s=train_s, eval_s=time.perf_counter() - t1)
            results[arm].append(row)
            print(f"seed {seed} {arm:13s} train {train_s:5.0f} s  IRS_inf {est.estimate:.3f}  IRS_inf,a "
                  f"{row['adjusted']:.3f} [{row['lower']:.3f}, {row['upper']:.3f}]  FID {fid:.1f}  "
                  f"condition hits {hits:.3f}  same digit {same_digit:.3f}", flush=True)
            if args.save_dir:
                run.save(os.path.join(args.save_dir, f"{arm}-seed{seed}"))
            del run

    fid_note = ("features as given (calibrated extractor)" if "calibration" in bank.extractor_identity
                else "features / mean per-dim std of the training features (uncalibrated extractor)")
    print()
    print(f"Digits {cfg['resolution']}x{cfg['resolution']} (N = {bank.n_train}), UNet {cfg['block_out_channels']} x "
          f"{cfg['layers_per_block']} layers, {steps} steps x batch {cfg['batch_size']} per arm, lr "
          f"{cfg['learning_rate']}, EMA {args.ema_decay}, detailed-balance timesteps, condition dropout "
          f"{args.condition_dropout}, guidance {args.guidance_scale}, pseudo-labels {args.pseudo_labels}, {n} samples "
          f"per arm, DDIM "
          f"{cfg['inference_steps']} steps, seeds {args.seeds}; random-Inception features at "
          f"{cfg['extractor_input_size'] or 299} px (d = {bank.dim}); FID on {fid_note}; "
          f"{device.type} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
          f"{args.threads}); total {time.perf_counter() - t0:.0f} s")
    print()
    print("| arm | IRS_inf,a mean +- sd | per seed [interval] | FID mean +- sd | per seed | condition hits | "
          "same digit | train s |")
    print("|---|---|---|---|---|---|---|---|")
    for arm in ARMS:
        rows = results[arm]
        adj, fids = [r["adjusted"] for r in rows], [r["fid"] for r in rows]
        sd = lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")  # noqa: E731
        print(f"| {arm} | {np.mean(adj):.3f} +- {sd(adj):.3f} | "
              + ", ".join(f"{r['adjusted']:.3f} [{r['lower']:.3f}, {r['upper']:.3f}]" for r in rows)
              + f" | {np.mean(fids):.1f} +- {sd(fids):.1f} | " + ", ".join(f"{f:.1f}" for f in fids)
              + f" | {np.mean([r['hits'] for r in rows]):.4f} | {np.mean([r['same_digit'] for r in rows]):.3f} | "
              f"{np.mean([r['train_s'] for r in rows]):.0f} |")
    print(f"| real (held-out half of train) | 1 | IRS_inf(real) {bank.real} | - | - | - | - | - |")
    d_adj = [d["adjusted"] - u["adjusted"] for d, u in zip(results["DiADM"], results["unconditional"])]
    d_fid = [d["fid"] - u["fid"] for d, u in zip(results["DiADM"], results["unconditional"])]
    m_adj, h_adj = t_interval(d_adj)
    m_fid, h_fid = t_interval(d_fid)
    print()
    print(f"DiADM - unconditional, paired by seed ({len(d_adj)} seeds, 95% t interval): IRS_inf,a {m_adj:+.3f} "
          f"+- {h_adj:.3f} -> {verdict(m_adj, h_adj, 'DiADM more diverse', 'DiADM less diverse')}; FID "
          f"{m_fid:+.1f} +- {h_fid:.1f} -> {verdict(m_fid, h_fid, 'DiADM worse FID', 'DiADM better FID')}")
    return results


if __name__ == "__main__":
    main()
