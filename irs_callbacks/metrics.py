"""Sample-quality and diversity metrics from feature arrays (one extraction pass serves all).

The IRS paper's Table 2 reports these next to IRS. Every function takes ``[N, d]`` real and
``[M, d]`` generated features (numpy arrays or torch tensors, same extractor). This module
imports numpy only: numpy inputs never import torch (``import torch`` alone costs ~0.5 GiB).

Every feature scale is safe: no metric overflows or loses its value to cancellation because the
features are large (random-Inception's raw features have norms around 1e8) or tiny.

- FID (Heusel et al.): ``||mu_r - mu_f||^2 + tr(S_r) + tr(S_f) - 2 tr((S_r S_f)^(1/2))`` with
  float64 means and unbiased (N - 1) covariances; the trace of the matrix square root comes
  from symmetric eigendecompositions in float64: ``tr((S_r S_f)^(1/2)) = sum sqrt(eig(A S_f A))``
  with ``A = S_r^(1/2)``. FID is invariant to a common shift and homogeneous of degree 2 in a
  common scale, so it is computed on ``(x - c) / 2^e`` (c: the mean of the first real rows, 2^e
  a power of two near the largest shifted magnitude, an exact division) and multiplied by
  ``4^e`` at the end.
- KID (Binkowski et al.): unbiased MMD^2 with the polynomial kernel ``(x.y / d + 1)^3``, averaged
  over ``kid_subsets`` random subsets of ``m = min(kid_subset_size, N // 2, M // 2)`` rows of each
  set (at most half of each set, so that both sides are resampled in every round), drawn without
  replacement by ``numpy.random.default_rng(seed)`` (real subset, then fake subset, per round);
  ``kid_std`` is the standard deviation of the per-subset estimates (the noise of one estimate
  from m rows per side; two samples of one distribution give ``|kid_mean| <~ kid_std``). The
  kernel is evaluated exactly but without its large cancelling parts: with features scaled by a
  power of two ``2^e >= 1`` (``k = 2^(6e) (x'.y'/d + 4^-e)^3``) and written as ``x' = c + u``
  around the mean c of the first real rows, ``k = (A + a_x + a_y + b_xy)^3`` with ``A = c.c/d + 4^-e``,
  ``a_x = c.u_x/d``, ``b_xy = u_x.u_y/d``; every term that depends on one argument only (``A^3``,
  ``3A^2 (a_x + a_y)``, ...) contributes exactly 0 to the unbiased MMD^2 and is dropped
  analytically, so the sums hold only the interaction terms.
- Precision, recall, density, coverage (Kynkaanniemi et al.; Naeem et al.), exactly as the
  ``prdc`` package: Euclidean distances; the radius of a point is the distance to its k-th
  nearest neighbour in its own set, *excluding itself by index* (duplicates at other indices
  count); "inside a ball" is *strict*: ``d(x, y) < radius``. Precision = fraction of fakes
  inside some real ball; recall = fraction of reals inside some fake ball; density = mean over
  fakes of (number of real balls containing it) / k; coverage = fraction of reals whose ball
  contains a fake. Distances are those of the given values, computed directly in float64
  (``sum (x - y)^2``). Computed blockwise (blocks of rows against the other set, never an
  N x M or N x N matrix): a float32 screen in the expanded form with a rigorous rounding bound
  (:mod:`irs_callbacks._rounding`) decides most pairs, every pair within the bound of a radius
  is decided by its float64 distance. Inputs on the CPU (arrays or tensors) run in numpy; GPU
  tensors, ``device="cuda"`` or an explicit ``backend`` go through
  :class:`~irs_callbacks.retrieval.FeatureBank` (which stores float32 values: float64 inputs
  are then compared after rounding to float32).
- Vendi score (Friedman & Dieng), as ``vendi_score.vendi.score_dual``: rows L2-normalised
  (each row first divided by its largest magnitude, so norms never overflow), eigenvalues of the
  d x d matrix ``X^T X / N`` (float64), ``exp`` of their order-q entropy. It is scale-free; in a
  feature space where all features lie in a narrow cone (random-Inception: mean cosine 0.99 on
  digits) it stays close to 1, so compare Vendi values within one extractor only.
"""

from __future__ import annotations

import math
import sys

import numpy as np

from ._rounding import F32_TINY, F32_UNIT_ROUNDOFF, F64_TINY, F64_UNIT_ROUNDOFF, screen_tolerance
from .validation import check_int

