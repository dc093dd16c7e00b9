"""Reference banks: training-set features plus the real-data measurement for the adjusted IRS.

A :class:`ReferenceBank` holds the ``[N, d]`` features of the N training images (all of them),
the extractor identity and distance they were made with, and ``real``: IRS_inf of real images
that are *not* training images, retrieved against training images with the same extractor and
distance (the denominator of IRS_inf,a = IRS_inf(synthetic) / IRS_inf(real), paper Sec. 3.4).

How ``real`` is measured (``measure_real``):

- with a held-out real set (``reference=``): its images are the queries, the full training set
  is the bank (N_train = N);
- without one, the paper's split (Sec. 4, "Metrics"): the training set is permuted with a
  ``torch.Generator`` seeded by ``seed``; for N < 100,000 the last ``N // 2`` images of the
  permutation are the queries and the first ``N - N // 2`` the bank; for N >= 100,000 the last
  50,000 are the queries and the rest the bank. One split is measured (not averaged over
  several); IRS_inf is a fraction of the bank half. The stored bank features remain all N
  training images either way.

The measurement gap depends on the sampling rate alpha = n / N (paper Table 4), so the adjusted
score compares like with like: both sides are measured at the same alpha. The bank keeps each
real query's retrieved index (``real_nearest``), and the side with the larger alpha is
subsampled to the other's, as the paper's authors do: ``SUBSET_REPEATS`` (32) random subsets of
m of its n draws without replacement, from ``numpy.random.default_rng(SUBSET_SEED)`` (so the
result is deterministic), the estimate being the mean of the subsets' maximum-likelihood
estimates (Eq. 7). Averaging the estimates (not the N_learned) keeps the small-sample bias of
the estimator (it is convex in N_learned) on both sides of the ratio, where the other side is
one draw of m. The subsampled side's ``n_learned`` and bounds are those of the exact mean
N_learned over all m-subsets (hypergeometric, "rarefaction", Hurlbert 1971, rounded;
:func:`subsampled_learned`):

    E[k_m] = sum over retrieved images j of 1 - C(n - c_j, m) / C(n, m)

(c_j = draws that retrieved image j). With n synthetic samples against N training images and
n_r real queries against a bank of n_bank:

- ``n * n_bank / N < n_r``: the real reference is subsampled to ``m = round(n * n_bank / N)``
  queries (:meth:`ReferenceBank.real_at`, cached per m);
- ``n * n_bank / N > n_r`` (a small held-out set, a large sample budget): the samples are
  subsampled to ``m = round(n_r * N / n_bank)``;
- equal: both as measured.

:class:`RetrievalScore` says which (``alpha_matching``, ``matched_alpha``, ``synthetic_matched``);
``real`` is the all-queries value. Invalid (NaN/Inf) samples are counted in ``n_samples`` and
never learned; IRS_inf and alpha matching use the valid samples (and the valid real queries:
``real.n_samples`` counts those only).

Files: one ``.safetensors`` file with tensor ``features`` and the JSON metadata (key
``irs_reference`` of the safetensors header): format version, library version, extractor
identity (name, weights and their sha256, input size, preprocessing), distance, value range,
N, d, sha256 fingerprints of the training (and reference) image contents, the real measurement
and the number of exact-duplicate training features (duplicates cap N_learned). Nothing is ever
unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from irs_callbacks import __version__
from irs_callbacks.files import expand_path, write_atomic
from irs_callbacks.features import DEFAULT_EXTRACTOR, extract_features, get_extractor
from irs_callbacks.retrieval import (DISTANCES, FeatureBank, LearnedSet, ShardedFeatureBank, finite_rows,
                                     resolve_screen_dtype)
from irs_callbacks.validation import check_choice, check_value_range
from irs_callbacks.stats import IRSEstimate, adjusted_irs, irs_infinity, ml_diversity

__all__ = ["ReferenceBank", "RetrievalScore", "measure_real", "split_for_real", "FORMAT_VERSION",
           "ALPHA_MATCHINGS", "subsampled_learned"]

FORMAT = "irs-reference-bank"
FORMAT_VERSION = 1
METADATA_KEY = "irs_reference"
REQUIRED_METADATA = ("n_train", "dim", "distance", "extractor")  # what load() reads
SPLIT_LIMIT, SPLIT_QUERIES_LARGE = 100_000, 50_000
SUBSET_REPEATS, SUBSET_SEED = 32, 0  # subsampling to a common alpha (module docstring)
#: values of RetrievalScore.alpha_matching: how real data and samples were brought to one alpha
ALPHA_MATCHINGS = {
    "equal": "real reference and samples at the same alpha as measured",
    "real-subsampled": "real reference subsampled to the samples' alpha (exact mean over subsets)",
    "samples-subsampled": "samples subsampled to the real reference's alpha (exact mean over subsets)",
    "unmatched": "different alphas: the bank keeps no per-query record of the real measurement",
}


def _as_features(features, name: str) -> torch.Tensor:
    """``features`` as a tensor ``[N, d]`` with N, d > 0, left on its device in its dtype."""
    if not isinstance(features, torch.Tensor):
        try:
            features = torch.as_tensor(features)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name} must be a tensor/array of shape [N, d], got {type(features).__name__}") from None
    if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError(f"{name} must have shape [N, d] with N, d > 0, got {tuple(features.shape)}")
    return features.detach()


def _check_features(features, name: str) -> torch.Tensor:
    """``features`` as a contiguous CPU float32 tensor ``[N, d]`` (the stored form)."""
    return _as_features(features, name).to("cpu", torch.float32).contiguous()


def _check_train_finite(features: torch.Tensor) -> torch.Tensor:
    bad = ~finite_rows(features)  # one fast row-sum pass, no [N, d] bool temporary
    if bool(bad.any()):
        raise ValueError(f"{int(bad.sum())} of {len(features)} training features are not finite (NaN/Inf images "
                         f"in the training set? first rows {bad.nonzero().flatten()[:5].tolist()})")
    return features


def split_for_real(n_train: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(bank indices, query indices) of the paper's split of a training set (module docstring)."""
    if n_train < 2:
        raise ValueError(f"the split needs at least 2 training images, got {n_train}")
    n_queries = n_train // 2 if n_train < SPLIT_LIMIT else SPLIT_QUERIES_LARGE
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(int(seed)))
    return order[: n_train - n_queries], order[n_train - n_queries:]


