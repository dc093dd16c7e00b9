"""Exact nearest-neighbour retrieval of training features (IRS paper Sec. 3.2, Eqs. 3, 11-12).

:class:`FeatureBank` holds the N training features and answers, for a batch of query features,
which training row is nearest. Distances (appendix 9):

- ``"euclidean"`` (paper default, Eq. 12): ``||q - b||_2``;
- ``"cosine"`` (Eq. 11): ``1 - q.b / (||q|| ||b||)``; a zero vector has cosine similarity 0 to
  everything (distance 1).

Answers are exact and deterministic: the distances are evaluated in float64 from the bank's
float32 *master* values (the features as given, rounded to float32 once) and ties go to the
lowest bank index, so an answer equals the float64 brute force ``argmin_j dist(q, b_j)``.

How (two stages). A *screen* ranks every row with a fast matrix product on a stored copy of the
bank in ``screen_dtype`` (float32, float16 or bfloat16; expanded form ``||b||^2 - 2 q.b``,
accumulated in float32, on tensor cores on CUDA), keeps the best ``k + candidates`` rows per query,
and a rigorous bound on the screen's rounding error (:func:`irs_callbacks._rounding.product_screen_tolerance`:
rounding of both operands, float32 or tensor-core accumulation with a stated safety margin)
tells which of them can still win; those are re-ranked exactly in float64. Queries with more
near-ties than candidates are re-scanned and every row inside the error band is evaluated
exactly. The half-precision copy is centred (the bank mean of a row sample is subtracted: every
Euclidean distance is unchanged and the error bound, proportional to the squared norms, shrinks
for features with a large common component) and scaled by a power of two (exact), so large
features (random-Inception norms reach 1e8) never overflow float16. Each query row gets its own
power-of-two scale. On CUDA the half screen runs ``torch.mm(..., out_dtype=torch.float32)`` on
tensor cores. On CPUs with native bfloat16 matrix products (AVX512-BF16 / AMX) a bfloat16 screen
runs them (bfloat16-rounded results, in the bound); otherwise a half screen is emulated exactly
as "round both operands to the half type, multiply-accumulate in float32", so CI tests its logic
on any CPU.

Where the data lives (``device`` = where the screen runs and answers are returned):

- float32 screen (the CPU default without native bfloat16): the master *is* the screen copy (no
  second copy; a float32 tensor already on ``device`` is used as is); cosine banks add a normalised copy;
- bfloat16 screen (the CPU default with native bfloat16 products, 3-4.7x faster there): a half
  copy next to the shared master;
- half screen (default on CUDA: float16): the GPU holds ``N d`` half values (1.28M x 2048:
  5.2 GB instead of 10.5 GB); the float32 master stays in host memory (``master_device="cpu"``,
  shared with the caller's CPU float32 tensor, never copied) and the few candidate rows a batch
  needs are gathered through a pinned buffer. ``master_device="cuda"`` keeps it on the GPU
  instead (3x the half copy; no host traffic).

Why float16 by default on CUDA: both half types run at the same tensor-core rate (H100/H200:
~990 dense TFLOP/s), but float16 keeps 11 significant bits to bfloat16's 8, so its input-rounding
term is 8x smaller (2^-10 vs 2^-7 of the squared norms) and fewer rows fall inside the error band;
bfloat16's wider exponent range buys nothing once stored values are scaled by powers of two.

``backend="faiss"`` screens with faiss' exact flat index (``IndexFlatL2`` / ``IndexFlatIP``;
on CUDA faiss' GPU index on the bank's device when faiss was built with GPU support) and
re-ranks the same way, so faiss' own tie order never leaks out. ``backend="auto"`` is torch: on
the development CPU faiss was faster in two of four measured cells and slower in two, with no
consistent pattern; on CUDA it is unmeasured (:meth:`FeatureBank.resolve_backend`).

:class:`ShardedFeatureBank` splits the rows over the processes of a ``torch.distributed`` run
(each rank screens its shard; collective search). :class:`LearnedSet` accumulates which training
rows were retrieved (``N_learned``, Eq. 3).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._rounding import (BF16_TINY, BF16_UNIT_ROUNDOFF, F16_TINY, F16_UNIT_ROUNDOFF, F32_TINY, F32_UNIT_ROUNDOFF,
                        TENSOR_CORE_UNIT_ROUNDOFF, TF32_UNIT_ROUNDOFF, gamma, product_screen_tolerance)

__all__ = ["FeatureBank", "ShardedFeatureBank", "LearnedSet", "DISTANCES", "BACKENDS", "SCREEN_DTYPES",
           "faiss_available", "as_feature_tensor", "finite_rows", "shard_range", "resolve_screen_dtype",
           "cpu_has_bf16_matmul"]

DISTANCES = ("euclidean", "cosine")
BACKENDS = ("auto", "torch", "faiss")
#: screen dtypes by name (``FeatureBank(screen_dtype=...)`` takes the name or the torch dtype)
SCREEN_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_U32 = F32_UNIT_ROUNDOFF
_U64_PRE = 2.0 ** -52  # float64 centring/normalisation before a rounding to the screen type
_U32_PRE = 2.0 ** -23  # float32 centring (Euclidean half screens) before a rounding to the screen type
_HALF_UNITS = {torch.float16: (F16_UNIT_ROUNDOFF, F16_TINY), torch.bfloat16: (BF16_UNIT_ROUNDOFF, BF16_TINY)}
#: default screened candidates beyond k (wider error bands for the half types)
_EXTRA_CANDIDATES = {torch.float32: 15, torch.float16: 31, torch.bfloat16: 31}
_SCALE_TOP = 15  # a scaled half row has its largest |value| in [2^14, 2^15) (float16 max: 65504)
_BANK_HEADROOM = 3  # the bank's scale is set from a row sample, 2^3 below the top; rescaled if exceeded
_MEAN_SAMPLE = 1024  # rows sampled (strided) for the centring vector and the initial scale
_PREP_ELEMENTS = 2 ** 23  # float64 elements per preparation chunk (64 MB)
_PAIR_ELEMENTS = 2 ** 21  # float64 elements per chunk of exact pairs: its master rows are fetched per chunk (16 MB)
_PINNED_ELEMENTS = 2 ** 24  # float32 elements of the pinned staging buffer kept between gathers (64 MB)
_LARGE = 2.0 ** 120  # squared norms beyond this could overflow the float32 keys


def faiss_available() -> bool:
    """True when ``import faiss`` works."""
    try:
        import faiss  # noqa: F401
    except Exception:
        return False
    return True


def _faiss_gpus() -> int:
    try:
        import faiss

        return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    except Exception:
        return 0


def as_feature_tensor(x, name: str) -> torch.Tensor:
    """``x`` (tensor or ndarray) as a 2-D real tensor ``[N, d]``, or a TypeError/ValueError naming ``name``."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray of shape [N, d], got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape [N, d] (2 dimensions), got shape {tuple(x.shape)}")
    if not (x.is_floating_point() or x.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)):
        raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
    return x


def resolve_screen_dtype(screen_dtype, device) -> torch.dtype:
    """The screen dtype for ``screen_dtype``. None: float16 on CUDA; on the CPU bfloat16 where
    the CPU has native bfloat16 matrix products (:func:`cpu_has_bf16_matmul`), else float32."""
    if screen_dtype is None:
        if torch.device(device).type == "cuda":
            return torch.float16
        return torch.bfloat16 if (torch.device(device).type == "cpu" and cpu_has_bf16_matmul()) else torch.float32
    dtype = SCREEN_DTYPES.get(screen_dtype, screen_dtype) if isinstance(screen_dtype, str) else screen_dtype
    if dtype not in SCREEN_DTYPES.values():
        raise ValueError(f"screen_dtype must be one of {', '.join(SCREEN_DTYPES)} (or the torch dtype), "
                         f"got {screen_dtype!r}")
    return dtype


_CPU_BF16 = None


