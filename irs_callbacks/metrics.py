"""Sample-quality and diversity metrics from feature arrays (one extraction pass serves all).

The IRS paper's Table 2 reports these next to IRS. Every function takes ``[N, d]`` real and
``[M, d]`` generated features (torch tensors or numpy arrays, same extractor).

- FID (Heusel et al.): ``||mu_r - mu_f||^2 + tr(S_r) + tr(S_f) - 2 tr((S_r S_f)^(1/2))`` with
  float64 means and unbiased (N - 1) covariances; the trace of the matrix square root comes
  from symmetric eigendecompositions in float64: ``tr((S_r S_f)^(1/2)) = sum sqrt(eig(A S_f A))``
  with ``A = S_r^(1/2)``.
- KID (Binkowski et al.): unbiased MMD^2 with the polynomial kernel ``(x.y / d + 1)^3``, averaged
  over ``kid_subsets`` random subsets of ``kid_subset_size`` rows of each set, drawn without
  replacement by ``numpy.random.default_rng(seed)`` (real subset, then fake subset, per round).
- Precision, recall, density, coverage (Kynkaanniemi et al.; Naeem et al.), exactly as the
  ``prdc`` package: Euclidean distances; the radius of a point is the distance to its k-th
  nearest neighbour in its own set, *excluding itself by index* (duplicates at other indices
  count); "inside a ball" is *strict*: ``d(x, y) < radius``. Precision = fraction of fakes
  inside some real ball; recall = fraction of reals inside some fake ball; density = mean over
  fakes of (number of real balls containing it) / k; coverage = fraction of reals whose ball
  contains a fake. Computed blockwise through :class:`~irs_callbacks.retrieval.FeatureBank`
  (never an N x M matrix), with comparisons near a radius re-checked in float64.
- Vendi score (Friedman & Dieng), as ``vendi_score.vendi.score_dual``: rows L2-normalised,
  eigenvalues of the d x d matrix ``X^T X / N`` (float64), ``exp`` of their order-q entropy.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .retrieval import FeatureBank, as_feature_tensor

__all__ = ["compute_metrics", "fid", "kid", "prdc", "vendi", "METRICS"]

METRICS = ("fid", "kid", "prdc", "precision", "recall", "density", "coverage", "vendi")
_U32 = 2.0 ** -24


def _check(x, name: str, min_rows: int = 1) -> torch.Tensor:
    x = as_feature_tensor(x, name)
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows, got {x.shape[0]}")
    x = x.detach()
    if x.is_floating_point():
        bad = ~torch.isfinite(x).all(dim=1)
        if bool(bad.any()):
            raise ValueError(f"{name} has {int(bad.sum())} rows with NaN/inf (first {bad.nonzero().flatten()[:5].tolist()});"
                             " drop them before computing metrics")
    return x


def _pair(real, fake, min_rows=1):
    r, f = _check(real, "real_features", min_rows), _check(fake, "fake_features", min_rows)
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"real_features have dimension {r.shape[1]} but fake_features have {f.shape[1]}")
    return r, f


def _mean_cov(x: torch.Tensor):
    x = x.to(torch.float64)
    mu = x.mean(0)
    xc = x - mu
    return mu, (xc.T @ xc) / (x.shape[0] - 1)


def _sqrt_psd(s: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def fid(real_features, fake_features) -> float:
    """Frechet distance between Gaussians fitted to the two feature sets (float64)."""
    r, f = _pair(real_features, fake_features, min_rows=2)
    mu_r, s_r = _mean_cov(r.cpu())
    mu_f, s_f = _mean_cov(f.cpu())
    a = _sqrt_psd(s_r)
    m = a @ s_f @ a
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu_r - mu_f).square().sum() + s_r.trace() + s_f.trace() - 2 * tr_sqrt)


def kid(real_features, fake_features, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0):
    """Kernel Inception Distance: (mean, std) of unbiased MMD^2 over random subsets (float64).

    ``subset_size`` is capped at the smaller set's size.
    """
    r, f = _pair(real_features, fake_features, min_rows=2)
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"subsets must be >= 1 and subset_size >= 2, got {subsets} and {subset_size}")
    m = min(subset_size, r.shape[0], f.shape[0])
    r, f = r.cpu().to(torch.float64), f.cpu().to(torch.float64)
    d = r.shape[1]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = r[torch.from_numpy(rng.choice(r.shape[0], m, replace=False))]
        y = f[torch.from_numpy(rng.choice(f.shape[0], m, replace=False))]
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        mmd = ((kxx.sum() - kxx.diagonal().sum()) + (kyy.sum() - kyy.diagonal().sum())) / (m * (m - 1)) \
            - 2 * kxy.sum() / (m * m)
        values.append(float(mmd))
    values = np.array(values)
    return float(values.mean()), float(values.std())


def prdc(real_features, fake_features, k: int = 5, *, device=None, backend: str = "auto") -> dict:
    """Precision, recall, density and coverage with k-NN radii (conventions of ``prdc.compute_prdc``)."""
    r, f = _pair(real_features, fake_features, min_rows=int(k) + 1)
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    real_bank = FeatureBank(r, device=device, backend=backend)
    fake_bank = FeatureBank(f, device=device, backend=backend)
    f = fake_bank.features  # same stored (float32) values the bank uses
    # radii: distance to the k-th neighbour within the own set, self excluded by index
    r_real = real_bank.knn(None, k, exclude_self=True, out_dtype=torch.float64)[0][:, -1]
    r_fake = fake_bank.knn(None, k, exclude_self=True, out_dtype=torch.float64)[0][:, -1]
    del fake_bank
    dev = real_bank.device
    r2_real, r2_fake = r_real.square().to(torch.float32), r_fake.square().to(torch.float32)
    slack = 4 * _U32 * float(max(r2_real.max(), r2_fake.max()))  # float32 rounding of the radii
    count = torch.zeros(f.shape[0], dtype=torch.int64, device=dev)  # real balls containing each fake
    covered = torch.zeros(real_bank.n_train, dtype=torch.bool, device=dev)  # real ball contains a fake
    recalled = torch.zeros(real_bank.n_train, dtype=torch.bool, device=dev)  # real inside a fake ball
    for q0, q1, b0, b1, approx, tol in real_bank.distance_blocks(f):
        tol = (tol + slack)[:, None]
        for radius2, per_query in ((r2_real[None, b0:b1], False), (r2_fake[q0:q1, None], True)):
            diff = approx - radius2
            inside = diff < -tol
            unsure = diff.abs_() <= tol
            if per_query:
                recalled[b0:b1] |= inside.any(0)
            else:
                count[q0:q1] += inside.sum(1)
                covered[b0:b1] |= inside.any(0)
            rows, cols = unsure.nonzero(as_tuple=True)
            if rows.numel():  # near a radius: decide with the exact float64 distance, as prdc compares
                exact = real_bank.exact_distance(f[q0:q1], rows, cols + b0)
                hit = exact < (r_fake[q0 + rows] if per_query else r_real[b0 + cols])
                rows, cols = rows[hit], cols[hit]
                if per_query:
                    recalled[b0 + cols] = True
                else:
                    count.index_add_(0, q0 + rows, torch.ones_like(rows))
                    covered[b0 + cols] = True
    return {"precision": float((count > 0).double().mean()), "recall": float(recalled.double().mean()),
            "density": (1.0 / k) * (float(count.sum()) / f.shape[0]), "coverage": float(covered.double().mean())}


def vendi(features, *, q: float = 1.0) -> float:
    """Vendi score of one feature set with the cosine (normalised linear) kernel, d x d form."""
    x = _check(features, "features", min_rows=1)
    d = x.shape[1]
    s = torch.zeros(d, d, dtype=torch.float64)
    step = max(1, 2 ** 22 // d)
    for i in range(0, x.shape[0], step):
        rows = x[i:i + step].cpu().to(torch.float64)
        rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-300)
        s += rows.T @ rows
    w = torch.linalg.eigvalsh(s / x.shape[0]).numpy()
    p = w[w > 0]
    if q == 1:
        entropy = -(p * np.log(p)).sum()
    elif q == math.inf or q == "inf":
        entropy = -np.log(w.max())
    else:
        entropy = np.log((p ** q).sum()) / (1 - q)
    return float(np.exp(entropy))


def compute_metrics(real_features, fake_features, metrics=("fid", "kid", "prdc", "vendi"), k: int = 5, *,
                    kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0,
                    vendi_q: float = 1.0, device=None, backend: str = "auto") -> dict:
    """Compute several metrics from one pair of feature arrays.

    Args:
        real_features, fake_features: ``[N, d]`` and ``[M, d]`` features of the same extractor.
        metrics: names from :data:`METRICS`; ``"prdc"`` means all four of precision, recall,
            density and coverage (one blockwise pass computes them together).
        k: neighbours for the precision/recall/density/coverage radii.
        kid_subsets, kid_subset_size, seed: KID sampling (see :func:`kid`).
        device, backend: where and how the k-NN work runs (:class:`FeatureBank`).
    Returns:
        dict with keys among ``fid, kid_mean, kid_std, precision, recall, density, coverage,
        vendi`` (Vendi of the fake features) and ``vendi_real``; values are Python floats.
    """
    if isinstance(metrics, str):
        metrics = [metrics]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {METRICS}")
    r, f = _pair(real_features, fake_features)
    out = {}
    if "fid" in metrics:
        out["fid"] = fid(r, f)
    if "kid" in metrics:
        out["kid_mean"], out["kid_std"] = kid(r, f, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
    wanted = {"precision", "recall", "density", "coverage"}
    chosen = wanted if "prdc" in metrics else wanted.intersection(metrics)
    if chosen:
        values = prdc(r, f, k, device=device, backend=backend)
        out.update({key: values[key] for key in ("precision", "recall", "density", "coverage") if key in chosen})
    if "vendi" in metrics:
        out["vendi"] = vendi(f, q=vendi_q)
        out["vendi_real"] = vendi(r, q=vendi_q)
    return out