def measure_real(train_features, reference_features=None, *, distance="euclidean", seed=0, alpha_e=0.05,
                 device=None, bank=None) -> tuple[IRSEstimate, dict]:
    """IRS_inf of real data against training data, and a dict describing how it was measured.

    ``bank``: a :class:`~irs_callbacks.retrieval.FeatureBank` over ``train_features`` to reuse
    (default: one is built on ``device``). The split searches that one bank restricted to the
    bank half (``rows=``), so nothing is copied or built twice.
    """
    estimate, info, _ = _measure_real(train_features, reference_features, distance=distance, seed=seed,
                                      alpha_e=alpha_e, device=device, bank=bank)
    return estimate, info


def _measure_real(train_features, reference_features=None, *, distance="euclidean", seed=0, alpha_e=0.05,
                  device=None, bank=None) -> tuple[IRSEstimate, dict, torch.Tensor]:
    """:func:`measure_real` plus each real query's retrieved training index (-1: invalid query)."""
    train_features = _check_features(train_features, "train_features")
    if bank is None:
        bank = FeatureBank(train_features, distance=distance, device=device)
    elif bank.n_train != len(train_features) or bank.distance != distance:
        raise ValueError(f"bank has {bank.n_train} rows and distance {bank.distance!r}; expected "
                         f"{len(train_features)} rows and {distance!r}")
    if reference_features is not None:
        queries = _check_features(reference_features, "reference_features")
        if queries.shape[1] != train_features.shape[1]:
            raise ValueError(f"reference features have dimension {queries.shape[1]}, training features "
                             f"{train_features.shape[1]}: they must come from the same extractor")
        rows, n_bank = None, len(train_features)
        info = {"method": "held-out", "n_queries": len(queries), "n_bank": n_bank}
    else:
        bank_idx, query_idx = split_for_real(len(train_features), seed)
        queries, rows, n_bank = train_features[query_idx], bank_idx, len(bank_idx)
        info = {"method": "split", "seed": int(seed), "n_queries": len(query_idx), "n_bank": n_bank,
                "rule": "N < 100000: N // 2 queries; else 50000 queries; rest is the bank"}
    nearest, _ = bank.search(queries, rows=rows)  # training indices (the split: of the bank half)
    learned = LearnedSet(bank.n_train, device=bank.device)
    learned.update(nearest)
    info.update(n_learned=int(learned.n_learned), n_invalid=int(learned.n_invalid))
    if learned.n_learned < 1:
        raise ValueError("no real reference image retrieved a training image (all reference features invalid?)")
    n_valid = int(learned.n_samples - learned.n_invalid)  # invalid queries sample nothing (as on the synthetic side)
    estimate = irs_infinity(int(learned.n_learned), n_valid, n_bank, alpha_e)
    return estimate, info, nearest.cpu()


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.int64: "I64"}