def cpu_has_bf16_matmul() -> bool:
    """True when this CPU multiplies bfloat16 matrices natively (AVX512-BF16 or AMX-BF16, read
    from /proc/cpuinfo): there torch's bfloat16 ``mm`` (oneDNN, float32 accumulation) ran 4.7x
    faster than float32 on the development machine; elsewhere it is emulated and slow."""
    global _CPU_BF16
    if _CPU_BF16 is None:
        try:
            with open("/proc/cpuinfo") as handle:
                flags = set(" ".join(line for line in handle if line.startswith("flags")).split())
        except OSError:
            flags = set()
        _CPU_BF16 = bool(flags & {"avx512_bf16", "amx_bf16"}) and torch.backends.mkldnn.is_available()
    return _CPU_BF16


def _float32_matmul_unit(device: torch.device) -> float:
    """Input unit round-off of a float32 matrix product under torch's precision settings (0: IEEE)."""
    precision = torch.get_float32_matmul_precision()
    if precision == "medium":  # may use bfloat16 (oneDNN on CPU) or TF32
        return BF16_UNIT_ROUNDOFF
    if precision == "high" or (device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32):
        return TF32_UNIT_ROUNDOFF
    return 0.0


def _exponent(value: float) -> int:
    """e with value in [2^(e-1), 2^e) (0 for 0)."""
    return math.frexp(value)[1]


