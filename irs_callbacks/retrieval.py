"""Exact nearest-neighbour retrieval of training features (IRS paper Sec. 3.2, Eqs. 3, 11-12).

:class:`FeatureBank` holds the N training features on a device and answers, for a batch of
query features, which training row is nearest. Distances (appendix 9):

- ``"euclidean"`` (paper default, Eq. 12): ``||q - b||_2``;
- ``"cosine"`` (Eq. 11): ``1 - q.b / (||q|| ||b||)``; the bank stores L2-normalised rows, and a
  zero vector has cosine similarity 0 to everything (distance 1).

Answers are exact and deterministic: ties go to the lowest bank index. Both backends first
screen candidates with fast float32 arithmetic (the expanded form ``||q||^2 - 2 q.b + ||b||^2``:
chunked matrix products in torch, or faiss ``IndexFlatL2`` / ``IndexFlatIP``), then re-rank
the candidates with distances computed directly in float64. A rigorous bound on the rounding
error of the screen (``gamma_d = d u / (1 - d u)`` for a d-term float32 dot product) tells
whether every row that can still win is among the candidates; queries for which it cannot be
guaranteed (many near-ties, e.g. duplicated rows) are re-scanned and every row inside the
error band is evaluated exactly. So faiss' own tie order never leaks out.

:class:`LearnedSet` accumulates which training rows were retrieved (``N_learned``, Eq. 3).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._rounding import F32_UNIT_ROUNDOFF, gamma

__all__ = ["FeatureBank", "LearnedSet", "DISTANCES", "BACKENDS", "faiss_available"]

DISTANCES = ("euclidean", "cosine")
BACKENDS = ("auto", "torch", "faiss")
_U32 = F32_UNIT_ROUNDOFF
_EXTRA_CANDIDATES = 15  # candidates screened beyond k before the exact re-rank


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


class FeatureBank:
    """N training features on a device with exact nearest-neighbour search.

    Args:
        features: ``[N, d]`` tensor or array (any real dtype; rows must be finite -- a bank with
            NaN/inf rows is refused with a ValueError naming the count and the first rows).
        distance: ``"euclidean"`` (default) or ``"cosine"``.
        device: where the bank lives and answers are returned (default: the features' device).
        dtype: storage dtype, ``torch.float32`` (default) or ``torch.float16`` (half the memory;
            products still accumulate in float32). Distances are exact for the *stored* values.
        backend: ``"torch"``, ``"faiss"`` or ``"auto"`` (default: torch; see :meth:`resolve_backend`).
        block_size: queries per block (default 1024 on CPU, 2048 on GPU).
        chunk_size: bank rows per matrix product (default 8192 on CPU, 32768 on GPU).
    """

    def __init__(self, features, *, distance: str = "euclidean", device=None, dtype=torch.float32,
                 backend: str = "auto", block_size: int | None = None, chunk_size: int | None = None):
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if dtype not in (torch.float32, torch.float16):
            raise ValueError(f"dtype must be torch.float32 or torch.float16, got {dtype}")
        x = as_feature_tensor(features, "features")
        n, d = x.shape
        if n == 0 or d == 0:
            raise ValueError(f"features must be a non-empty [N, d] array, got shape {tuple(x.shape)}")
        self.device = torch.device(device) if device is not None else x.device
        self.distance = distance
        self.dtype = dtype
        x = x.to(self.device)
        bad = ~torch.isfinite(x).all(dim=1) if x.is_floating_point() else None
        if bad is not None and bool(bad.any()):
            rows = bad.nonzero().flatten()
            raise ValueError(f"features contains {rows.numel()} non-finite (NaN/inf) rows, first "
                             f"{rows[:5].tolist()}; remove or repair them before building a FeatureBank")
        stored = torch.empty(n, d, dtype=dtype, device=self.device)
        sqnorms = torch.empty(n, dtype=torch.float64, device=self.device)
        step = max(1, 2 ** 22 // d)
        for s in range(0, n, step):  # float64 preparation in chunks
            rows = x[s:s + step].to(torch.float64)
            if distance == "cosine":
                rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-300)
            part = rows.to(dtype)
            if not torch.isfinite(part).all():
                raise ValueError(f"features overflow the storage dtype {dtype} (|x| > {torch.finfo(dtype).max}); "
                                 "use dtype=torch.float32")
            stored[s:s + step] = part
            sqnorms[s:s + step] = part.to(torch.float64).square().sum(1)
        self.features = stored
        self._cos_slack = 0.0
        if distance == "cosine":  # stored unit rows are unit only to storage precision; zero rows stay 0
            zero = sqnorms == 0
            if not bool(zero.all()):
                self._cos_slack = 4.1 * float((sqnorms[~zero].sqrt() - 1).abs().max())
            sqnorms = torch.where(zero, torch.ones_like(sqnorms), sqnorms)  # key of a zero row = 2 x distance 1
        self._sqnorms = sqnorms.to(torch.float32)  # ||b||^2 of stored rows, screening only
        self._sqnorm_max = float(sqnorms.max())
        self.n_train, self.dim = n, d
        cuda = self.device.type == "cuda"
        self.block_size = int(block_size or (2048 if cuda else 1024))
        self.chunk_size = int(chunk_size or (32768 if cuda else 8192))
        if self.block_size < 1 or self.chunk_size < 1:
            raise ValueError("block_size and chunk_size must be positive integers")
        self.backend = self.resolve_backend(backend, self.device)
        self._faiss_index = None
        self._duplicate_count = None
        if self.backend == "faiss":
            self._faiss_index = self._build_faiss()

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def resolve_backend(backend: str, device) -> str:
        """The backend ``"auto"`` resolves to.

        Rule (measured with ``benchmarks/bench_retrieval.py``): the torch backend is used unless
        faiss is asked for explicitly. On the 2-core development CPU (d = 2048, exact answers
        for both) torch was 3.9x faster than faiss ``IndexFlatL2`` at N = 10,000 and 8x faster
        at N = 100,000; the GPU case is unmeasured, so ``"auto"`` never switches to faiss.
        """
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "faiss" and not faiss_available():
            raise ValueError("backend='faiss' needs the faiss package (pip install faiss-cpu or faiss-gpu-cu12)")
        return "torch" if backend == "auto" else backend

    def _build_faiss(self):
        import faiss

        xb = np.ascontiguousarray(self.features.float().cpu().numpy())
        index = faiss.IndexFlatIP(self.dim) if self.distance == "cosine" else faiss.IndexFlatL2(self.dim)
        ngpu = _faiss_gpus() if self.device.type == "cuda" else 0
        if ngpu > 0:  # faiss' own multi-GPU index; shards the rows when there are several GPUs
            options = faiss.GpuMultipleClonerOptions()
            options.shard = ngpu > 1
            index = faiss.index_cpu_to_all_gpus(index, co=options)
        index.add(xb)
        return index

    def __repr__(self) -> str:
        return (f"FeatureBank(n_train={self.n_train}, dim={self.dim}, distance={self.distance!r}, "
                f"device={str(self.device)!r}, dtype={self.dtype}, backend={self.backend!r})")

    def __len__(self) -> int:
        return self.n_train

    @property
    def duplicate_count(self) -> int:
        """Number of stored rows that exactly equal an earlier row (beyond the first of each group).

        For cosine banks rows are compared after normalisation (positive multiples usually coincide;
        exactly so when the factor is a power of two).
        Computed on first access: integer hashes of the bit patterns, verified exactly.
        """
        if self._duplicate_count is None:
            self._duplicate_count = self._count_duplicates()
        return self._duplicate_count

    def _count_duplicates(self) -> int:
        x = self.features
        bits = (x + 0).view(torch.int16 if x.dtype == torch.float16 else torch.int32)  # +0 maps -0.0 to +0.0
        gen = torch.Generator(device="cpu").manual_seed(0)
        weights = torch.randint(1, 2 ** 62, (2, self.dim), generator=gen, dtype=torch.int64).to(x.device) | 1
        hashes = torch.empty(self.n_train, 2, dtype=torch.int64, device=x.device)
        step = max(1, 2 ** 21 // self.dim)
        for s in range(0, self.n_train, step):
            b = bits[s:s + step].to(torch.int64)
            hashes[s:s + step, 0] = (b * weights[0]).sum(1)  # wraps modulo 2^64
            hashes[s:s + step, 1] = ((b ^ 0x5BD1E995) * weights[1]).sum(1)
        _, inverse, counts = torch.unique(hashes, dim=0, return_inverse=True, return_counts=True)
        suspects = (counts[inverse] > 1).nonzero().flatten()
        if suspects.numel() == 0:
            return 0
        distinct = torch.unique(x[suspects], dim=0).shape[0]  # exact check (guards against collisions)
        return int(suspects.numel() - distinct)

    # ------------------------------------------------------------------ query preparation
    def _prepare(self, queries, name="queries"):
        q = as_feature_tensor(queries, name).to(self.device)
        if q.shape[1] != self.dim:
            raise ValueError(f"{name} have dimension {q.shape[1]} but the bank has dimension {self.dim}")
        return q

    def _query_parts(self, q):
        """float64 queries (exact re-rank), float32 screening queries and their ||q||^2."""
        q64 = q.to(torch.float64)
        if self.distance == "cosine":
            qs = q64 / q64.norm(dim=1, keepdim=True).clamp_min(1e-300)
        else:
            qs = q64
        q32 = qs.to(torch.float32)
        return q64, q32, qs.square().sum(1)

    def _tolerance(self, qn: torch.Tensor, faiss: bool = False) -> torch.Tensor:
        """Rigorous bound on |screened key - exact key| (float32 expanded form), per query."""
        d = self.dim
        g = gamma(d)  # d-term float32 dot product
        rel = g + 8 * _U32
        if faiss:
            rel = 2 * g + 16 * _U32  # faiss also computes the norms in float32
        if self.device.type == "cuda":
            if self.dtype == torch.float16:
                rel += 2.0 ** -10  # queries rounded to float16 for the half-precision product
            elif torch.backends.cuda.matmul.allow_tf32:
                rel += 2.0 ** -9  # TF32 rounds both factors to 10-bit mantissas
        tol = rel * (qn + self._sqnorm_max) * (1 + 1e-6)
        if self.distance == "cosine":  # screen on ||q^ - b^||^2, exact is 2 x (1 - cos) with renormalised rows
            tol = tol + (qn - 1).abs() + self._cos_slack + 64 * _U32
        return tol

    # ------------------------------------------------------------------ torch screening
    def _product(self, q32, s, e, q16=None):
        b = self.features[s:e]
        if b.dtype == torch.float16:
            if q16 is not None:
                try:
                    return torch.mm(q16, b.T, out_dtype=torch.float32)
                except Exception:
                    pass
            b = b.float()
        return q32 @ b.T

    def _key_chunks(self, q32, self_rows=None):
        """Yield (start, end, keys) with keys[i, j] = ||b_j||^2 - 2 q_i.b_j in float32."""
        q16 = None
        if self.device.type == "cuda" and self.dtype == torch.float16 and float(q32.abs().max(initial=0)) < 6e4:
            q16 = q32.half()
        for s in range(0, self.n_train, self.chunk_size):
            e = min(s + self.chunk_size, self.n_train)
            keys = self._product(q32, s, e, q16).mul_(-2).add_(self._sqnorms[s:e])
            if self_rows is not None:
                inside = (self_rows >= s) & (self_rows < e)
                if bool(inside.any()):
                    r = inside.nonzero().flatten()
                    keys[r, self_rows[r] - s] = math.inf
            yield s, e, keys

    def _screen_torch(self, q32, c, self_rows, qn=None):
        best_v = best_i = None
        for s, e, keys in self._key_chunks(q32, self_rows):
            v, i = keys.topk(min(c, e - s), dim=1, largest=False, sorted=False)
            i = i + s
            if best_v is not None:
                v, i = torch.cat([best_v, v], 1), torch.cat([best_i, i], 1)
                if v.shape[1] > c:
                    v, j = v.topk(c, dim=1, largest=False, sorted=False)
                    i = i.gather(1, j)
            best_v, best_i = v, i
        v, j = best_v.sort(dim=1)
        return v, best_i.gather(1, j)

    def _screen_faiss(self, q32, c, self_rows, qn):
        extra = 1 if self_rows is not None else 0
        D, I = self._faiss_index.search(np.ascontiguousarray(q32.cpu().numpy()), c + extra)
        v = torch.from_numpy(D).to(self.device)
        i = torch.from_numpy(I).to(self.device)
        if self.distance == "cosine":  # inner products -> ||q||^2 + ||b||^2 - 2 q.b with unit rows
            v = 2 - 2 * v
        v = v - qn.to(v.dtype)[:, None]  # same key as the torch screen: ||b||^2 - 2 q.b
        v = torch.where(i < 0, torch.full_like(v, math.inf), v)
        if self_rows is not None:
            v = torch.where(i == self_rows[:, None], torch.full_like(v, math.inf), v)
            v, j = v.sort(dim=1)
            v, i = v[:, :c], i.gather(1, j)[:, :c]
        return v, i

    # ------------------------------------------------------------------ exact distances
    def _exact_pairs(self, q64, qrow, cols) -> torch.Tensor:
        """Exact float64 distance keys (squared Euclidean, or cosine distance) of q64[qrow] to rows cols."""
        out = torch.empty(qrow.numel(), dtype=torch.float64, device=self.device)
        step = max(1, 2 ** 21 // self.dim)
        for s in range(0, qrow.numel(), step):
            b = self.features[cols[s:s + step]].to(torch.float64)
            q = q64[qrow[s:s + step]]
            if self.distance == "euclidean":
                out[s:s + step] = (b - q).square().sum(1)
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

    @staticmethod
    def _select(rows, cols, keys, n_rows, k):
        """Per row, the k smallest keys, ties to the lowest column: returns keys, cols [n_rows, k]."""
        o = torch.argsort(cols, stable=True)
        o = o[torch.argsort(keys[o], stable=True)]
        o = o[torch.argsort(rows[o], stable=True)]
        rows, cols, keys = rows[o], cols[o], keys[o]
        counts = torch.bincount(rows, minlength=n_rows)
        starts = torch.cumsum(counts, 0) - counts
        pos = (starts[:, None] + torch.arange(k, device=rows.device)).clamp_max(max(rows.numel() - 1, 0))
        if rows.numel() == 0:  # every row is resolved elsewhere
            return (torch.full((n_rows, k), math.nan, dtype=keys.dtype, device=keys.device),
                    torch.full((n_rows, k), -1, dtype=torch.int64, device=keys.device))
        return keys[pos], cols[pos]  # rows with fewer than k pairs are overwritten by the caller

    def _knn_block(self, q, k, self_rows=None, out_dtype=torch.float32):
        """Exact k-NN of a block of finite queries: (distances [b, k], indices [b, k])."""
        q64, q32, qn = self._query_parts(q)
        n_eff = self.n_train - (1 if self_rows is not None else 0)
        c = min(n_eff, k + _EXTRA_CANDIDATES)
        use_faiss = self.backend == "faiss"
        v, cand = (self._screen_faiss if use_faiss else self._screen_torch)(q32, c, self_rows, qn)
        tol = self._tolerance(qn, faiss=use_faiss).to(v.dtype)
        thr = v[:, k - 1] + 2 * tol  # every row that can still be among the k nearest has key <= thr
        inband = v <= thr[:, None]
        ok = ~inband[:, -1] if c < n_eff else torch.ones_like(thr, dtype=torch.bool)
        b = q.shape[0]
        rows, j = (inband & ok[:, None]).nonzero(as_tuple=True)  # typically ~k pairs per query
        cols = cand[rows, j]
        dist, idx = self._select(rows, cols, self._exact_pairs(q64, rows, cols), b, k)
        bad = (~ok).nonzero().flatten()
        if bad.numel():  # more near-ties than candidates: evaluate the whole band exactly
            rr, cc = [], []
            sub_self = self_rows[bad] if self_rows is not None else None
            for s, e, kk in self._key_chunks(q32[bad], sub_self):
                r, col = (kk <= thr[bad, None]).nonzero(as_tuple=True)
                rr.append(r)
                cc.append(col + s)
            rr, cc = torch.cat(rr), torch.cat(cc)
            dist[bad], idx[bad] = self._select(rr, cc, self._exact_pairs(q64[bad], rr, cc), bad.numel(), k)
        if self.distance == "euclidean":
            dist = dist.sqrt()
        return dist.to(out_dtype), idx

    # ------------------------------------------------------------------ public search
    def knn(self, queries, k: int, *, exclude_self: bool = False, out_dtype=torch.float32):
        """The k nearest bank rows of each query, sorted by distance, ties to the lowest index.

        Args:
            queries: ``[B, d]``; ``None`` means the bank itself (stored values).
            k: number of neighbours, ``1 <= k <= n_train`` (``n_train - 1`` with ``exclude_self``).
            exclude_self: query row i *is* bank row i (``queries`` has n_train rows or is None);
                row i is never its own neighbour (exact duplicates at other indices still count,
                as in the ``prdc`` package's radii).
            out_dtype: dtype of the returned distances (computed in float64).
        Returns:
            ``(distances [B, k], indices [B, k] int64)`` on the bank's device. Rows of non-finite
            queries get distance nan and index -1.
        """
        if queries is None:
            queries = self.features
        q = self._prepare(queries)
        k = int(k)
        limit = self.n_train - (1 if exclude_self else 0)
        if not 1 <= k <= limit:
            raise ValueError(f"k must be in [1, {limit}] for a bank of {self.n_train} rows"
                             f"{' excluding self-matches' if exclude_self else ''}, got {k}")
        if exclude_self and q.shape[0] != self.n_train:
            raise ValueError(f"exclude_self=True needs the bank's own {self.n_train} rows as queries, got {q.shape[0]}")
        n = q.shape[0]
        dist = torch.full((n, k), math.nan, dtype=out_dtype, device=self.device)
        idx = torch.full((n, k), -1, dtype=torch.int64, device=self.device)
        finite = torch.isfinite(q).all(dim=1) if q.is_floating_point() else torch.ones(n, dtype=torch.bool, device=self.device)
        good = finite.nonzero().flatten()
        for s in range(0, good.numel(), self.block_size):
            rows = good[s:s + self.block_size]
            self_rows = rows if exclude_self else None
            dist[rows], idx[rows] = self._knn_block(q[rows], k, self_rows, out_dtype)
        return dist, idx

    def search(self, queries, *, out_dtype=torch.float32):
        """Nearest bank row of each query: ``(indices [B] int64, distances [B])`` on the bank's device.

        Non-finite query rows get index -1 and distance nan (the caller counts them as invalid).
        """
        dist, idx = self.knn(queries, 1, out_dtype=out_dtype)
        return idx[:, 0], dist[:, 0]

    def distance_blocks(self, queries):
        """Screened squared distances in blocks, for threshold tests that must stay exact.

        Yields ``(q_start, q_end, b_start, b_end, approx, tol)``: ``approx[i, j]`` is the float32
        expanded-form squared Euclidean distance between query ``q_start + i`` and bank row
        ``b_start + j`` (cosine: between the normalised vectors, i.e. 2 x cosine distance), and
        ``|approx - exact| <= tol[i]``. Resolve pairs within ``tol`` of a threshold with
        :meth:`exact_distance`. Queries must be finite. Uses the torch backend's products.
        """
        q = self._prepare(queries)
        if not torch.isfinite(q).all():
            raise ValueError("queries must be finite for distance_blocks")
        for s in range(0, q.shape[0], self.block_size):
            _, q32, qn = self._query_parts(q[s:s + self.block_size])
            tol = self._tolerance(qn).to(torch.float32)
            qn32 = qn.to(torch.float32)[:, None]
            for b0, b1, keys in self._key_chunks(q32):
                yield s, s + q32.shape[0], b0, b1, keys.add_(qn32), tol


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