def _write_safetensors(path, tensors: dict, metadata: dict) -> None:
    """Write ``tensors`` (CPU, float32/int64) in the safetensors format, streamed in chunks.

    Format: 8-byte little-endian header length, the JSON header (dtype, shape and byte offsets
    of each tensor, ``__metadata__``; padded with spaces to a multiple of 8), then the raw
    little-endian bytes of each tensor in header order.
    """
    import sys

    if sys.byteorder != "little":
        raise RuntimeError("writing safetensors files needs a little-endian machine")
    header, offset = {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little"))
        handle.write(text)
        for tensor in tensors.values():
            flat = tensor.detach().cpu().contiguous().reshape(-1)
            step = max(1, 2 ** 24 // tensor.element_size())  # 16 MB at a time
            for start in range(0, flat.numel(), step):
                handle.write(memoryview(flat[start:start + step].numpy()).cast("B"))


def _estimate_from_dict(data) -> IRSEstimate | None:
    if data is None:
        return None
    names = [f.name for f in dataclasses.fields(IRSEstimate)]
    return IRSEstimate(**{name: data[name] for name in names})


def _jsonable(value):
    return json.loads(json.dumps(value))


def _differences(saved, expected, prefix="") -> list[str]:
    """Dotted paths where ``expected`` (a partial dict) differs from ``saved``."""
    if isinstance(expected, dict) and isinstance(saved, dict):
        out = []
        for key, value in expected.items():
            out += _differences(saved.get(key, "<missing>"), value, f"{prefix}{key}.")
        return out
    return [] if saved == expected else [f"{prefix[:-1]}: saved {saved!r}, expected {expected!r}"]


def subsampled_learned(counts, n: int, m: int) -> float:
    """Mean number of distinct values in a uniformly random ``m``-subset (without replacement) of
    ``n`` draws in which value j occurred ``counts[j]`` times (values never drawn may be omitted;
    draws that hit nothing, e.g. invalid samples, are the ``n - sum(counts)`` rest):
    ``sum_j 1 - C(n - c_j, m) / C(n, m)``, exact (module docstring)."""
    import numpy as np
    from scipy.special import gammaln

    counts = np.asarray(counts, dtype=np.int64)
    counts = counts[counts > 0]
    if not 0 <= m <= n or counts.sum() > n:
        raise ValueError(f"need 0 <= m <= n and sum(counts) <= n, got m = {m}, n = {n}, sum = {int(counts.sum())}")
    values, multiplicity = np.unique(counts, return_counts=True)
    rest = n - values  # draws not on value j
    log_missed = np.full(values.shape, -np.inf)  # log P(value j absent from the subset)
    ok = rest >= m
    log_missed[ok] = (gammaln(rest[ok] + 1) - gammaln(rest[ok] - m + 1) - gammaln(n + 1) + gammaln(n - m + 1))
    return float((multiplicity * -np.expm1(log_missed)).sum())


def _estimate_at(draws, m: int, n_train: int, alpha_e: float) -> IRSEstimate:
    """IRS_inf at m < n of the n ``draws`` (retrieved rows, -1 = retrieved nothing), module docstring:
    estimate = mean ML estimate of ``SUBSET_REPEATS`` seeded m-subsets; n_learned and bounds
    those of the exact mean N_learned over all m-subsets."""
    import numpy as np

    draws = np.asarray(draws, dtype=np.int64)
    n = int(draws.size)
    valid = draws >= 0
    values, compact = np.unique(draws[valid], return_inverse=True)
    ids = np.full(n, -1, dtype=np.int64)
    ids[valid] = compact
    counts = np.bincount(compact, minlength=values.size)
    rng = np.random.default_rng(SUBSET_SEED)
    s_hats = []
    for _ in range(SUBSET_REPEATS):
        subset = ids[rng.choice(n, size=m, replace=False)]
        k = int(np.count_nonzero(np.bincount(subset[subset >= 0], minlength=values.size)))
        s_hats.append(ml_diversity(k, m, n_train) if k > 0 else 0)
    k_mean = max(1, min(round(subsampled_learned(counts, n, m)), m))
    typical = irs_infinity(k_mean, m, n_train, alpha_e)
    s_hat = float(np.mean(s_hats))
    return dataclasses.replace(typical, estimate=s_hat / n_train, s_hat=round(s_hat),
                               lower=min(typical.lower, s_hat / n_train), upper=max(typical.upper, s_hat / n_train),
                               s_lower=min(typical.s_lower, round(s_hat)), s_upper=max(typical.s_upper, round(s_hat)))


@dataclass(frozen=True)
class RetrievalScore:
    """IRS of a set of samples against a reference bank (fractions of ``n_train``).

    The adjusted score compares both sides at one sampling rate (module docstring):
    ``adjusted = synthetic_matched.estimate / real.estimate`` at ``matched_alpha``.
    """

    n_train: int
    n_samples: int  # all samples, invalid (non-finite) ones included
    n_invalid: int
    n_learned: int
    irs_alpha: float  # n_learned / n_train (Eq. 4)
    alpha: float  # n_samples / n_train
    irs_inf: IRSEstimate | None  # from the valid samples; None when nothing was learned (all invalid)
    real: IRSEstimate | None  # real data at matched_alpha (the adjusted score's denominator)
    adjusted: float | None  # IRS_inf,a (Sec. 3.4); None without a real measurement
    duplicate_count: int  # exact-duplicate training features (cap N_learned)
    alpha_matching: str | None = None  # a key of ALPHA_MATCHINGS; None without a real measurement
    matched_alpha: float | None = None  # the sampling rate both sides of ``adjusted`` are measured at
    synthetic_matched: IRSEstimate | None = None  # the samples' IRS_inf at matched_alpha (numerator)

    def as_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for key in ("irs_inf", "real", "synthetic_matched"):
            value = getattr(self, key)
            data[key] = None if value is None else value.as_dict()
        return data

    @property
    def matching_text(self) -> str:
        """One line saying how the adjusted score's two sides were brought to one alpha."""
        if self.alpha_matching is None:
            return "no real-data measurement"
        text = ALPHA_MATCHINGS[self.alpha_matching]
        if self.matched_alpha is None:
            return text
        real = f"{self.real.n_samples} real queries" if self.real is not None else "real"
        synthetic = (f"{self.synthetic_matched.n_samples} samples" if self.synthetic_matched is not None
                     else "samples")
        return f"{text}: alpha = {self.matched_alpha:.4g} ({synthetic}, {real})"


class ReferenceBank:
    """Training features ``[N, d]`` (CPU float32) + metadata + the real-data IRS measurement."""

    def __init__(self, features, *, distance="euclidean", extractor_identity=None, real=None, metadata=None,
                 real_nearest=None):
        self.features = _check_train_finite(_check_features(features, "features"))
        #: retrieved bank index of each real query (-1 = invalid), for :meth:`real_at`; or None
        self.real_nearest = None if real_nearest is None else torch.as_tensor(real_nearest, dtype=torch.int64).cpu()
        self._real_at_cache: dict[int, IRSEstimate] = {}  # real_at per subset size m
        self.distance = check_choice(distance, "distance", DISTANCES)
        self.extractor_identity = _jsonable(extractor_identity or {})
        if real is not None and not isinstance(real, IRSEstimate):
            raise TypeError(f"real must be an IRSEstimate or None, got {type(real).__name__}")
        self.real = real
        self.metadata = _jsonable(metadata or {})
        self.metadata.update(
            format=FORMAT, format_version=FORMAT_VERSION, n_train=self.n_train, dim=self.dim,
            distance=self.distance, extractor=self.extractor_identity,
            real=None if real is None else real.as_dict(),
        )
        self.metadata.setdefault("library_version", __version__)
        self._banks: dict = {}  # FeatureBank / ShardedFeatureBank per (device, sharded, options): built once

    n_train = property(lambda self: int(self.features.shape[0]), doc="N, number of training images")
    dim = property(lambda self: int(self.features.shape[1]), doc="feature dimension d")

    @property
    def duplicate_count(self) -> int:
        """Exact-duplicate training features beyond the first of each group (they cap N_learned).

        From the metadata when saved there, else counted once by a cached bank (on its device)."""
        if "duplicate_count" not in self.metadata:
            banks = [b for b in self._banks.values() if isinstance(b, FeatureBank)]
            bank = banks[0] if banks else self.bank()
            self.metadata["duplicate_count"] = int(bank.duplicate_count)
        return int(self.metadata["duplicate_count"])

    def __repr__(self) -> str:
        real = "None" if self.real is None else str(self.real)
        return (f"ReferenceBank(n_train={self.n_train}, dim={self.dim}, distance={self.distance!r}, "
                f"extractor={self.extractor_identity.get('name')!r}, real={real})")

    def bank(self, device=None, *, sharded: bool = False, **options):
        """The retrieval bank over the training features, built once per arguments and cached.

        Args:
            device: where it screens and answers (default: the features' device, the CPU).
            sharded: False: a :class:`~irs_callbacks.retrieval.FeatureBank` holding all rows;
                True (torch.distributed initialised): a
                :class:`~irs_callbacks.retrieval.ShardedFeatureBank` holding this rank's
                ``N / world`` rows, whose ``search`` is a collective call.
            options: :class:`~irs_callbacks.retrieval.FeatureBank` options (``screen_dtype``,
                ``master_device``, ``backend``, ...; ``group`` for a sharded bank).

        Every bank shares the CPU float32 features as its master (a half-precision screen on
        CUDA keeps them in host memory; no copy). :meth:`clear_banks` frees the cached banks.
        """
        key = self._bank_key(device, sharded, options)
        if key not in self._banks:
            if sharded:
                self._banks[key] = ShardedFeatureBank.from_features(self.features, distance=self.distance,
                                                                    device=device, **options)
            else:
                self._banks[key] = FeatureBank(self.features, distance=self.distance, device=device, **options)
        return self._banks[key]

    @staticmethod
    def _bank_key(device, sharded, options) -> tuple:
        device = torch.device(device if device is not None else "cpu")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        options = dict(options)
        options["screen_dtype"] = resolve_screen_dtype(options.get("screen_dtype"), device)
        if options.get("master_device") is not None:
            options["master_device"] = str(torch.device(options["master_device"]))
        group = options.pop("group", None)
        return (str(device), bool(sharded), id(group) if group is not None else None,
                tuple(sorted((name, repr(value)) for name, value in options.items())))

    def clear_banks(self) -> None:
        """Forget the cached retrieval banks (frees their device memory)."""
        self._banks.clear()

    def real_at(self, n_samples: int) -> IRSEstimate | None:
        """IRS_inf of real data at the sampling rate of ``n_samples`` (valid) synthetic samples.

        The real queries are subsampled to ``m = round(n_samples * n_bank / n_train)`` (the same
        alpha against the bank they were retrieved from): the mean ML estimate of 32 seeded
        m-subsets (module docstring), a fraction of the bank, deterministic and cached per m.
        When all valid queries are needed (m >= their number), or the bank keeps no per-query record,
        this is ``real`` (then the samples are the side to subsample, see :meth:`score_indices`).
        """
        if self.real is None or self.real_nearest is None:
            return self.real
        if isinstance(n_samples, bool) or int(n_samples) != n_samples or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
        m = max(1, round(int(n_samples) * self.real.n_train / self.n_train))
        draws = self.real_nearest[self.real_nearest >= 0]  # the valid queries (real.n_samples of them)
        if m >= min(self.real.n_samples, draws.numel()):
            return self.real
        if m not in self._real_at_cache:
            self._real_at_cache[m] = _estimate_at(draws.numpy(), m, self.real.n_train, self.real.alpha_e)
        return self._real_at_cache[m]

    def score(self, sample_features, *, device=None, alpha_e=None) -> RetrievalScore:
        """IRS_alpha, IRS_inf and IRS_inf,a of samples given as features ``[n, d]`` (NaN rows = invalid):
        nearest-neighbour search, then :meth:`score_indices`."""
        queries = _as_features(sample_features, "sample_features")  # (where they are: no host round trip)
        if queries.shape[1] != self.dim:
            raise ValueError(f"sample features have dimension {queries.shape[1]} but the reference bank has "
                             f"{self.dim}: use the extractor the bank was built with ({self.extractor_identity.get('name')})")
        bank = self.bank(device=device)
        # float32 like the stored features; rows with NaN/Inf (after that rounding) are retrieved as -1
        retrieved = bank.search(queries.to(bank.device, torch.float32))[0]
        return self.score_indices(retrieved, alpha_e=alpha_e)

    def score_indices(self, retrieved, *, alpha_e=None) -> RetrievalScore:
        """The score of samples from the bank row each retrieved, in sample order.

        retrieved: int64 ``[n]`` (tensor on any device, or array): row of the training image each
            sample retrieved, -1 for an invalid (NaN/Inf) sample.
        alpha_e: error probability of the bounds (default: the real measurement's, else 0.05).

        Deterministic and cheap (a few milliseconds at N = 1,281,166 and n = 50,000, most of it
        the samples' own IRS_inf): the real side at each alpha is cached (:meth:`real_at`).
        """
        import numpy as np

        if isinstance(retrieved, torch.Tensor):
            retrieved = retrieved.detach().cpu().numpy()
        rows = np.asarray(retrieved)
        if rows.ndim != 1 or rows.dtype.kind not in "iu":
            raise ValueError(f"retrieved must be a 1-D integer array of bank rows (-1 = invalid sample), "
                             f"got dtype {rows.dtype} and shape {rows.shape}")
        rows = rows.astype(np.int64, copy=False)
        if rows.size and (rows.min() < -1 or rows.max() >= self.n_train):
            raise ValueError(f"retrieved holds rows in [{int(rows.min())}, {int(rows.max())}]; valid rows are "
                             f"0..{self.n_train - 1} and -1 marks an invalid sample")
        n = int(rows.size)
        valid = rows[rows >= 0]
        n_valid = int(valid.size)
        counts = np.unique(valid, return_counts=True)[1] if n_valid else np.zeros(0, np.int64)
        k = int(counts.size)
        alpha_e = alpha_e if alpha_e is not None else (self.real.alpha_e if self.real is not None else 0.05)
        estimate = irs_infinity(k, n_valid, self.n_train, alpha_e) if k > 0 else None
        real, synthetic, matching, matched_alpha = self.real, estimate, None, None
        if self.real is not None and estimate is not None:
            n_real, n_bank = self.real.n_samples, self.real.n_train
            matched_alpha = n_valid / self.n_train
            if n_valid * n_bank == n_real * self.n_train:
                matching = "equal"
            elif self.real_nearest is None:
                matching, matched_alpha = "unmatched", None
            elif n_valid * n_bank < n_real * self.n_train:
                real = self.real_at(n_valid)
                matching = "real-subsampled" if real is not self.real else "equal"
            else:  # the real reference is the smaller side: subsample the samples to its alpha
                m = max(1, round(n_real * self.n_train / n_bank))
                if m < n_valid:
                    synthetic = _estimate_at(valid, m, self.n_train, alpha_e)
                    matching, matched_alpha = "samples-subsampled", m / self.n_train
                else:
                    matching = "equal"
        adjusted = None
        if real is not None:
            adjusted = adjusted_irs(synthetic, real) if synthetic is not None else 0.0
        return RetrievalScore(n_train=self.n_train, n_samples=n, n_invalid=n - n_valid, n_learned=k,
                              irs_alpha=k / self.n_train, alpha=n / self.n_train, irs_inf=estimate,
                              real=real, adjusted=adjusted, duplicate_count=self.duplicate_count,
                              alpha_matching=matching, matched_alpha=matched_alpha,
                              synthetic_matched=synthetic if real is not None else None)

    # ----------------------------------------------------------------------- files

    def save(self, path) -> Path:
        """Write features and metadata to one ``.safetensors`` file (atomically, streamed in row
        chunks: no in-memory copy of the features, unlike ``safetensors.torch.save_file``)."""
        path = expand_path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"reference bank files end in .safetensors, got {str(path)!r}")
        self.duplicate_count  # noqa: B018 -- counted into the metadata before it is written
        tensors = {"features": self.features}
        if self.real_nearest is not None:
            tensors["real_nearest"] = self.real_nearest
        metadata = {METADATA_KEY: json.dumps(self.metadata)}
        return write_atomic(path, lambda tmp: _write_safetensors(tmp, tensors, metadata))

    @staticmethod
    def read_metadata(path) -> dict:
        """The JSON metadata of a saved bank (without reading the features)."""
        from safetensors import safe_open

        path = expand_path(path, "reference bank")
        if not path.is_file():
            raise ValueError(f"reference bank {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
        except Exception as error:  # not a safetensors file
            raise ValueError(f"{str(path)!r} is not a safetensors reference bank: {error}") from None
        if METADATA_KEY not in header:
            raise ValueError(f"{str(path)!r} is a safetensors file but not an IRS reference bank (no metadata)")
        meta = json.loads(header[METADATA_KEY])
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{str(path)!r} has format {meta.get('format')!r} version {meta.get('format_version')!r}; "
                             f"this library reads {FORMAT!r} version {FORMAT_VERSION}")
        missing = [key for key in REQUIRED_METADATA if key not in meta]
        if missing:
            raise ValueError(f"reference bank {str(path)!r} lacks metadata {', '.join(missing)}: it was not written by "
                             "ReferenceBank.save (or was edited); rebuild it with `irs reference build`")
        return meta

    @classmethod
    def load(cls, path, *, expect: dict | None = None) -> "ReferenceBank":
        """Read a bank saved by :meth:`save`. ``expect``: metadata fields (nested dicts allowed, e.g.
        ``{"extractor": extractor.identity, "distance": "euclidean"}``) that must match; a mismatch
        raises ValueError naming every differing field."""
        from safetensors import safe_open

        meta = cls.read_metadata(path)
        if expect:
            diffs = _differences(meta, _jsonable(expect))
            if diffs:
                raise ValueError(f"reference bank {str(path)!r} does not match what is asked for: " + "; ".join(diffs))
        with safe_open(str(path), framework="pt") as handle:  # memory-mapped: each tensor read once
            features = handle.get_tensor("features")
            real_nearest = handle.get_tensor("real_nearest") if "real_nearest" in handle.keys() else None
        if tuple(features.shape) != (meta["n_train"], meta["dim"]):
            raise ValueError(f"reference bank {str(path)!r} is corrupt: features {tuple(features.shape)}, "
                             f"metadata says ({meta['n_train']}, {meta['dim']})")
        return cls(features, distance=meta["distance"], extractor_identity=meta["extractor"],
                   real=_estimate_from_dict(meta.get("real")), metadata=meta, real_nearest=real_nearest)

    @classmethod
    def read_features(cls, path, rows: slice | None = None) -> torch.Tensor:
        """Rows ``rows`` (a slice; default all) of a saved bank's features, reading only those
        bytes: e.g. a rank's shard for :class:`~irs_callbacks.retrieval.ShardedFeatureBank`
        (``slice(*shard_range(n_train, world, rank))``, ``n_train`` from :meth:`read_metadata`)."""
        from safetensors import safe_open

        meta = cls.read_metadata(path)
        rows = slice(None) if rows is None else rows
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise ValueError(f"rows must be a contiguous slice such as slice(0, 1000), got {rows!r}")
        with safe_open(str(path), framework="pt") as handle:
            part = handle.get_slice("features")
            if tuple(part.get_shape()) != (meta["n_train"], meta["dim"]):
                raise ValueError(f"reference bank {str(path)!r} is corrupt: features {tuple(part.get_shape())}, "
                                 f"metadata says ({meta['n_train']}, {meta['dim']})")
            return part[rows]

    # ----------------------------------------------------------------------- building

    @classmethod
    def from_features(cls, features, *, reference_features=None, distance="euclidean", extractor_identity=None,
                      seed=0, alpha_e=0.05, measure=True, device=None, metadata=None) -> "ReferenceBank":
        """A bank from precomputed training features (and optional held-out real features)."""
        features = _check_features(features, "features")
        check_choice(distance, "distance", DISTANCES)
        bank = cls(features, distance=distance, extractor_identity=extractor_identity,
                   metadata={**(metadata or {}), "real_measurement": None})
        if measure:  # the training bank is built once, on `device`, and stays cached for scoring
            real, info, nearest = _measure_real(bank.features, reference_features, distance=distance, seed=seed,
                                                alpha_e=alpha_e, bank=bank.bank(device=device))
            bank.real, bank.real_nearest = real, nearest
            bank.metadata.update(real=real.as_dict(), real_measurement=info)
        if "duplicate_count" not in bank.metadata:  # counted by the bank on `device` (cached for scoring)
            bank.metadata["duplicate_count"] = int(bank.bank(device=device).duplicate_count)
        return bank

    @classmethod
    def build(cls, train, *, extractor=DEFAULT_EXTRACTOR, reference=None, distance="euclidean", batch_size=64,
              device=None, cache_dir=None, seed=0, value_range=(0, 1), alpha_e=0.05, progress=True,
              num_workers=0, weights=None, **extractor_options) -> "ReferenceBank":
        """Extract training (and reference) features and measure ``real``.

        train, reference: image folders, .npy/.npz files, tensors/ndarrays, Datasets or DataLoaders
        (see :func:`irs_callbacks.features.extract_features`); reference=None uses the paper's
        split of the training set (module docstring). extractor: a name, module, callable or
        :class:`FeatureExtractor` (``weights`` and ``extractor_options`` such as ``input_size`` go
        to :func:`get_extractor`). cache_dir: reuse (or write) ``reference-<key>.safetensors``
        there, keyed by extractor identity, distance, value range, seed, alpha_e and the sha256 of
        the image contents; a stale or mismatching file is rebuilt.
        """
        from irs_callbacks import image_io

        check_choice(distance, "distance", DISTANCES)
        value_range = list(check_value_range(value_range))
        extractor = get_extractor(extractor, weights=weights, device=device, **extractor_options)
        streamed = {}

        def fingerprint(data):
            if isinstance(data, (str, os.PathLike, torch.Tensor)) or type(data).__module__ == "numpy" or isinstance(
                    data, image_io.ImageFolderDataset) or cache_dir is not None:
                return image_io.fingerprint(data)
            return None  # a generic Dataset/DataLoader: hashed while its features are extracted

        train_print = fingerprint(train)
        ref_print = None if reference is None else fingerprint(reference)
        key = {
            "format_version": FORMAT_VERSION, "library_version": __version__, "extractor": extractor.identity,
            "distance": distance, "value_range": value_range, "alpha_e": alpha_e,
            "train_fingerprint": train_print,
            "reference": {"fingerprint": ref_print} if reference is not None else {"split_seed": int(seed)},
        }
        cache_path = None
        if cache_dir is not None:
            digest = hashlib.sha256(json.dumps(_jsonable(key), sort_keys=True).encode()).hexdigest()[:24]
            cache_path = expand_path(cache_dir, "cache_dir") / f"reference-{digest}.safetensors"
            if cache_path.is_file():
                try:
                    return cls.load(cache_path, expect=key)
                except ValueError as error:
                    warnings.warn(f"ignoring unusable cached reference bank ({error}); rebuilding", stacklevel=2)

        def features_of(data, what):
            hasher = None
            if (train_print if what == "train" else ref_print) is None:
                hasher = hashlib.sha256(b"images;")
            feats = extract_features(extractor, data, batch_size=batch_size, value_range=tuple(value_range),
                                     progress=progress, num_workers=num_workers, hasher=hasher)
            if hasher is not None:
                streamed[what] = hasher.hexdigest()
            return feats

        started = time.perf_counter()
        train_features = features_of(train, "train")
        ref_features = None if reference is None else features_of(reference, "reference")
        if ref_features is not None and not torch.isfinite(ref_features).all(dim=1).any():
            raise ValueError("every reference image gave non-finite features (NaN/Inf images?)")
        key["train_fingerprint"] = train_print or streamed["train"]
        if reference is not None:
            key["reference"]["fingerprint"] = ref_print or streamed["reference"]
        metadata = {
            **key,
            "train_source": image_io.describe(train),
            "reference_source": None if reference is None else image_io.describe(reference),
            "build_seconds": None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        bank = cls.from_features(train_features, reference_features=ref_features, distance=distance,
                                 extractor_identity=extractor.identity, seed=seed, alpha_e=alpha_e,
                                 device=device, metadata=metadata)
        bank.metadata["build_seconds"] = round(time.perf_counter() - started, 3)
        if cache_path is not None:
            bank.save(cache_path)
        return bank

