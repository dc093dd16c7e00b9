"""Detailed-balance noise levels (detailed-balance paper, Sec. 2.2, Eq. 5) and EDM preconditioning.

Training draws the noise level sigma (VE convention: ``x = y + sigma * eps``) from

    q(sigma) = gamma / Z * sigma^(gamma-1) / (sigma^gamma + sigma_eps^gamma),   sigma in [sigma_min, sigma_max]
    L(x)     = ln(x^gamma + sigma_eps^gamma),   Z = L(sigma_max) - L(sigma_min)
    F(sigma) = (L(sigma) - L(sigma_min)) / Z

(the paper's normaliser ``(1/gamma) ln((T^gamma + e^gamma)/e^gamma)`` is ``Z / gamma`` with sigma_min = 0), and
the loss is the plain epsilon error ``|| sigma f(x, sigma) - (x - y) ||^2 / sigma^2 = || f - eps ||^2``.
All densities are evaluated in float64 and in log space: ``sigma^gamma`` overflows float32 quickly.

A DDPM/DDIM (variance-preserving) timestep t is the VE level ``sigma_t = sqrt((1 - alphabar_t) / alphabar_t)``:
``x_t / sqrt(alphabar_t) = y + sigma_t * eps`` with the same eps.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "DetailedBalanceNoiseSampler",
    "EDMPrecondition",
    "NoisedSample",
    "edm_precondition",
    "add_noise_at_sigma",
    "scheduler_sigmas",
]

_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def _as_float64(x):
    """(tensor float64, restore) -- accepts tensors (kept on their device), arrays and Python scalars."""
    if torch.is_tensor(x):
        return x.to(torch.float64), lambda y: y
    arr = np.asarray(x, dtype=np.float64)
    scalar = arr.ndim == 0
    return torch.from_numpy(np.array(arr)), (lambda y: float(y) if scalar else y.numpy())


def scheduler_sigmas(scheduler) -> torch.Tensor:
    """VE-equivalent noise levels ``sqrt((1 - alphabar_t) / alphabar_t)`` [T] (float64, CPU) of a diffusers
    discrete VP scheduler (anything with ``alphas_cumprod``: DDPM, DDIM, PNDM, DPM-Solver, ...)."""
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if alphas_cumprod is None:
        raise TypeError(
            f"scheduler: expected a discrete VP scheduler with `alphas_cumprod` (DDPMScheduler, DDIMScheduler, ...), "
            f"got {type(scheduler).__name__}; for EDM/VE schedulers use sample_sigmas() and add_noise_at_sigma()"
        )
    alphabar = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
    return ((1.0 - alphabar) / alphabar).sqrt()


class DetailedBalanceNoiseSampler:
    """Noise-level distribution q(sigma) of the detailed-balance objective, truncated to [sigma_min, sigma_max].

    Args:
        gamma: sharpness of the sigmoid cut-off below sigma_eps (paper: 6).
        sigma_eps: "thickness of the data hyperplane", in the data's units (paper: 0.05 for CIFAR-10 in [-1, 1];
            a starting point is the adversarial radius: 8/255 on [0, 1] data = 16/255 on [-1, 1] data).
        sigma_min, sigma_max: support of the truncated, renormalised distribution (sigma_min may be 0).

    ``pdf``, ``cdf``, ``icdf`` accept tensors (result: float64 tensor on the same device), arrays or scalars
    (result: float64 array / float).
    """

    def __init__(self, gamma: float = 6.0, sigma_eps: float = 0.05, sigma_min: float = 0.002, sigma_max: float = 80.0):
        for name, value in (("gamma", gamma), ("sigma_eps", sigma_eps), ("sigma_max", sigma_max)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite positive number, got {value!r}")
        if not (isinstance(sigma_min, (int, float)) and 0 <= sigma_min < sigma_max):
            raise ValueError(f"sigma_min must satisfy 0 <= sigma_min < sigma_max={sigma_max}, got {sigma_min!r}")
        self.gamma, self.sigma_eps = float(gamma), float(sigma_eps)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self._log_norm_lo = self._log_norm(torch.tensor(self.sigma_min, dtype=torch.float64)).item()
        self._log_norm_hi = self._log_norm(torch.tensor(self.sigma_max, dtype=torch.float64)).item()
        self._z = self._log_norm_hi - self._log_norm_lo  # Z = L(sigma_max) - L(sigma_min)

    def __repr__(self):
        return (f"{type(self).__name__}(gamma={self.gamma}, sigma_eps={self.sigma_eps}, "
                f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max})")

    # -- closed forms (float64, log space) -------------------------------------------------------------------
    def _log_norm(self, x: torch.Tensor) -> torch.Tensor:
        """L(x) = ln(x^g + e^g) = g ln(max(x, e)) + log1p((min(x, e) / max(x, e))^g), overflow-free."""
        eps = torch.full_like(x, self.sigma_eps)
        hi, lo = torch.maximum(x, eps), torch.minimum(x, eps)
        return self.gamma * hi.log() + torch.log1p((lo / hi) ** self.gamma)

    def log_pdf(self, sigma):
        """ln q(sigma) = ln(g / Z) - ln(sigma) + ln sigmoid(g ln(sigma / sigma_eps)); -inf outside the support."""
        s, restore = _as_float64(sigma)
        inside = (s >= self.sigma_min) & (s <= self.sigma_max) & (s > 0)
        s_safe = torch.where(inside, s, torch.ones_like(s))
        logp = (math.log(self.gamma / self._z) - s_safe.log()
                + torch.nn.functional.logsigmoid(self.gamma * (s_safe.log() - math.log(self.sigma_eps))))
        return restore(torch.where(inside, logp, torch.full_like(s, -math.inf)))

    def pdf(self, sigma):
        """q(sigma) = g / Z * sigma^(g-1) / (sigma^g + sigma_eps^g) on [sigma_min, sigma_max], else 0."""
        s, restore = _as_float64(sigma)
        return restore(self.log_pdf(s).exp())

    def cdf(self, sigma):
        """F(sigma) = (L(sigma) - L(sigma_min)) / Z, clipped to [0, 1] outside the support."""
        s, restore = _as_float64(sigma)
        s = s.clamp(self.sigma_min, self.sigma_max)
        return restore(((self._log_norm(s) - self._log_norm_lo) / self._z).clamp(0.0, 1.0))

    def icdf(self, u):
        """F^-1(u) for u in [0, 1]: L = L(sigma_min) + u Z, ln sigma = (L + ln(1 - exp(g ln sigma_eps - L))) / g."""
        p, restore = _as_float64(u)
        if bool(((p < 0) | (p > 1) | p.isnan()).any()):
            raise ValueError("u must lie in [0, 1]")
        level = self._log_norm_lo + p * self._z
        gap = (self.gamma * math.log(self.sigma_eps) - level).clamp(max=0.0)  # <= 0 since L(x) >= g ln(sigma_eps)
        sigma = ((level + torch.log(-torch.expm1(gap))) / self.gamma).exp()
        return restore(sigma.clamp(self.sigma_min, self.sigma_max))

    # -- sampling ----------------------------------------------------------------------------------------------
    def sample_sigmas(self, n: int, generator: torch.Generator | None = None, device=None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``n`` noise levels drawn by inverse CDF (uniforms drawn in float64 on the generator's device)."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        gen_device = generator.device if generator is not None else "cpu"
        u = torch.rand(n, generator=generator, device=gen_device, dtype=torch.float64)
        return self.icdf(u).to(device=device if device is not None else gen_device, dtype=dtype)

    def timestep_probabilities(self, scheduler) -> torch.Tensor:
        """Probability [T] (float64) of each discrete training timestep of a VP scheduler: the mass of q over
        the timestep's sigma bin.

        Bin edges are the geometric midpoints ``sqrt(sigma_t sigma_{t+1})`` between neighbouring levels; the
        first bin starts at 0 and the last ends at +inf, so the mass q puts below the scheduler's smallest level
        goes to the first timestep and the mass above its largest level to the last one (q itself is zero
        outside [sigma_min, sigma_max], so nothing else is lost). The probabilities sum to 1.
        """
        sigmas = scheduler_sigmas(scheduler)
        if sigmas.numel() < 1 or not bool((sigmas[1:] > sigmas[:-1]).all()):
            raise ValueError("scheduler: alphas_cumprod must be strictly decreasing (sigma_t increasing in t)")
        mids = (sigmas[1:] * sigmas[:-1]).sqrt()
        edges = torch.cat([torch.zeros(1, dtype=torch.float64), mids, torch.full((1,), math.inf, dtype=torch.float64)])
        cdf = self.cdf(edges)
        probs = (cdf[1:] - cdf[:-1]).clamp_min(0.0)
        return probs / probs.sum()

    def sample_timesteps(self, n: int, scheduler, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """``n`` training timesteps (LongTensor) of a discrete VP scheduler, drawn with
        :meth:`timestep_probabilities` -- the drop-in replacement for ``torch.randint(0, T, (n,))``."""
        probs = self.timestep_probabilities(scheduler)
        gen_device = generator.device if generator is not None else "cpu"
        t = torch.multinomial(probs.to(gen_device), n, replacement=True, generator=generator)
        return t.to(device if device is not None else gen_device)

    # -- loss weights ------------------------------------------------------------------------------------------
    @staticmethod
    def loss_weight(prediction_type: str = "epsilon", *, sigmas=None, timesteps=None, scheduler=None) -> torch.Tensor:
        """Per-sample weight ``w`` such that ``w * || prediction - target ||^2`` equals the epsilon error
        ``|| eps_hat - eps ||^2`` of Eq. 5 (so sample the levels from q and use the weighted MSE).

        Give either ``sigmas`` (VE/EDM convention, ``x = y + sigma eps``) or ``timesteps`` and a VP
        ``scheduler`` (``x_t = a y + b eps``, ``a = sqrt(alphabar)``, ``b = sqrt(1 - alphabar)``,
        ``sigma = b / a``). Derivation (same result in both conventions, written in sigma):

        - ``"epsilon"``: the target is eps itself: ``w = 1``.
        - ``"sample"`` (y_hat): ``eps_hat = (x - y_hat) / sigma`` (VE) or ``(x_t - a y_hat) / b`` (VP), so
          ``eps_hat - eps = -(y_hat - y) / sigma`` (VE) or ``-(a / b)(y_hat - y)`` (VP): ``w = 1 / sigma^2
          = alphabar / (1 - alphabar)`` (the SNR).
        - ``"v_prediction"``: ``v = a eps - b y``; since ``a^2 + b^2 = 1``, ``eps = a v + b x_t``, so
          ``eps_hat - eps = a (v_hat - v)``: ``w = a^2 = alphabar = 1 / (1 + sigma^2)``. In VE form the same v
          is ``(eps - sigma y) / sqrt(1 + sigma^2)`` (the VP v of ``x / sqrt(1 + sigma^2)``).
        - EDM preconditioning (``D = c_skip x + c_out F``) predicts the sample: weight ``1 / sigma^2`` on the D
          error, i.e. ``c_out^2 / sigma^2 = sigma_data^2 / (sigma^2 + sigma_data^2)`` on the raw F error.

        Returns a float32 tensor shaped like ``sigmas`` / ``timesteps`` (broadcast it over the image dims).
        """
        if prediction_type not in _PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {_PREDICTION_TYPES}, got {prediction_type!r}")
        if (sigmas is None) == (timesteps is None):
            raise ValueError("give exactly one of sigmas= (VE/EDM) or timesteps= with scheduler= (VP)")
        if sigmas is not None:
            s = torch.as_tensor(sigmas).to(torch.float64)
            device = s.device
        else:
            if scheduler is None:
                raise ValueError("timesteps= needs the VP scheduler= that defines alphas_cumprod")
            t = torch.as_tensor(timesteps)
            device = t.device
            s = scheduler_sigmas(scheduler)[t.long().cpu()].to(device)
        if prediction_type == "epsilon":
            w = torch.ones_like(s)
        elif prediction_type == "sample":
            w = s.pow(-2)
        else:
            w = 1.0 / (1.0 + s * s)
        return w.to(torch.float32)


# -- EDM preconditioning (Karras et al. 2022, Table 1) and noising at continuous sigma ------------------------------
class EDMPrecondition(NamedTuple):
    """EDM coefficients: ``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)``."""

    c_skip: torch.Tensor  # sigma_data^2 / (sigma^2 + sigma_data^2)
    c_out: torch.Tensor   # sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in: torch.Tensor    # 1 / sqrt(sigma^2 + sigma_data^2)
    c_noise: torch.Tensor  # ln(sigma) / 4, shape [B] (the network's "timestep")


def edm_precondition(sigmas, sigma_data: float = 0.5, ndim: int = 4) -> EDMPrecondition:
    """EDM preconditioning for noise levels ``sigmas`` [B]; c_skip, c_out, c_in are shaped [B, 1, ..., 1]
    (``ndim`` dims) to broadcast over images, c_noise stays [B]."""
    s = torch.as_tensor(sigmas, dtype=torch.float32) if not torch.is_tensor(sigmas) else sigmas
    if s.ndim != 1:
        raise ValueError(f"sigmas must be a 1-D tensor [B], got shape {tuple(s.shape)}")
    if not bool((s > 0).all()):
        raise ValueError("sigmas must be positive")
    sb = s.reshape(-1, *([1] * (ndim - 1)))
    denom = (sb * sb + sigma_data ** 2).sqrt()
    return EDMPrecondition(sigma_data ** 2 / denom ** 2, sb * sigma_data / denom, 1.0 / denom, s.log() / 4)


class NoisedSample(NamedTuple):
    """Output of :func:`add_noise_at_sigma`. ``model_input = c_in * noisy``, ``c_noise`` is the timestep."""

    noisy: torch.Tensor
    noise: torch.Tensor
    sigmas: torch.Tensor
    model_input: torch.Tensor
    c_noise: torch.Tensor
    precond: EDMPrecondition

    def denoise(self, model_output: torch.Tensor) -> torch.Tensor:
        """EDM denoiser ``D = c_skip * noisy + c_out * F`` (an estimate of the clean sample)."""
        return self.precond.c_skip * self.noisy + self.precond.c_out * model_output


def add_noise_at_sigma(sample: torch.Tensor, sigmas: torch.Tensor, noise: torch.Tensor | None = None, *,
                       generator: torch.Generator | None = None, sigma_data: float = 0.5) -> NoisedSample:
    """Noise ``sample`` [B, ...] at continuous VE levels ``sigmas`` [B]: ``noisy = sample + sigma * noise``, with
    the EDM-preconditioned network input. diffusers' EDM schedulers' ``add_noise`` only accepts grid sigmas.

    Training step (EDM/VE, Eq. 5)::

        sigmas = sampler.sample_sigmas(len(x), device=x.device)
        batch = add_noise_at_sigma(x, sigmas)
        denoised = batch.denoise(model(batch.model_input, batch.c_noise).sample)
        loss = (sampler.loss_weight("sample", sigmas=sigmas).view(-1, 1, 1, 1) * (denoised - x) ** 2).mean()
    """
    sigmas = torch.as_tensor(sigmas, device=sample.device).to(sample.dtype)
    if sigmas.ndim != 1 or sigmas.shape[0] != sample.shape[0]:
        raise ValueError(f"sigmas must have shape [B]=[{sample.shape[0]}], got {tuple(sigmas.shape)}")
    if noise is None:
        noise = torch.randn(sample.shape, generator=generator, device=generator.device if generator is not None
                            else sample.device, dtype=sample.dtype).to(sample.device)
    elif noise.shape != sample.shape:
        raise ValueError(f"noise must have the sample's shape {tuple(sample.shape)}, got {tuple(noise.shape)}")
    precond = edm_precondition(sigmas, sigma_data, ndim=sample.ndim)
    noisy = sample + sigmas.reshape(-1, *([1] * (sample.ndim - 1))) * noise
    return NoisedSample(noisy, noise, sigmas, precond.c_in * noisy, precond.c_noise, precond)