__all__ = ["compute_metrics", "fid", "kid", "prdc", "vendi", "METRICS", "PRDC_BLOCK_ROWS", "PRDC_BLOCK_ELEMENTS"]

METRICS = ("fid", "kid", "prdc", "precision", "recall", "density", "coverage", "vendi")
PRDC_BLOCK_ROWS = 2048  # numpy prdc: rows of one set per block, against ...
PRDC_BLOCK_ELEMENTS = 2 ** 22  # ... rows of the other in tiles of this many distances (float32: 16 MiB)
_ROW_ELEMENTS = 2 ** 21  # float64 elements per chunk of row-wise passes (16 MiB)
_PAIR_ELEMENTS = 2 ** 18  # float64 differences per chunk of exact distances (2 MiB: stays in cache)
_FLOAT_DTYPES = (np.float16, np.float32, np.float64)


def _is_tensor(x) -> bool:
    """True for a torch tensor, without importing torch (a tensor means torch is loaded)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _bad_rows_error(name: str, rows) -> ValueError:
    return ValueError(f"{name} has {len(rows)} rows with NaN/inf (first {list(rows[:5])}); "
                      "drop them before computing metrics")


def _as_array(x, name: str, min_rows: int = 1, why: str = "") -> np.ndarray:
    """``x`` as a validated ``[N, d]`` numpy array (no copy for CPU tensors and arrays)."""
    if _is_tensor(x):
        x = x.detach().cpu()
        x = (x.float() if x.dtype == sys.modules["torch"].bfloat16 else x).numpy()  # bfloat16: exact in float32
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray or torch.Tensor of shape [N, d], got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape [N, d] (2 dimensions), got shape {x.shape}")
    if not (x.dtype in _FLOAT_DTYPES or x.dtype.kind in "iu"):
        raise TypeError(f"{name} must hold real numbers (float16/32/64 or integers), got dtype {x.dtype}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows{why}, got {x.shape[0]}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} must have at least one feature dimension, got shape {x.shape}")
    if x.dtype.kind == "f":
        step = max(1, _ROW_ELEMENTS // x.shape[1])
        bad = [s + np.flatnonzero(~np.isfinite(x[s:s + step]).all(1)) for s in range(0, x.shape[0], step)]
        bad = np.concatenate(bad)
        if bad.size:
            raise _bad_rows_error(name, bad.tolist())
    return x


def _pair(real, fake, min_rows: int = 1, why: str = ""):
    r, f = _as_array(real, "real_features", min_rows, why), _as_array(fake, "fake_features", min_rows, why)
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"real_features have dimension {r.shape[1]} but fake_features have {f.shape[1]}")
    return r, f


def _row_chunks(x: np.ndarray):
    """Yield (start, rows as float64) in chunks of about 16 MiB."""
    step = max(1, _ROW_ELEMENTS // x.shape[1])
    for s in range(0, x.shape[0], step):
        yield s, x[s:s + step].astype(np.float64)


def _max_abs(x: np.ndarray, shift: np.ndarray | None = None) -> float:
    """Largest ``|x - shift|`` (float64, chunked; never overflows)."""
    out = 0.0
    for _, rows in _row_chunks(x):
        if shift is not None:
            rows -= shift
        out = max(out, float(np.abs(rows).max(initial=0.0)))
    return out


def _power_of_two_exponent(value: float) -> int:
    """e with ``2^(e-1) < value <= 2^e`` (0 for value 0): dividing by 2^e is exact."""
    return 0 if value == 0 or not math.isfinite(value) else math.frexp(value)[1]


def _frame(r: np.ndarray, f: np.ndarray, minimum_exponent: int | None = None) -> tuple[np.ndarray, int]:
    """(shift c, exponent e): the mean of the first real rows (float64) and the power of two near
    the largest ``|x - c|`` of both sets, so that ``(x - c) / 2^e`` is O(1)."""
    c = r[: max(1, _ROW_ELEMENTS // r.shape[1])].astype(np.float64).mean(0)
    e = _power_of_two_exponent(max(_max_abs(r, c), _max_abs(f, c)))
    return c, e if minimum_exponent is None else max(e, minimum_exponent)


def _mean_cov(x: np.ndarray, shift: np.ndarray | float = 0.0, exponent: int = 0):
    """Mean and unbiased covariance of ``(x - shift) / 2^exponent`` (float64, two passes)."""
    def chunks():
        for s, rows in _row_chunks(x):
            rows -= shift
            yield s, np.ldexp(rows, -exponent)

    mu = sum(rows.sum(0) for _, rows in chunks()) / x.shape[0]
    cov = np.zeros((x.shape[1], x.shape[1]))
    for _, rows in chunks():
        rows -= mu
        cov += rows.T @ rows
    return mu, cov / (x.shape[0] - 1)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(w.clip(min=0))) @ v.T


def fid(real_features, fake_features) -> float:
    """Frechet distance between Gaussians fitted to the two feature sets (float64, any scale)."""
    r, f = _pair(real_features, fake_features, min_rows=2)
    c, e = _frame(r, f)
    mu_r, s_r = _mean_cov(r, c, e)
    mu_f, s_f = _mean_cov(f, c, e)
    a = _sqrt_psd(s_r)
    m = a @ s_f @ a
    tr_sqrt = np.sqrt(np.linalg.eigvalsh((m + m.T) / 2).clip(min=0)).sum()
    value = np.square(mu_r - mu_f).sum() + np.trace(s_r) + np.trace(s_f) - 2 * tr_sqrt
    return float(np.ldexp(value, 2 * e))


def _kid_interaction_sum(u: np.ndarray, v: np.ndarray, au: np.ndarray, av: np.ndarray, big_a: float, d: int,
                         same: bool) -> float:
    """Sum over pairs (i, j) (i != j when ``same``) of the kernel's interaction part
    ``6A a_i a_j + 3 a_i a_j (a_i + a_j) + 3 (A + s)^2 b + 3 (A + s) b^2 + b^3``,
    ``s = a_i + a_j``, ``b = u_i.v_j / d`` (module docstring)."""
    b = u @ v.T / d
    s = au[:, None] + av[None, :]
    outer = au[:, None] * av[None, :]
    base = big_a + s
    terms = outer * (6 * big_a + 3 * s) + b * (3 * base * base + b * (3 * base + b))
    if same:
        np.fill_diagonal(terms, 0.0)
    return float(terms.sum())


def kid(real_features, fake_features, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0):
    """Kernel Inception Distance: (mean, std) of unbiased MMD^2 over random subsets (float64).

    ``subset_size`` is capped at half the smaller set (module docstring); no feature scale
    overflows or cancels.
    """
    r, f = _pair(real_features, fake_features, min_rows=4)
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"subsets must be >= 1 and subset_size >= 2, got {subsets} and {subset_size}")
    m = min(subset_size, r.shape[0] // 2, f.shape[0] // 2)
    d = r.shape[1]
    c, e = _frame(r, f, minimum_exponent=0)  # scale 2^e >= 1: the kernel's constant 4^-e stays <= 1
    c = np.ldexp(c, -e)
    big_a = float(c @ c / d + np.ldexp(1.0, -2 * e))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = np.ldexp(r[rng.choice(r.shape[0], m, replace=False)].astype(np.float64), -e) - c
        y = np.ldexp(f[rng.choice(f.shape[0], m, replace=False)].astype(np.float64), -e) - c
        ax, ay = x @ c / d, y @ c / d
        within = (_kid_interaction_sum(x, x, ax, ax, big_a, d, True)
                  + _kid_interaction_sum(y, y, ay, ay, big_a, d, True)) / (m * (m - 1))
        cross = _kid_interaction_sum(x, y, ax, ay, big_a, d, False) / (m * m)
        values.append(np.ldexp(within - 2 * cross, 6 * e))
    values = np.array(values)
    top = float(np.abs(values).max())
    if not (math.isfinite(top) and top > 0):  # 0, or beyond float64 (then inf / nan tell)
        return float(values.mean()), float(values.std())
    values /= top  # mean and std without overflowing squares
    return float(values.mean() * top), float(values.std() * top)


# ---------------------------------------------------------------------------------------- PRDC (numpy)
def _sqnorms(x: np.ndarray) -> np.ndarray:
    """Squared row norms in float64."""
    out = np.empty(x.shape[0])
    for s, rows in _row_chunks(x):
        out[s:s + rows.shape[0]] = np.einsum("ij,ij->i", rows, rows)
    return out


class _ScreenedSet:
    """One feature set prepared for the screen: the screen values (the input itself when it is
    C-contiguous in the screen dtype, else a copy), their squared norms and the bound's parameters."""

    def __init__(self, x: np.ndarray, dtype, sqnorms: np.ndarray):
        self.x = x  # original values: exact float64 distances come from these
        self.dtype = np.dtype(dtype)
        self.rounded = not np.can_cast(x.dtype, self.dtype, "safe")  # the screen sees rounded values
        self.screen = np.ascontiguousarray(x, dtype=self.dtype)
        self.sqnorms = _sqnorms(self.screen) if self.rounded else sqnorms  # float64
        self.sqnorms_screen = self.sqnorms.astype(self.dtype)
        self.sqnorm_max = float(self.sqnorms.max())

    def tolerance(self, sqnorm_q, sqnorm_max):
        """Bound on |screened - exact| squared distance (float64), per query."""
        f32 = self.dtype == np.float32
        return screen_tolerance(sqnorm_q, sqnorm_max, self.x.shape[1], rounded_inputs=self.rounded,
                                u=F32_UNIT_ROUNDOFF if f32 else F64_UNIT_ROUNDOFF, tiny=F32_TINY if f32 else F64_TINY)

    def keys(self, a, b, other: "_ScreenedSet", c, e, buffer):
        """``||y||^2 - 2 x.y`` for rows a:b of this set (x) against rows c:e of ``other`` (y), in ``buffer``."""
        out = buffer[:(b - a) * (e - c)].reshape(b - a, e - c)  # contiguous, so BLAS writes it directly
        keys = np.matmul(self.screen[a:b], other.screen[c:e].T, out=out)
        keys *= -2
        keys += other.sqnorms_screen[c:e]
        return keys