def _max_abs(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """max |x| (over ``dim``), without an |x| temporary (``aminmax`` is ~20x faster than an inf-norm)."""
    low, high = torch.aminmax(x) if dim is None else torch.aminmax(x, dim=dim)
    return torch.maximum(-low, high)


def _round_up_f32(x: torch.Tensor) -> torch.Tensor:
    """float32 values >= the float64 ``x`` (for comparisons of float32 keys with float64 thresholds)."""
    y = x.to(torch.float32)
    return torch.where(y.double() < x, torch.nextafter(y, torch.full_like(y, math.inf)), y)


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """Bool ``[n]``: which rows of ``[n, d]`` ``x`` hold no NaN/inf.

    One vectorised row sum (NaN and inf propagate; ~50x faster than ``torch.isfinite`` on a
    CPU and without its ``[n, d]`` bool temporary); only rows whose sum is not finite (a NaN/inf,
    or finite values overflowing the sum) are then checked element by element.
    """
    if not x.is_floating_point():
        return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    ok = torch.isfinite(x.sum(1))
    if not bool(ok.all()):
        suspects = (~ok).nonzero().flatten()
        ok[suspects] = torch.isfinite(x[suspects]).all(1)
    return ok


_HASH_COLUMNS = 128  # duplicate candidates are rows equal on these columns; then compared in full


def _row_hashes(rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Four exact hashes ``[m, 4]`` (float64 integers) of the bit patterns of float32 rows, on a
    fixed subset of at most 128 columns (rows equal in full are equal there; the candidates are
    compared in full afterwards).

    Each 32-bit pattern is read as two signed 16-bit halves; a float64 matrix product with integer
    weights below ``2^(36 - log2 2c)`` (c columns) sums products below 2^52, so it is exact in any
    summation order (identical rows hash identically on any device) and runs at BLAS speed.
    -0.0 and +0.0 hash alike.
    """
    columns = _hash_columns(rows.shape[1], rows.device)
    part = rows if columns is None else rows[:, columns]
    return (part + 0).view(torch.int16).to(torch.float64) @ weights


def _hash_columns(d: int, device) -> torch.Tensor | None:
    if d <= _HASH_COLUMNS:
        return None
    gen = torch.Generator(device="cpu").manual_seed(1)
    return torch.randperm(d, generator=gen)[:_HASH_COLUMNS].sort().values.to(device)


def _select(rows, cols, keys, n_rows: int, k: int):
    """Per row, the k smallest keys, ties to the lowest column: (keys, cols) [n_rows, k]; rows
    with fewer than k pairs are padded with (inf, -1)."""
    o = torch.argsort(cols, stable=True)
    o = o[torch.argsort(keys[o], stable=True)]
    o = o[torch.argsort(rows[o], stable=True)]
    rows, cols, keys = rows[o], cols[o], keys[o]
    counts = torch.bincount(rows, minlength=n_rows)
    starts = torch.cumsum(counts, 0) - counts
    offs = torch.arange(k, device=rows.device)
    valid = offs[None, :] < counts[:, None]
    out_k = torch.full((n_rows, k), math.inf, dtype=torch.float64, device=keys.device)
    out_c = torch.full((n_rows, k), -1, dtype=torch.int64, device=keys.device)
    if rows.numel():
        pos = (starts[:, None] + offs).clamp_max(rows.numel() - 1)
        out_k = torch.where(valid, keys[pos], out_k)
        out_c = torch.where(valid, cols[pos], out_c)
    return out_k, out_c


class _Screen:
    """One screen: a stored copy of the bank and what its error bound needs."""

    def __init__(self, data, sqnorms, sqnorm_max, mean, bank_scale, floor_b, dtype, mm):
        self.data = data  # [N, d] stored rows: (row - mean) * bank_scale in dtype
        self.sqnorms = sqnorms  # float32 [N]: bank_scale^2 ||row - mean||^2 (+ 1 for zero cosine rows)
        self.sqnorm_max = sqnorm_max  # unscaled, float
        self.mean = mean  # centring vector (float32 or float64) or None
        self.bank_scale = bank_scale  # power of two
        self.floor_b = floor_b  # rounding floor of the stored rows, unscaled
        self.dtype = dtype
        self.mm = mm  # "float32", "cuda" (tensor cores, float32 out), "cpu-bf16" (bfloat16 out), "emulated"


class FeatureBank:
    """N training features with exact nearest-neighbour search (module docstring).

    Args:
        features: ``[N, d]`` tensor or array (any real dtype; rounded to float32 once: the
            *master* values every distance is exact for). Rows must be finite (a bank with NaN/inf
            rows is refused with a ValueError naming the count and the first rows).
        distance: ``"euclidean"`` (default) or ``"cosine"``.
        device: where the screen runs and answers are returned (default: the features' device).
        screen_dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` (or the torch dtype);
            default (:func:`resolve_screen_dtype`): float16 on CUDA; on the CPU bfloat16 where it
            has native bfloat16 products, else float32. Answers never depend on it.
        master_device: where the float32 master lives; default: host memory (``"cpu"``) for a
            half screen on CUDA, else ``device``. A float32 tensor already there is used without a copy.
        backend: ``"torch"``, ``"faiss"`` or ``"auto"`` (default: torch; see :meth:`resolve_backend`).
            faiss screens in float32 (``screen_dtype`` must be float32).
        block_size: queries per block (default 1024 on CPU, 4096 on CUDA).
        chunk_size: bank rows per matrix product (default 8192 on CPU, 32768 on CUDA).
        candidates: screened rows per query beyond k before the exact re-rank (default 15 for
            float32, 31 for half screens; more only costs screen time).
    """

    def __init__(self, features, *, distance: str = "euclidean", device=None, screen_dtype=None,
                 master_device=None, backend: str = "auto", block_size: int | None = None,
                 chunk_size: int | None = None, candidates: int | None = None):
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        x = as_feature_tensor(features, "features")
        n, d = x.shape
        if n == 0 or d == 0:
            raise ValueError(f"features must be a non-empty [N, d] array, got shape {tuple(x.shape)}")
        self.device = torch.device(device) if device is not None else x.device
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.distance = distance
        if screen_dtype is None and backend == "faiss":
            screen_dtype = torch.float32  # faiss' flat indexes compute in float32
        self.screen_dtype = resolve_screen_dtype(screen_dtype, self.device)
        half = self.screen_dtype != torch.float32
        if master_device is None:
            master_device = "cpu" if (half and self.device.type == "cuda") else self.device
        self.master_device = torch.device(master_device)
        self.n_train, self.dim = n, d
        cuda = self.device.type == "cuda"
        self.block_size = int(block_size or (4096 if cuda else 1024))
        self.chunk_size = int(chunk_size or (32768 if cuda else 8192))
        self.candidates = int(candidates if candidates is not None else _EXTRA_CANDIDATES[self.screen_dtype])
        if self.block_size < 1 or self.chunk_size < 1 or self.candidates < 0:
            raise ValueError("block_size and chunk_size must be positive integers and candidates >= 0, got "
                             f"{block_size!r}, {chunk_size!r}, {candidates!r}")
        self.backend = self.resolve_backend(backend, self.device)
        if self.backend == "faiss" and half:
            raise ValueError(f"backend='faiss' screens in float32; got screen_dtype={self.screen_dtype} "
                             "(use screen_dtype='float32' or backend='torch')")
        # the float32 master: shares memory with `features` when already float32 on master_device
        master = x.detach().to(self.master_device, torch.float32)
        if not master.is_contiguous():
            master = master.contiguous()
        self.features = master  #: float32 master values ``[N, d]`` on ``master_device``
        # how the half screen multiplies: "cuda" (tensor cores, float32 out), "cpu-bf16" (oneDNN,
        # bfloat16 out), or "emulated" (exact half values in a float32 product)
        mm = "float32"
        if half:
            if cuda and self._probe_half_mm():
                mm = "cuda"
            elif (self.device.type == "cpu" and self.screen_dtype == torch.bfloat16 and cpu_has_bf16_matmul()):
                mm = "cpu-bf16"
            else:
                mm = "emulated"
        self._pinned = None  # staging buffer for gathers from a host master
        self._duplicate_count = None
        self._screen = self._prepare_screen(mm)
        self._fallback = None  # float32 screen on the master (Euclidean half screens with the master on device)
        self._faiss_index = self._faiss_resources = None
        if self.backend == "faiss":
            self._faiss_index = self._build_faiss()

    # ------------------------------------------------------------------ construction
    @staticmethod
    def resolve_backend(backend: str, device) -> str:
        """The backend ``"auto"`` resolves to.

        Rule (measured with ``benchmarks/bench_retrieval.py``, README "Retrieval"): the torch
        backend is used unless faiss is asked for explicitly. On the 2-core development CPU
        (d = 2048, N = 10,000 and 100,000, exact answers for both) faiss' flat index was faster
        than torch in two of four cells and slower in two, with no consistent pattern; the GPU
        case is unmeasured, so ``"auto"`` never switches to faiss.
        """
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "faiss" and not faiss_available():
            raise ValueError("backend='faiss' needs the faiss package (pip install faiss-cpu, or faiss-gpu for CUDA)")
        return "torch" if backend == "auto" else backend

    def _probe_half_mm(self) -> bool:
        """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` runs for the screen dtype here."""
        a = torch.ones(2, 2, dtype=self.screen_dtype, device=self.device)
        try:
            out = torch.mm(a, a, out_dtype=torch.float32)
        except Exception:
            return False
        return out.dtype == torch.float32 and float(out[0, 0]) == 2.0

    def _rows_to_device(self, start: int, stop: int) -> torch.Tensor:
        rows = self.features[start:stop]
        return rows.to(self.device, non_blocking=rows.is_pinned())

    def _prepare_screen(self, mm: str) -> _Screen:
        """Check finiteness, build the screen copy and its float32 squared norms, chunk by chunk
        on ``device`` (one pass over the master)."""
        n, d, dev = self.n_train, self.dim, self.device
        half = self.screen_dtype != torch.float32
        cosine = self.distance == "cosine"
        share = not half and not cosine and self.master_device == dev
        mean = None
        exp_b = 0  # the half copy stores rows x 2^exp_b
        if half:
            stride = max(1, n // _MEAN_SAMPLE)
            # any centring vector leaves distances unchanged: Euclidean banks use a float32 one (rows are
            # centred in float32), cosine banks a float64 mean of unit rows
            sample = self.features[::stride].to(dev, torch.float64 if cosine else torch.float32)
            sample = sample[finite_rows(sample)]
            if cosine:
                sample = sample / sample.norm(dim=1, keepdim=True).clamp_min(1e-300)
            mean = sample.sum(0) / max(1, sample.shape[0])
            top = float(_max_abs(sample - mean)) if sample.shape[0] else 0.0
            exp_b = _SCALE_TOP - _BANK_HEADROOM - _exponent(top)
        screen = self.features if share else torch.empty(n, d, dtype=self.screen_dtype, device=dev)
        sqnorms = torch.empty(n, dtype=torch.float64, device=dev)
        step = max(1, _PREP_ELEMENTS // d)
        for s in range(0, n, step):
            e = min(s + step, n)
            rows32 = self._rows_to_device(s, e)
            if not bool(finite_rows(rows32).all()):
                self._raise_non_finite()
            if share:  # the screen is the master: only the float64 squared norms (|x| < 2^128: no overflow)
                sqnorms[s:e] = torch.linalg.vector_norm(rows32, dim=1, dtype=torch.float64).square()
                continue
            if half and not cosine:  # centred in float32 (one rounding, in the bound), norms in float64
                x = rows32 - mean
                sqnorms[s:e] = torch.linalg.vector_norm(x, dim=1, dtype=torch.float64).square()
                exp_b = self._store_half(screen, s, e, x, exp_b)
                continue
            x = rows32.to(torch.float64)
            if cosine:
                norms = x.norm(dim=1, keepdim=True)
                x = x / norms.clamp_min(1e-300)
            if mean is not None:
                x = x - mean
            sq = x.square().sum(1)
            if cosine:  # a zero row is at distance 1 from everything: key as if ||b||^2 = 1, q.b = 0
                sq = torch.where(norms[:, 0] == 0, sq + 1, sq)
            sqnorms[s:e] = sq
            if half:
                exp_b = self._store_half(screen, s, e, x, exp_b)
            elif not share:
                screen[s:e] = x.to(torch.float32)
        sqnorm_max = float(sqnorms.max())
        if sqnorm_max > _LARGE:
            raise ValueError(f"features are too large for the float32 screen (squared norm {sqnorm_max:.3g} "
                             f"> 2^120); divide them by a common factor (nearest neighbours do not change)")
        bank_scale = 2.0 ** exp_b
        # rounding floor of the stored rows (flush-to-zero and rescaling included), unscaled
        floor_b = 2 * _HALF_UNITS[self.screen_dtype][1] / bank_scale if half else 2 * F32_TINY
        # screen keys only (the exact re-rank uses the master), stored scaled like the half rows: s_b^2 ||b||^2
        return _Screen(screen, (sqnorms * 4.0 ** exp_b).to(torch.float32), sqnorm_max, mean, bank_scale, floor_b,
                       self.screen_dtype, mm)

    def _has_fallback(self) -> bool:
        """Whether queries with wide half-precision error bands can be re-screened in float32 on the
        master itself: Euclidean banks whose master lives on ``device`` (CPU, or ``master_device="cuda"``)."""
        return (self._screen.dtype != torch.float32 and self.distance == "euclidean"
                and self.master_device == self.device and self.backend != "faiss")

    def _float32_fallback(self) -> _Screen:
        """The float32 screen on the master (no copy; squared norms computed on first use)."""
        if self._fallback is None:
            step = max(1, _PREP_ELEMENTS // self.dim)
            sq = torch.cat([torch.linalg.vector_norm(self.features[s:s + step], dim=1, dtype=torch.float64).square()
                            for s in range(0, self.n_train, step)])
            self._fallback = _Screen(self.features, sq.to(torch.float32), float(sq.max()), None, 1.0, 2 * F32_TINY,
                                     torch.float32, "float32")
        return self._fallback

    def _store_half(self, screen, start, stop, x, exp_b) -> int:
        """Store centred rows ``x`` x 2^exp_b in the half screen; returns the (possibly lowered) exponent."""
        top = float(_max_abs(x))
        if top * 2.0 ** exp_b >= 2.0 ** _SCALE_TOP:  # the row sample under-estimated: rescale stored rows
            new = _SCALE_TOP - _exponent(top)
            if start:
                screen[:start].mul_(2.0 ** (new - exp_b))  # exact but for subnormals (in the floor term)
            exp_b = new
        screen[start:stop].copy_(x.mul_(2.0 ** exp_b))  # (x is a temporary) exact scaling, one rounding
        return exp_b

    def _raise_non_finite(self):
        bad = []
        step = max(1, _PREP_ELEMENTS // self.dim)
        for s in range(0, self.n_train, step):
            ok = finite_rows(self.features[s:s + step])
            bad.append((~ok).nonzero().flatten().cpu() + s)
        rows = torch.cat(bad)
        raise ValueError(f"features contains {rows.numel()} non-finite (NaN/inf) rows, first "
                         f"{rows[:5].tolist()}; remove or repair them before building a FeatureBank")

    def _build_faiss(self):
        import faiss

        source = self._screen.data if self.distance == "cosine" else self.features
        xb = np.ascontiguousarray(source.to(torch.float32).cpu().numpy())
        cosine = self.distance == "cosine"
        self._faiss_gpu = self.device.type == "cuda" and _faiss_gpus() > 0
        if self._faiss_gpu:  # faiss' GPU flat index on this bank's device (one per rank in a distributed run)
            self._faiss_resources = faiss.StandardGpuResources()
            config = faiss.GpuIndexFlatConfig()
            config.device = int(self.device.index)
            config.useFloat16 = False
            make = faiss.GpuIndexFlatIP if cosine else faiss.GpuIndexFlatL2
            index = make(self._faiss_resources, self.dim, config)
        else:
            index = faiss.IndexFlatIP(self.dim) if cosine else faiss.IndexFlatL2(self.dim)
        index.add(xb)
        return index

    def __repr__(self) -> str:
        return (f"FeatureBank(n_train={self.n_train}, dim={self.dim}, distance={self.distance!r}, "
                f"device={str(self.device)!r}, screen_dtype={self.screen_dtype}, "
                f"master_device={str(self.master_device)!r}, backend={self.backend!r})")

    def __len__(self) -> int:
        return self.n_train

    @property
    def screen_bytes(self) -> int:
        """Bytes of the screen copy on ``device`` (0 extra when it is the master itself)."""
        data = self._screen.data
        return 0 if data is self.features else data.numel() * data.element_size()

    # ------------------------------------------------------------------ duplicates
    def _hash_weights(self) -> torch.Tensor:
        columns = min(self.dim, _HASH_COLUMNS)
        bits = 36 - math.ceil(math.log2(2 * columns))  # keeps every partial sum below 2^52
        gen = torch.Generator(device="cpu").manual_seed(0)
        weights = torch.randint(1, 2 ** bits, (2 * columns, 4), generator=gen, dtype=torch.int64)
        return weights.to(self.device, torch.float64)

    def _hash_rows(self, start: int, stop: int) -> torch.Tensor:
        rows = self._rows_to_device(start, stop)
        if self.distance == "cosine":
            x = rows.to(torch.float64)
            rows = (x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)).to(torch.float32)
        return rows

    @property
    def duplicate_count(self) -> int:
        """Number of master rows that exactly equal an earlier row (beyond the first of each group).

        For cosine banks rows are compared after normalisation (rounded to float32; positive
        multiples usually coincide, exactly so when the factor is a power of two). Computed on
        first access (one more pass over the master; nothing is kept): exact integer hashes of
        the bit patterns (a float64 matrix product) on ``device``, the colliding rows then
        compared exactly.
        """
        if self._duplicate_count is None:
            self._duplicate_count = self._count_duplicates()
        return self._duplicate_count

    def _count_duplicates(self) -> int:
        weights = self._hash_weights()
        hashes = torch.empty(self.n_train, 4, dtype=torch.float64, device=self.device)
        step = max(1, _PREP_ELEMENTS // self.dim)
        for s in range(0, self.n_train, step):
            hashes[s:s + step] = _row_hashes(self._hash_rows(s, s + step), weights)
        _, inverse, counts = torch.unique(hashes, dim=0, return_inverse=True, return_counts=True)
        del hashes
        suspects = (counts[inverse] > 1).nonzero().flatten()
        if suspects.numel() == 0:
            return 0
        rows32, where = self._master_rows(suspects)
        rows = rows32[where]
        if self.distance == "cosine":
            x = rows.double()
            rows = (x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)).to(torch.float32)
        distinct = torch.unique(rows + 0, dim=0).shape[0]  # exact check (guards against collisions)
        return int(suspects.numel() - distinct)

    # ------------------------------------------------------------------ master rows and exact distances
    def _master_rows(self, cols: torch.Tensor):
        """(float32 master rows on ``device``, inverse): row ``inverse[i]`` is master row ``cols[i]``.
        From a host master each distinct row is gathered once, through a pinned buffer kept between
        calls (at most ``_PINNED_ELEMENTS`` values; larger gathers use a transient pageable copy)."""
        if self.master_device == self.device:
            return self.features[cols], torch.arange(cols.numel(), device=self.device)
        unique, inverse = torch.unique(cols.to(self.master_device), return_inverse=True)
        m = unique.numel()
        cap = max(1, _PINNED_ELEMENTS // self.dim)  # rows of the largest pinned buffer kept
        if self.device.type == "cuda" and self.master_device.type == "cpu" and m <= cap:
            if self._pinned is None or self._pinned.shape[0] < m:
                self._pinned = torch.empty(max(m, min(1024, cap)), self.dim, dtype=torch.float32, pin_memory=True)
            buffer = self._pinned[:m]
            torch.index_select(self.features, 0, unique, out=buffer)
            rows = buffer.to(self.device, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()  # the buffer may be refilled next call
        else:
            rows = self.features[unique].to(self.device)
        return rows, inverse.to(self.device)

    def _exact_pairs(self, queries, qrow, cols) -> torch.Tensor:
        """Exact float64 keys (squared Euclidean, or cosine distance) of queries[qrow] to master rows cols.

        Pairs are evaluated in chunks of ``_PAIR_ELEMENTS // d``, each fetching only its own master
        rows: memory stays bounded however many pairs are asked for (band re-scans, exact scans)."""
        out = torch.empty(qrow.numel(), dtype=torch.float64, device=self.device)
        step = max(1, _PAIR_ELEMENTS // self.dim)
        for s in range(0, qrow.numel(), step):
            rows32, where = self._master_rows(cols[s:s + step])
            b = rows32[where].to(torch.float64)
            q = queries[qrow[s:s + step]].to(torch.float64)
            if self.distance == "euclidean":
                out[s:s + step] = b.sub_(q).square_().sum(1)
            else:
                den = b.norm(dim=1) * q.norm(dim=1)
                cos = torch.where(den > 0, (b * q).sum(1) / den.clamp_min(1e-300), torch.zeros_like(den))
                out[s:s + step] = (1 - cos).clamp(0, 2)
        return out

    def exact_distance(self, queries, query_index, bank_index) -> torch.Tensor:
        """Exact float64 distances (Eq. 11 or 12) between ``queries[query_index]`` and ``bank[bank_index]``."""
        q64 = self._prepare(queries).to(torch.float64)
        qi = torch.as_tensor(query_index, device=self.device).long().flatten()
        bi = torch.as_tensor(bank_index, device=self.device).long().flatten()
        keys = self._exact_pairs(q64, qi, bi)
        return keys.sqrt() if self.distance == "euclidean" else keys

    # ------------------------------------------------------------------ queries and the error bound
    def _prepare(self, queries, name="queries"):
        q = as_feature_tensor(queries, name)
        if q.shape[1] != self.dim:
            raise ValueError(f"{name} have dimension {q.shape[1]} but the bank has dimension {self.dim}")
        return q.to(self.device)

    def _screen_queries(self, scr: _Screen, qb):
        """Screen operands of float64 queries.

        Returns (operands [b, d], g float32 [b], Q float64 [b], offset [b], key_scale float64 [b],
        floor_q [b], accumulation floor [b], usable bool [b]). Operands are ``-sigma q`` (sigma a
        power of two per row: half screens put the largest |value| in [2^14, 2^15), float32 screens
        use 2), so that ``acc + g ||b||^2_stored`` with ``g = sigma / (2 s_b)`` is the key
        ``||b||^2 - 2 q.b`` times ``key_scale = sigma s_b / 2``: a positive factor per row, which
        changes no ranking and keeps float32 keys clear of underflow and overflow at any feature scale.
        ``key / key_scale + offset`` approximates the squared distance (cosine: of unit vectors).
        """
        if scr.dtype == torch.float32 and scr.mean is None and self.distance == "euclidean":
            sq = torch.linalg.vector_norm(qb, dim=1, dtype=torch.float64).square()  # float64, one pass
            operands = qb.to(torch.float32) * -2.0  # float32 inputs: exact; float64: one rounding
            return self._finish_queries(scr, operands, sq, sq, torch.full_like(sq, 2.0),
                                        torch.full_like(sq, 2 * F32_TINY))
        if scr.mean is not None and scr.mean.dtype == torch.float32 and qb.dtype != torch.float64:
            x = qb.to(torch.float32) - scr.mean  # Euclidean half screen: centred in float32
            _, ex = torch.frexp(_max_abs(x, dim=1))
            if bool((ex > -100).all()):  # (else the float64 path below)
                sq = torch.linalg.vector_norm(x, dim=1, dtype=torch.float64).square()
                sigma = torch.ldexp(torch.ones_like(x[:, 0]), (_SCALE_TOP - ex).to(torch.float32))  # exact
                operands = (x * -sigma[:, None]).to(scr.dtype)  # |max| in [2^14, 2^15)
                if scr.mm == "emulated":
                    operands = operands.to(torch.float32)
                sigma = sigma.to(torch.float64)
                return self._finish_queries(scr, operands, sq, sq, sigma, 2 * _HALF_UNITS[scr.dtype][1] / sigma)
        x = qb.to(torch.float64)
        offset_extra = None
        if self.distance == "cosine":
            norms = x.norm(dim=1, keepdim=True)
            x = x / norms.clamp_min(1e-300)
            offset_extra = (norms[:, 0] == 0).to(torch.float64)  # zero query: distance 1 to every row
        if scr.mean is not None:
            x = x - scr.mean
        sq = torch.linalg.vector_norm(x, dim=1).square()  # (one fused pass; relative error ~2^-52)
        offset = sq if offset_extra is None else sq + offset_extra
        if scr.dtype == torch.float32:
            sigma = torch.full_like(sq, 2.0)
            operands = x.to(torch.float32).mul_(-2.0)  # doubling is exact
            floor_q = torch.full_like(sq, 2 * F32_TINY)
        else:
            _, ex = torch.frexp(_max_abs(x, dim=1))
            sigma = torch.ldexp(torch.ones_like(sq), (_SCALE_TOP - 1 - ex).to(torch.float64)) * 2  # |max| -> [2^14, 2^15)
            operands = (x * -sigma[:, None]).to(scr.dtype)
            if scr.mm == "emulated":
                operands = operands.to(torch.float32)  # exact: the product runs in float32
            floor_q = 2 * _HALF_UNITS[scr.dtype][1] / sigma
        return self._finish_queries(scr, operands, sq, offset, sigma, floor_q)

    @staticmethod
    def _finish_queries(scr, operands, sq, offset, sigma, floor_q):
        g64 = sigma / (2 * scr.bank_scale)
        g = g64.to(torch.float32)
        key_scale = sigma * scr.bank_scale / 2
        acc_floor = F32_TINY / (sigma * scr.bank_scale)
        # finite rows with sq < 2^120 give finite operands (half: scaled below 2^15; float32: |2x| < 2^61)
        usable = torch.isfinite(g) & (g != 0) & (g.double() == g64) & torch.isfinite(key_scale) & (sq < _LARGE)
        return operands, g, sq, offset, key_scale, floor_q, acc_floor, usable

    def _units(self, scr: _Screen, faiss: bool = False) -> tuple[float, float]:
        """(input unit round-off, accumulation unit round-off) of this bank's screen products.

        Tensor cores, TF32/bfloat16 float32 products and oneDNN's bfloat16 kernels (blocked,
        flush-to-zero) get the tensor-core accumulation margin; IEEE float32 BLAS does not."""
        f32mm = _float32_matmul_unit(self.device)
        if scr.dtype == torch.float32:
            u_in = max(_U32, f32mm)
        else:
            u_half = _HALF_UNITS[scr.dtype][0]
            u_in = max(u_half, f32mm) if scr.mm == "emulated" else u_half
        tensor_cores = f32mm > 0 or scr.mm in ("cuda", "cpu-bf16")
        if faiss and getattr(self, "_faiss_gpu", False):  # faiss' cuBLAS products may use TF32
            u_in, tensor_cores = max(u_in, TF32_UNIT_ROUNDOFF), True
        pre = _U32_PRE if (scr.mean is not None and scr.mean.dtype == torch.float32) else _U64_PRE
        return u_in + pre, (TENSOR_CORE_UNIT_ROUNDOFF if tensor_cores else _U32)

    def _tolerance(self, scr: _Screen, sq, key_scale, floor_q, acc_floor, faiss: bool = False) -> torch.Tensor:
        """Rigorous bound on |screened key - exact key| per query, in the screened keys' scaled
        units (float64 [b]; unscaled for faiss)."""
        u_in, u_acc = self._units(scr, faiss)
        tol = product_screen_tolerance(sq, scr.sqnorm_max, self.dim, input_unit=u_in, accumulation_unit=u_acc,
                                       floor_q=floor_q, floor_b=scr.floor_b, accumulation_floor=acc_floor,
                                       key_floor=2.0 ** -125 / key_scale, cosine=self.distance == "cosine",
                                       output_unit=BF16_UNIT_ROUNDOFF if scr.mm == "cpu-bf16" else 0.0,
                                       norm_unit=3 * _U32 if scr.mean is not None else _U32)
        if faiss:  # faiss computes both squared norms and the sums in float32 too; its keys are unscaled
            return tol + (gamma(self.dim, u_acc) + 6 * _U32) * (sq + scr.sqnorm_max) * 2
        return tol * key_scale

    # ------------------------------------------------------------------ screening
    @staticmethod
    def _product(scr: _Screen, operands, start, stop):
        chunk = scr.data[start:stop]
        if scr.mm == "cuda":
            return torch.mm(operands, chunk.T, out_dtype=torch.float32)
        if scr.mm == "cpu-bf16":  # float32 accumulation, result rounded to bfloat16 (in the bound)
            return (operands @ chunk.T).to(torch.float32)
        if chunk.dtype != torch.float32:
            chunk = chunk.to(torch.float32)  # exact
        return operands @ chunk.T

    def _key_chunks(self, scr: _Screen, operands, g, sqnorms, self_rows=None):
        """Yield (start, end, keys): keys[i, j] = screened ||b_j||^2 - 2 q_i.b_j times key_scale[i] (float32)."""
        for s in range(0, self.n_train, self.chunk_size):
            e = min(s + self.chunk_size, self.n_train)
            acc = self._product(scr, operands, s, e)
            keys = torch.addcmul(acc, g[:, None], sqnorms[None, s:e], out=acc)
            if self_rows is not None:
                inside = (self_rows >= s) & (self_rows < e)
                if bool(inside.any()):
                    r = inside.nonzero().flatten()
                    keys[r, self_rows[r] - s] = math.inf
            yield s, e, keys

    def _screen_torch(self, scr: _Screen, operands, g, sqnorms, c, self_rows):
        best_v = best_i = None
        for s, e, keys in self._key_chunks(scr, operands, g, sqnorms, self_rows):
            v, i = keys.topk(min(c, e - s), dim=1, largest=False, sorted=False)
            i = i + s
            if best_v is not None:
                v, i = torch.cat([best_v, v], 1), torch.cat([best_i, i], 1)
                if v.shape[1] > c:
                    v, j = v.topk(c, dim=1, largest=False, sorted=False)
                    i = i.gather(1, j)
            best_v, best_i = v, i
        v, j = best_v.sort(dim=1)
        return v.to(torch.float64), best_i.gather(1, j)

    def _screen_faiss(self, qb, c, self_rows):
        x = qb.to(torch.float64)
        if self.distance == "cosine":
            x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)
        sq = x.square().sum(1)
        extra = 1 if self_rows is not None else 0
        D, I = self._faiss_index.search(np.ascontiguousarray(x.to(torch.float32).cpu().numpy()), c + extra)
        v = torch.from_numpy(D).to(self.device, torch.float64)
        i = torch.from_numpy(I).to(self.device)
        if self.distance == "cosine":  # inner products of unit rows -> ||b||^2 - 2 q.b
            v = self._screen.sqnorms.double()[i.clamp_min(0)] - 2 * v
        else:  # ||q||^2 + ||b||^2 - 2 q.b -> ||b||^2 - 2 q.b
            v = v - sq[:, None]
        v = torch.where(i < 0, torch.full_like(v, math.inf), v)
        if self_rows is not None:
            v = torch.where(i == self_rows[:, None], torch.full_like(v, math.inf), v)
        v, j = v.sort(dim=1, stable=True)
        return v[:, :c], i.gather(1, j)[:, :c]

    # ------------------------------------------------------------------ exact k-NN
    def _allowed(self, rows):
        """(number of allowed rows, bool mask [N] or None)."""
        if rows is None:
            return self.n_train, None
        rows = torch.as_tensor(rows, device=self.device)
        if rows.dtype == torch.bool:
            if rows.shape != (self.n_train,):
                raise ValueError(f"rows as a mask must have shape ({self.n_train},), got {tuple(rows.shape)}")
            mask = rows
        else:
            rows = rows.long().flatten()
            if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.n_train):
                raise ValueError(f"rows must be bank indices in [0, {self.n_train - 1}]")
            mask = torch.zeros(self.n_train, dtype=torch.bool, device=self.device)
            mask[rows] = True
        return int(mask.sum()), mask

    def _exact_scan(self, queries, k, self_rows, mask):
        """Exact keys of every allowed row (for queries the screen cannot handle): (keys, idx) [b, k]."""
        b = queries.shape[0]
        best_k = torch.full((b, k), math.inf, dtype=torch.float64, device=self.device)
        best_i = torch.full((b, k), -1, dtype=torch.int64, device=self.device)
        step = max(1, 2 ** 20 // max(1, b))  # about 2^20 pairs (index tensors of 8 MB) per step
        ar = torch.arange(b, device=self.device)
        for s in range(0, self.n_train, step):
            e = min(s + step, self.n_train)
            # bank-row-major: a chunk of pairs in _exact_pairs gathers each of its rows once for all b queries
            cols = torch.arange(s, e, device=self.device).repeat_interleave(b)
            rows = ar.repeat(e - s)
            keep = torch.ones_like(rows, dtype=torch.bool)
            if mask is not None:
                keep &= mask[cols]
            if self_rows is not None:
                keep &= cols != self_rows[rows]
            rows, cols = rows[keep], cols[keep]
            keys = self._exact_pairs(queries, rows, cols)
            have = best_i >= 0
            r0, j0 = have.nonzero(as_tuple=True)
            best_k, best_i = _select(torch.cat([r0, rows]), torch.cat([best_i[r0, j0], cols]),
                                     torch.cat([best_k[r0, j0], keys]), b, k)
        return best_k, best_i

    def _first_rows(self, b, k, self_rows, mask):
        """Cosine zero queries: every row is at distance 1, so the k lowest allowed indices."""
        ones = torch.ones(b, k, dtype=torch.float64, device=self.device)
        if mask is not None:  # (rows and exclude_self are never combined)
            return ones, mask.nonzero().flatten()[:k][None, :].expand(b, -1).contiguous()
        j = torch.arange(k, device=self.device)[None, :].expand(b, -1)
        if self_rows is not None:  # skip the query's own row
            j = j + (j >= self_rows[:, None]).long()
        return ones, j.contiguous()

    @staticmethod
    def _masked(scr: _Screen, mask):
        """The screen's squared norms with rows outside ``mask`` at +inf (never candidates)."""
        if mask is None:
            return scr.sqnorms
        return torch.where(mask, scr.sqnorms, torch.full_like(scr.sqnorms, math.inf))

    def _knn_block(self, qb, k, self_rows, n_allowed, mask, scr: _Screen | None = None):
        """Exact k-NN keys of a block of finite queries (any real dtype, on ``device``):
        (keys float64 [b, k], indices [b, k]). ``scr``: the screen (default: the bank's own)."""
        primary = scr is None
        scr = self._screen if primary else scr
        b = qb.shape[0]
        keys = torch.full((b, k), math.inf, dtype=torch.float64, device=self.device)
        idx = torch.full((b, k), -1, dtype=torch.int64, device=self.device)
        operands, g, sq, offset, key_scale, floor_q, acc_floor, usable = self._screen_queries(scr, qb)
        if self.distance == "cosine":
            zero = qb.abs().amax(1) == 0
            if bool(zero.any()):
                z = zero.nonzero().flatten()
                keys[z], idx[z] = self._first_rows(z.numel(), k, None if self_rows is None else self_rows[z], mask)
                usable &= ~zero
        n_eff = n_allowed - (1 if self_rows is not None else 0)
        c = min(n_eff, k + self.candidates)
        sqnorms = self._masked(scr, mask)
        use_faiss = primary and self.backend == "faiss" and mask is None
        tol_torch = self._tolerance(scr, sq, key_scale, floor_q, acc_floor)
        if use_faiss:  # (float32 screens only: key_scale = 1, faiss and torch keys share units)
            v, cand = self._screen_faiss(qb, c, self_rows)
            tol = self._tolerance(scr, sq, key_scale, floor_q, acc_floor, faiss=True)
        else:
            v, cand = self._screen_torch(scr, operands, g, sqnorms, c, self_rows)
            tol = tol_torch
        thr = v[:, k - 1] + 2 * tol  # every row that can still be among the k nearest has key <= thr
        usable &= torch.isfinite(thr)
        inband = v <= thr[:, None]
        complete = ~inband[:, -1] if c < n_eff else torch.ones_like(usable)
        if primary and self._has_fallback():  # wide half-precision bands: re-screen in float32 (cheaper)
            heavy = usable & ~complete  # (a complete band is re-ranked exactly: at most k + candidates pairs)
            h = heavy.nonzero().flatten()
            if h.numel():
                sub_self = self_rows[h] if self_rows is not None else None
                keys[h], idx[h] = self._knn_block(qb[h], k, sub_self, n_allowed, mask, scr=self._float32_fallback())
                usable &= ~heavy
        good = usable & complete
        rows, j = (inband & good[:, None]).nonzero(as_tuple=True)  # typically ~k pairs per query
        cols = cand[rows, j]
        sel_k, sel_i = _select(rows, cols, self._exact_pairs(qb, rows, cols), b, k)
        keys = torch.where(good[:, None], sel_k, keys)
        idx = torch.where(good[:, None], sel_i, idx)
        bad = (usable & ~complete).nonzero().flatten()
        if bad.numel():  # more near-ties than candidates: evaluate the whole band exactly
            rescan = _round_up_f32(v[bad, k - 1] + tol[bad] + tol_torch[bad])
            sub_self = self_rows[bad] if self_rows is not None else None
            rr, cc = [], []
            for s, e, kk in self._key_chunks(scr, operands[bad], g[bad], sqnorms, sub_self):
                r, col = (kk <= rescan[:, None]).nonzero(as_tuple=True)
                rr.append(r)
                cc.append(col + s)
            rr, cc = torch.cat(rr), torch.cat(cc)
            keys[bad], idx[bad] = _select(rr, cc, self._exact_pairs(qb[bad], rr, cc), bad.numel(), k)
        hopeless = ~usable & (idx[:, 0] < 0)  # (not answered above: zero cosine queries, re-screened ones)
        hopeless = hopeless.nonzero().flatten()
        if hopeless.numel():  # overflowing or otherwise unscreenable queries: exact scan of every row
            sub_self = self_rows[hopeless] if self_rows is not None else None
            keys[hopeless], idx[hopeless] = self._exact_scan(qb[hopeless], k, sub_self, mask)
        return keys, idx

    def _knn_keys(self, queries, k: int, *, exclude_self: bool = False, rows=None):
        """Exact float64 keys (squared Euclidean / cosine distance) and indices of the k nearest rows."""
        if queries is None:
            queries = self.features
        q = as_feature_tensor(queries, "queries")
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {q.shape[1]} but the bank has dimension {self.dim}")
        k = int(k)
        n_allowed, mask = self._allowed(rows)
        if exclude_self and mask is not None:
            raise ValueError("exclude_self and rows cannot be combined")
        limit = n_allowed - (1 if exclude_self else 0)
        if not 1 <= k <= limit:
            raise ValueError(f"k must be in [1, {limit}] for a bank of {self.n_train} rows"
                             f"{' excluding self-matches' if exclude_self else ''}"
                             f"{f' restricted to {n_allowed} rows' if mask is not None else ''}, got {k}")
        if exclude_self and q.shape[0] != self.n_train:
            raise ValueError(f"exclude_self=True needs the bank's own {self.n_train} rows as queries, got {q.shape[0]}")
        n = q.shape[0]
        keys = torch.full((n, k), math.nan, dtype=torch.float64, device=self.device)
        idx = torch.full((n, k), -1, dtype=torch.int64, device=self.device)
        for s in range(0, n, self.block_size):
            block = q[s:s + self.block_size].to(self.device)
            finite = finite_rows(block)
            if bool(finite.all()):  # the usual case: no gather, no scatter
                e = s + block.shape[0]
                self_rows = torch.arange(s, e, device=self.device) if exclude_self else None
                keys[s:e], idx[s:e] = self._knn_block(block, k, self_rows, n_allowed, mask)
                continue
            good = finite.nonzero().flatten()
            if good.numel() == 0:
                continue
            self_rows = (good + s) if exclude_self else None
            keys[s + good], idx[s + good] = self._knn_block(block[good], k, self_rows, n_allowed, mask)
        return keys, idx

    # ------------------------------------------------------------------ public search
    def knn(self, queries, k: int, *, exclude_self: bool = False, rows=None, out_dtype=torch.float32):
        """The k nearest bank rows of each query, sorted by distance, ties to the lowest index.

        Args:
            queries: ``[B, d]`` (any device); ``None`` means the bank itself (master values).
            k: number of neighbours, ``1 <= k <= n_train`` (``n_train - 1`` with ``exclude_self``).
            exclude_self: query row i *is* bank row i (``queries`` has n_train rows or is None);
                row i is never its own neighbour (exact duplicates at other indices still count,
                as in the ``prdc`` package's radii).
            rows: restrict the search to these bank rows (bool mask ``[N]`` or indices); the
                returned indices are still bank indices.
            out_dtype: dtype of the returned distances (computed in float64).
        Returns:
            ``(distances [B, k], indices [B, k] int64)`` on the bank's device. Rows of non-finite
            queries get distance nan and index -1.
        """
        keys, idx = self._knn_keys(queries, k, exclude_self=exclude_self, rows=rows)
        dist = keys.sqrt() if self.distance == "euclidean" else keys
        return dist.to(out_dtype), idx

    def search(self, queries, *, rows=None, out_dtype=torch.float32):
        """Nearest bank row of each query: ``(indices [B] int64, distances [B])`` on the bank's device.

        Non-finite query rows get index -1 and distance nan (the caller counts them as invalid).
        ``rows``: restrict the search to these bank rows (see :meth:`knn`).
        """
        dist, idx = self.knn(queries, 1, rows=rows, out_dtype=out_dtype)
        return idx[:, 0], dist[:, 0]

    def distance_blocks(self, queries):
        """Screened squared distances in blocks, for threshold tests that must stay exact.

        Yields ``(q_start, q_end, b_start, b_end, approx, tol)``: ``approx[i, j]`` is the float32
        screened squared Euclidean distance between query ``q_start + i`` and bank row
        ``b_start + j`` (cosine: between the normalised vectors, i.e. 2 x cosine distance), and
        ``|approx - exact| <= tol[i]``. Resolve pairs within ``tol`` of a threshold with
        :meth:`exact_distance`. Queries must be finite. Uses the torch screen.
        """
        q = self._prepare(queries)
        if not bool(finite_rows(q).all()):
            raise ValueError("queries must be finite for distance_blocks")
        for s in range(0, q.shape[0], self.block_size):
            q64 = q[s:s + self.block_size].to(torch.float64)
            scr = self._screen
            operands, g, sq, offset, key_scale, floor_q, acc_floor, usable = self._screen_queries(scr, q64)
            unscale = (1 / key_scale).to(torch.float32)
            if not bool(usable.all()) or not bool((unscale.double() * key_scale == 1).all()):
                raise ValueError("queries or features are out of the float32 screen's range (squared norms beyond "
                                 "2^120, or scales 2^127 apart); rescale both by a common factor")
            tol = self._tolerance(scr, sq, key_scale, floor_q, acc_floor) / key_scale + 8 * _U32 * (offset + scr.sqnorm_max)
            if self.distance == "cosine":
                tol = tol + 4 * _U32 * (offset + 1)
            off32, unscale = offset.to(torch.float32)[:, None], unscale[:, None]
            for b0, b1, keys in self._key_chunks(scr, operands, g, scr.sqnorms):
                approx = torch.addcmul(off32, keys, unscale, out=keys)  # keys / key_scale exact (a power of two)
                yield s, s + q64.shape[0], b0, b1, approx, _round_up_f32(tol)


# ---------------------------------------------------------------------------------------- sharded


def shard_range(n_train: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of rank ``rank`` when ``n_train`` rows are split over ``world_size``
    processes: contiguous, in rank order, sizes differing by at most one."""
    return n_train * rank // world_size, n_train * (rank + 1) // world_size


def _require_process_group() -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("ShardedFeatureBank needs an initialised torch.distributed process group "
                           "(accelerate launch / torchrun with Accelerator(), or init_process_group)")


class ShardedFeatureBank:
    """A bank split over the processes of a ``torch.distributed`` run (Accelerate initialises it).

    Rank r holds rows :func:`shard_range` ``(n_train, world_size, r)`` in a local
    :class:`FeatureBank`. :meth:`search` is a *collective* call: every rank calls it each round
    with its own (possibly empty) queries; the queries of all ranks are gathered (padded to equal
    sizes), every rank finds the exact nearest rows of all of them in its shard (float64 keys,
    global indices), the per-shard answers are gathered and the global nearest is chosen with the
    same tie rule (lowest global index), and each rank gets the answers for its own queries. The
    indices are those of a single-process :class:`FeatureBank` over all rows. Construction is
    collective too (the ranks check they agree on N, d and the distance). A rank whose sampling
    failed must still call :meth:`search` (with no queries), or the others wait for it.

    Args:
        shard: this rank's rows ``[stop - start, d]`` (use :meth:`from_features` to slice the full
            array, or read only the shard from a saved bank with
            ``ReferenceBank.read_features(path, rows=slice(start, stop))``).
        n_train: total rows over all ranks.
        group: process group (default: the default group). NCCL groups exchange tensors on
            the bank's CUDA device, other backends (gloo) on the CPU.
        distance, device and other options: as for :class:`FeatureBank`.
    """

    def __init__(self, shard, *, n_train: int, distance: str = "euclidean", device=None, group=None, **options):
        import torch.distributed as dist

        _require_process_group()
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        n_train = int(n_train)
        if n_train < self.world_size:
            raise ValueError(f"n_train={n_train} rows cannot be split over {self.world_size} processes")
        start, stop = shard_range(n_train, self.world_size, self.rank)
        x = as_feature_tensor(shard, "shard")
        if x.shape[0] != stop - start:
            raise ValueError(f"rank {self.rank} must hold rows [{start}, {stop}) of {n_train} "
                             f"({stop - start} rows), got {x.shape[0]}")
        self.local = FeatureBank(x, distance=distance, device=device, **options)
        self.offset, self.n_train, self.dim = start, n_train, self.local.dim
        self.distance, self.device = distance, self.local.device
        backend = dist.get_backend(group)
        self._comm_device = self.device if backend == "nccl" else torch.device("cpu")
        shape = torch.tensor([n_train, self.dim, DISTANCES.index(distance)], device=self._comm_device)
        every = self._all_gather(shape)
        if not bool((every == shape).all()):
            raise ValueError(f"ranks disagree on (n_train, dim, distance): {every.tolist()}")

    @classmethod
    def from_features(cls, features, **options) -> "ShardedFeatureBank":
        """Keep this rank's slice of the full ``[N, d]`` features (a view: no copy of the rest)."""
        import torch.distributed as dist

        _require_process_group()
        x = as_feature_tensor(features, "features")
        group = options.get("group")
        start, stop = shard_range(x.shape[0], dist.get_world_size(group), dist.get_rank(group))
        return cls(x[start:stop], n_train=x.shape[0], **options)

    def __repr__(self) -> str:
        return (f"ShardedFeatureBank(n_train={self.n_train}, rows=[{self.offset}, {self.offset + self.local.n_train}), "
                f"rank={self.rank}/{self.world_size}, local={self.local!r})")

    def __len__(self) -> int:
        return self.n_train

    def _all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """[world, *shape]: every rank's equally shaped ``tensor``."""
        import torch.distributed as dist

        tensor = tensor.to(self._comm_device).contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor, group=self.group)
        return torch.stack(parts)

    def knn(self, queries, k: int, *, out_dtype=torch.float32):
        """Collective k-NN of every rank's queries (``[B_r, d]``, possibly ``B_r = 0`` or None):
        ``(distances [B_r, k], indices [B_r, k])`` on ``device``; -1/nan for non-finite rows."""
        if queries is None:
            queries = torch.zeros(0, self.dim)
        q = as_feature_tensor(queries, "queries")
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {q.shape[1]} but the bank has dimension {self.dim}")
        k = int(k)
        if not 1 <= k <= self.n_train:
            raise ValueError(f"k must be in [1, {self.n_train}], got {k}")
        meta = torch.tensor([q.shape[0], int(q.dtype == torch.float64)], dtype=torch.int64)
        metas = self._all_gather(meta).cpu()
        sizes = metas[:, 0].tolist()
        dtype = torch.float64 if bool(metas[:, 1].any()) else torch.float32
        largest = max(sizes)
        if largest == 0:
            return (torch.zeros(0, k, dtype=out_dtype, device=self.device),
                    torch.zeros(0, k, dtype=torch.int64, device=self.device))
        padded = torch.zeros(largest, self.dim, dtype=dtype, device=self._comm_device)
        padded[: q.shape[0]] = q.to(self._comm_device, dtype)
        everyone = self._all_gather(padded)
        all_queries = torch.cat([everyone[r, : sizes[r]] for r in range(self.world_size)])
        k_local = min(k, self.local.n_train)
        keys, idx = self.local._knn_keys(all_queries.to(self.device), k_local)
        keys = torch.where(idx >= 0, keys, torch.full_like(keys, math.inf))  # non-finite queries: inf/-1
        idx = torch.where(idx >= 0, idx + self.offset, idx)
        if k_local < k:
            pad = k - k_local
            keys = torch.cat([keys, keys.new_full((keys.shape[0], pad), math.inf)], 1)
            idx = torch.cat([idx, idx.new_full((idx.shape[0], pad), -1)], 1)
        all_keys = self._all_gather(keys).to(self.device)  # [world, T, k]
        all_idx = self._all_gather(idx).to(self.device)
        total = all_keys.shape[1]
        cand_k = all_keys.permute(1, 0, 2).reshape(total, -1)
        cand_i = all_idx.permute(1, 0, 2).reshape(total, -1)
        big = torch.iinfo(torch.int64).max
        order = torch.argsort(torch.where(cand_i >= 0, cand_i, torch.full_like(cand_i, big)), dim=1, stable=True)
        cand_k, cand_i = cand_k.gather(1, order), cand_i.gather(1, order)
        order = torch.argsort(cand_k, dim=1, stable=True)[:, :k]  # ties keep the lower global index
        best_k, best_i = cand_k.gather(1, order), cand_i.gather(1, order)
        first = sum(sizes[: self.rank])
        best_k, best_i = best_k[first:first + sizes[self.rank]], best_i[first:first + sizes[self.rank]]
        best_k = torch.where(best_i >= 0, best_k, torch.full_like(best_k, math.nan))
        dist = best_k.sqrt() if self.distance == "euclidean" else best_k
        return dist.to(out_dtype), best_i

    def search(self, queries, *, out_dtype=torch.float32):
        """Collective nearest row of this rank's queries: ``(indices [B_r] int64, distances [B_r])``
        (global bank indices, as :meth:`FeatureBank.search`). Every rank must call it each round."""
        dist, idx = self.knn(queries, 1, out_dtype=out_dtype)
        return idx[:, 0], dist[:, 0]


# ---------------------------------------------------------------------------------------- learned set


class LearnedSet:
    """Which training rows were retrieved: per-row hit counts (N_learned of Eq. 3).

    Args:
        n_train: number of training rows.
        device: where the counts live (put it on the bank's device to avoid transfers).
    """

    def __init__(self, n_train: int, *, device=None):
        if int(n_train) != n_train or n_train < 1:
            raise ValueError(f"n_train must be a positive integer, got {n_train!r}")
        self.n_train = int(n_train)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.reset()

    def reset(self) -> None:
        """Forget all samples."""
        self.hits = torch.zeros(self.n_train, dtype=torch.int64, device=self.device)
        self.n_samples = 0
        self.n_invalid = 0
        self._n_learned = 0

    def update(self, indices) -> int:
        """Add retrieved indices (-1 = invalid sample, never learned); returns the number newly learned."""
        idx = torch.as_tensor(indices).to(self.device).flatten()
        if idx.numel() == 0:
            return 0
        if idx.is_floating_point() or idx.dtype == torch.bool:
            raise TypeError(f"indices must be integers (bank rows, -1 for invalid), got dtype {idx.dtype}")
        idx = idx.long()
        if idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= self.n_train):
            raise ValueError(f"indices must lie in [-1, {self.n_train - 1}], got range "
                             f"[{int(idx.min())}, {int(idx.max())}]")
        valid = idx[idx >= 0]
        before = self._n_learned
        self.hits.index_add_(0, valid, torch.ones_like(valid))
        self._n_learned = int((self.hits > 0).sum())
        self.n_samples += int(idx.numel())
        self.n_invalid += int(idx.numel() - valid.numel())
        return self._n_learned - before

    @property
    def n_learned(self) -> int:
        """Distinct training rows retrieved at least once."""
        return self._n_learned

    def state_dict(self) -> dict:
        """Plain tensors and ints (safe for ``torch.save`` / ``torch.load(weights_only=True)``)."""
        return {"n_train": self.n_train, "hits": self.hits.detach().cpu().clone(),
                "n_samples": self.n_samples, "n_invalid": self.n_invalid}

    def load_state_dict(self, state: dict) -> None:
        hits = torch.as_tensor(state["hits"])
        if int(state.get("n_train", hits.numel())) != self.n_train or hits.shape != (self.n_train,):
            raise ValueError(f"state is for n_train={int(state.get('n_train', hits.numel()))}, "
                             f"this LearnedSet has n_train={self.n_train}")
        self.hits = hits.to(device=self.device, dtype=torch.int64).clone()
        self.n_samples = int(state["n_samples"])
        self.n_invalid = int(state["n_invalid"])
        self._n_learned = int((self.hits > 0).sum())

    def __repr__(self) -> str:
        return (f"LearnedSet(n_train={self.n_train}, n_learned={self.n_learned}, "
                f"n_samples={self.n_samples}, n_invalid={self.n_invalid})")