def _outward(t: np.ndarray, dtype, up: bool) -> np.ndarray:
    """``t`` (float64) in ``dtype``, rounded up (or down) so that comparisons stay on the safe side."""
    r = t.astype(dtype)
    wrong = r < t if up else r > t
    return np.where(wrong, np.nextafter(r, np.array(np.inf if up else -np.inf, dtype)), r)


def _exact_sqdist(x: np.ndarray, i: np.ndarray, y: np.ndarray, j: np.ndarray) -> np.ndarray:
    """``sum((x[i] - y[j])^2)`` per pair, in float64, directly (not the expanded form)."""
    out = np.empty(i.size)
    step = max(1, _PAIR_ELEMENTS // x.shape[1])
    for s in range(0, i.size, step):
        diff = x[i[s:s + step]].astype(np.float64) - y[j[s:s + step]]
        out[s:s + step] = np.einsum("ij,ij->i", diff, diff)
    return out


def _pairs(mask: np.ndarray):
    """Row and column indices of the True entries of a 2-D mask (faster than ``np.nonzero``)."""
    return np.divmod(np.flatnonzero(mask), mask.shape[1])


def _tiles(n_rows: int, n_cols: int, rows: int, cols: int):
    """Yield (a, b, c, e): row block a:b against column chunk c:e, row-major."""
    for a in range(0, n_rows, rows):
        for c in range(0, n_cols, cols):
            yield a, min(a + rows, n_rows), c, min(c + cols, n_cols)


def _kth_radii(p: _ScreenedSet, k: int, rows: int, cols: int) -> np.ndarray:
    """Squared distance of each row to its k-th nearest neighbour in the same set, self excluded by index."""
    n = p.x.shape[0]
    buffer = np.empty(min(rows, n) * min(cols, n), dtype=p.dtype)
    radii2 = np.empty(n)
    for a, b, c, e in _tiles(n, n, rows, cols):
        if c == 0:  # new row block
            tol2 = 2 * p.tolerance(p.sqnorms[a:b], p.sqnorm_max)
            best = np.full((b - a, k), np.inf, dtype=p.dtype)  # k smallest screened keys so far
            found = []  # (row, column, key) of pairs that may be among the k nearest
        keys = p.keys(a, b, p, c, e, buffer)  # squared distance minus ||x||^2 (a row constant)
        own = np.arange(max(a, c), min(b, e))
        keys[own - a, own - c] = np.inf  # self, excluded by index
        top = keys if e - c <= k else np.partition(keys, k - 1, axis=1)[:, :k]
        best = np.partition(np.concatenate([best, top], axis=1), k - 1, axis=1)[:, :k]
        # every pair whose exact distance can be among the k smallest has key <= k-th key + 2 tol
        thr = _outward(best[:, k - 1].astype(np.float64) + tol2, p.dtype, up=True)
        qi, cj = _pairs(keys <= thr[:, None])
        found.append((qi, cj + c, keys[qi, cj]))
        if e == n:  # row block done: the k-th smallest exact distance among the candidates
            thr = _outward(best[:, k - 1].astype(np.float64) + tol2, p.dtype, up=True)
            qi, cj, key = (np.concatenate(parts) for parts in zip(*found))
            keep = key <= thr[qi]
            qi, cj = qi[keep], cj[keep]
            exact = _exact_sqdist(p.x, qi + a, p.x, cj)
            order = np.lexsort((exact, qi))
            counts = np.bincount(qi, minlength=b - a)  # >= k for every row
            radii2[a:b] = exact[order][np.cumsum(counts) - counts + k - 1]
    return radii2


def _prdc_numpy(real: np.ndarray, fake: np.ndarray, k: int, block_size: int | None) -> dict:
    sq_real, sq_fake = _sqnorms(real), _sqnorms(fake)
    # float32 screen unless squared distances (<= 4 max ||x||^2) could overflow it, or all products
    # underflow towards its subnormals; then float64 (a copy of non-float64 inputs)
    dtype = np.float32 if 2.0 ** -100 < max(sq_real.max(), sq_fake.max()) < 2.0 ** 120 else np.float64
    r, f = _ScreenedSet(real, dtype, sq_real), _ScreenedSet(fake, dtype, sq_fake)
    n, m = real.shape[0], fake.shape[0]
    rows = block_size or PRDC_BLOCK_ROWS
    cols = max(1, PRDC_BLOCK_ELEMENTS // rows)
    r2_real, r2_fake = _kth_radii(r, k, rows, cols), _kth_radii(f, k, rows, cols)
    radius_real, radius_fake = np.sqrt(r2_real), np.sqrt(r2_fake)
    count = np.zeros(m, dtype=np.int64)  # real balls containing each fake
    covered = np.zeros(n, dtype=bool)  # real ball contains a fake
    recalled = np.zeros(n, dtype=bool)  # real inside a fake ball
    buffer = np.empty(min(rows, m) * min(cols, n), dtype=dtype)
    for a, b, c, e in _tiles(m, n, rows, cols):  # fake rows a:b against reals c:e
        if c == 0:  # thresholds +- the bound, rounded outwards: below lo surely inside, above hi surely not
            tol = f.tolerance(f.sqnorms[a:b], r.sqnorm_max)
            bounds_real = [_outward(r2_real + sign * tol.max(), dtype, up=sign > 0) for sign in (-1, 1)]
            bounds_fake = [_outward(r2_fake[a:b] + sign * tol, dtype, up=sign > 0)[:, None] for sign in (-1, 1)]
        dist2 = f.keys(a, b, r, c, e, buffer)
        dist2 += f.sqnorms_screen[a:b, None]
        for per_fake, (lo, hi) in ((False, [t[c:e] for t in bounds_real]), (True, bounds_fake)):
            inside = dist2 < lo
            unsure = dist2 <= hi
            unsure &= ~inside
            if per_fake:
                recalled[c:e] |= inside.any(0)
            else:
                count[a:b] += inside.sum(1)
                covered[c:e] |= inside.any(0)
            qi, cj = _pairs(unsure)
            if qi.size:  # near a radius: the float64 distance decides, as prdc compares distances
                d = np.sqrt(_exact_sqdist(fake, qi + a, real, cj + c))
                hit = d < (radius_fake[qi + a] if per_fake else radius_real[cj + c])
                qi, cj = qi[hit], cj[hit]
                if per_fake:
                    recalled[cj + c] = True
                else:
                    count[a:b] += np.bincount(qi, minlength=b - a)
                    covered[cj + c] = True
    return {"precision": float((count > 0).mean()), "recall": float(recalled.mean()),
            "density": (1.0 / k) * (float(count.sum()) / m), "coverage": float(covered.mean())}


# ---------------------------------------------------------------------------------------- PRDC (torch)
def _tensor(x, name: str, min_rows: int, why: str):
    import torch

    from .retrieval import as_feature_tensor

    x = as_feature_tensor(x, name).detach()
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows{why}, got {x.shape[0]}")
    if x.is_floating_point():
        bad = ~torch.isfinite(x).all(dim=1)
        if bool(bad.any()):
            raise _bad_rows_error(name, bad.nonzero().flatten().tolist())
    return x


def _prdc_torch(real, fake, k: int, device, backend: str, block_size: int | None) -> dict:
    import torch

    from .retrieval import FeatureBank

    why = f" (k + 1 for k = {k})"
    r, f = _tensor(real, "real_features", k + 1, why), _tensor(fake, "fake_features", k + 1, why)
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"real_features have dimension {r.shape[1]} but fake_features have {f.shape[1]}")
    real_bank = FeatureBank(r, device=device, backend=backend, block_size=block_size)
    fake_bank = FeatureBank(f, device=device, backend=backend, block_size=block_size)
    f = fake_bank.features  # same stored (float32) values the bank uses
    # radii: distance to the k-th neighbour within the own set, self excluded by index
    r_real = real_bank.knn(None, k, exclude_self=True, out_dtype=torch.float64)[0][:, -1]
    r_fake = fake_bank.knn(None, k, exclude_self=True, out_dtype=torch.float64)[0][:, -1]
    del fake_bank
    dev = real_bank.device
    r2_real, r2_fake = r_real.square().to(torch.float32), r_fake.square().to(torch.float32)
    slack = 4 * F32_UNIT_ROUNDOFF * float(max(r2_real.max(), r2_fake.max()))  # float32 rounding of the radii
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


def prdc(real_features, fake_features, k: int = 5, *, device=None, backend: str = "auto",
         block_size: int | None = None) -> dict:
    """Precision, recall, density and coverage with k-NN radii (conventions of ``prdc.compute_prdc``).

    Args:
        real_features, fake_features: ``[N, d]`` and ``[M, d]``, at least ``k + 1`` rows each.
        k: neighbours for the radii.
        device, backend: with ``backend="auto"``, inputs on the CPU (numpy arrays, CPU tensors)
            run in numpy (numpy arrays never import torch), unless ``device`` names another
            device; GPU tensors (``device=None``), ``device="cuda"`` or an explicit backend run
            through :class:`~irs_callbacks.retrieval.FeatureBank` on that device.
        block_size: rows per block (numpy default :data:`PRDC_BLOCK_ROWS`, against tiles of about
            :data:`PRDC_BLOCK_ELEMENTS` distances; torch: :class:`FeatureBank`'s default). Results
            do not depend on it.
    Returns:
        dict of Python floats ``precision, recall, density, coverage``.
    """
    k = check_int(k, "k", 1)
    block_size = None if block_size is None else check_int(block_size, "block_size", 1)
    on_gpu = [_is_tensor(x) and x.device.type != "cpu" for x in (real_features, fake_features)]
    torch_path = backend != "auto" or (str(device) != "cpu" if device is not None else any(on_gpu))
    if torch_path:
        return _prdc_torch(real_features, fake_features, k, device, backend, block_size)
    r, f = _pair(real_features, fake_features, min_rows=k + 1, why=f" (k + 1 for k = {k})")
    return _prdc_numpy(r, f, k, block_size)


def vendi(features, *, q: float = 1.0) -> float:
    """Vendi score of one feature set with the cosine (normalised linear) kernel, d x d form."""
    x = _as_array(features, "features", min_rows=1)
    s = np.zeros((x.shape[1], x.shape[1]))
    for _, rows in _row_chunks(x):
        rows /= np.abs(rows).max(axis=1, keepdims=True).clip(min=np.finfo(np.float64).tiny)  # no overflow below
        rows /= np.linalg.norm(rows, axis=1, keepdims=True).clip(min=1e-300)
        s += rows.T @ rows
    w = np.linalg.eigvalsh(s / x.shape[0])
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
        device, backend: where and how the k-NN work runs (see :func:`prdc`).
    Returns:
        dict with keys among ``fid, kid_mean, kid_std, precision, recall, density, coverage,
        vendi`` (Vendi of the fake features) and ``vendi_real``; values are Python floats.
    """
    if isinstance(metrics, str):
        metrics = [metrics]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {METRICS}")
    if {"fid", "kid", "vendi"}.intersection(metrics):
        r, f = _pair(real_features, fake_features)  # numpy views (host copies of GPU tensors)
    out = {}
    if "fid" in metrics:
        out["fid"] = fid(r, f)
    if "kid" in metrics:
        out["kid_mean"], out["kid_std"] = kid(r, f, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
    wanted = {"precision", "recall", "density", "coverage"}
    chosen = wanted if "prdc" in metrics else wanted.intersection(metrics)
    if chosen:  # the original inputs: GPU tensors keep their device and the torch path
        values = prdc(real_features, fake_features, k, device=device, backend=backend)
        out.update({key: values[key] for key in ("precision", "recall", "density", "coverage") if key in chosen})
    if "vendi" in metrics:
        out["vendi"] = vendi(f, q=vendi_q)
        out["vendi_real"] = vendi(r, q=vendi_q)
    return out
