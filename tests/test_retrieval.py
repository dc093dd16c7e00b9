"""FeatureBank / LearnedSet against brute-force float64 truth (ties -> lowest index)."""

import io

import numpy as np
import pytest
import torch

from irs_callbacks.retrieval import SCREEN_DTYPES, FeatureBank, LearnedSet, faiss_available, resolve_screen_dtype

BACKENDS = ["torch"] + (["faiss"] if faiss_available() else [])


def brute_knn(bank, queries, k, distance="euclidean", exclude_self=False):
    """Exact k-NN in float64 with a stable sort (ties to the lowest index)."""
    b, q = bank.double(), queries.double()
    if distance == "cosine":
        bn = b.norm(dim=1, keepdim=True)
        qn = q.norm(dim=1, keepdim=True)
        d = 1 - (q @ b.T) / (qn * bn.T)
    else:
        d = (q[:, None, :] - b[None]).square().sum(-1).sqrt()
    if exclude_self:
        d.fill_diagonal_(float("inf"))
    order = torch.argsort(d, dim=1, stable=True)[:, :k]
    return d.gather(1, order), order


def tie_data(seed=0, n=1500, d=48):
    g = torch.Generator().manual_seed(seed)
    bank = torch.randn(n, d, generator=g)
    bank[200:230] = bank[3]  # 30 duplicates of row 3 -> more ties than screened candidates
    bank[n - 100] = bank[17]
    queries = torch.randn(120, d, generator=g)
    queries[:40] = bank[torch.randint(0, n, (40,), generator=g)]  # queries equal to bank rows
    queries[40:45] = bank[3]
    return bank, queries


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_knn_and_search_match_brute_force(backend, distance, dtype):
    bank, queries = tie_data()
    if backend == "faiss" and dtype != "float32":
        pytest.skip("faiss screens in float32")
    fb = FeatureBank(bank, distance=distance, screen_dtype=dtype, backend=backend, chunk_size=400, block_size=50)
    stored = fb.features.double()  # exact for the float32 master values
    dist, idx = fb.knn(queries, 4)
    ref_d, ref_i = brute_knn(stored, queries, 4, distance)
    assert torch.equal(idx, ref_i)
    assert torch.allclose(dist.double(), ref_d, rtol=1e-6, atol=1e-6)
    i1, d1 = fb.search(queries)
    assert torch.equal(i1, ref_i[:, 0]) and torch.equal(d1, dist[:, 0])
    assert int(i1[40]) == 3  # the first of 31 identical rows


@pytest.mark.parametrize("backend", BACKENDS)
def test_knn_exclude_self_counts_duplicates_like_prdc(backend):
    bank, _ = tie_data(1, n=600)
    fb = FeatureBank(bank, backend=backend, chunk_size=256)
    dist, idx = fb.knn(None, 3, exclude_self=True)
    ref_d, ref_i = brute_knn(bank, bank, 3, exclude_self=True)
    assert torch.equal(idx, ref_i)
    assert (idx != torch.arange(600)[:, None]).all()
    assert float(dist[3, 0]) == 0.0 and int(idx[3, 0]) == 200  # a duplicate, not itself


def test_integer_features_with_many_exact_ties():
    g = torch.Generator().manual_seed(2)
    bank = torch.randint(0, 3, (1000, 12), generator=g).float()
    queries = torch.randint(0, 3, (100, 12), generator=g).float()
    for backend in BACKENDS:
        dist, idx = FeatureBank(bank, backend=backend, chunk_size=300).knn(queries, 5)
        ref_d, ref_i = brute_knn(bank, queries, 5)
        assert torch.equal(idx, ref_i)
        assert torch.equal(dist.double(), ref_d.float().double())


def test_non_finite_queries_get_minus_one_and_nan():
    bank, queries = tie_data(3, n=300)
    queries[5, 2] = float("nan")
    queries[7, 0] = float("inf")
    idx, dist = FeatureBank(bank).search(queries)
    assert idx[5] == -1 and idx[7] == -1 and torch.isnan(dist[[5, 7]]).all()
    keep = torch.ones(len(queries), dtype=torch.bool)
    keep[[5, 7]] = False
    assert torch.equal(idx[keep], brute_knn(bank, queries[keep], 1)[1][:, 0])


def test_duplicate_count_and_cosine_zero_rows():
    bank = torch.randn(50, 8)
    bank[10] = bank[0]
    bank[11] = bank[0]
    bank[20] = bank[1]
    assert FeatureBank(bank).duplicate_count == 3
    signed = torch.cat([bank, torch.zeros(1, 8), -torch.zeros(1, 8)])  # -0.0 == +0.0
    assert FeatureBank(signed, screen_dtype="float16").duplicate_count == 4
    scaled = bank.clone()
    scaled[30] = 2.0 * scaled[2]  # same direction: a duplicate only under cosine
    assert FeatureBank(scaled).duplicate_count == 3
    assert FeatureBank(scaled, distance="cosine").duplicate_count == 4
    zero = torch.zeros(1, 8)
    fb = FeatureBank(torch.cat([bank, zero]), distance="cosine")
    d, i = fb.knn(zero, 2)
    assert torch.allclose(d, torch.ones_like(d)) and i.tolist() == [[0, 1]]


def test_bad_input_errors():
    with pytest.raises(ValueError, match="non-empty"):
        FeatureBank(torch.zeros(0, 4))
    with pytest.raises(ValueError, match=r"\[N, d\]"):
        FeatureBank(torch.zeros(4))
    bad = torch.randn(5, 3)
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="1 non-finite"):
        FeatureBank(bad)
    with pytest.raises(ValueError, match="distance"):
        FeatureBank(torch.randn(5, 3), distance="manhattan")
    with pytest.raises(ValueError, match="backend"):
        FeatureBank(torch.randn(5, 3), backend="annoy")
    fb = FeatureBank(torch.randn(5, 3))
    with pytest.raises(ValueError, match="dimension 4"):
        fb.search(torch.randn(2, 4))
    with pytest.raises(ValueError, match="k must be"):
        fb.knn(torch.randn(2, 3), 6)
    with pytest.raises(ValueError, match="too large"):
        FeatureBank(torch.full((2, 3), 1e30), screen_dtype="float32")
    with pytest.raises(ValueError, match="screen_dtype"):
        FeatureBank(torch.randn(5, 3), screen_dtype=torch.float64)
    with pytest.raises(ValueError, match="rows"):
        fb.search(torch.randn(2, 3), rows=torch.ones(4, dtype=torch.bool))


def test_numpy_input_and_empty_query_batch():
    bank = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
    fb = FeatureBank(bank)
    idx, dist = fb.search(bank[:5])
    assert idx.tolist() == [0, 1, 2, 3, 4] and torch.all(dist == 0)
    idx, dist = fb.search(np.zeros((0, 6)))
    assert idx.shape == (0,) and dist.shape == (0,)


def test_learned_set_counts_and_state_round_trip():
    ls = LearnedSet(10)
    assert ls.update(torch.tensor([1, 1, 3, -1])) == 2
    assert ls.update([3, 4, -1, -1]) == 1
    assert (ls.n_learned, ls.n_samples, ls.n_invalid) == (3, 8, 3)
    assert ls.hits.tolist() == [0, 2, 0, 2, 1, 0, 0, 0, 0, 0]
    buffer = io.BytesIO()
    torch.save(ls.state_dict(), buffer)
    buffer.seek(0)
    other = LearnedSet(10)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(other.hits, ls.hits) and (other.n_learned, other.n_samples, other.n_invalid) == (3, 8, 3)
    with pytest.raises(ValueError, match="n_train=10"):
        LearnedSet(11).load_state_dict(ls.state_dict())
    with pytest.raises(ValueError, match=r"\[-1, 9\]"):
        ls.update([10])
    ls.reset()
    assert (ls.n_learned, ls.n_samples, ls.n_invalid, int(ls.hits.sum())) == (0, 0, 0, 0)


def test_search_feeds_learned_set():
    bank, queries = tie_data(4, n=200)
    fb = FeatureBank(bank)
    ls = LearnedSet(fb.n_train, device=fb.device)
    idx, _ = fb.search(queries)
    ls.update(idx)
    assert ls.n_learned == len(set(brute_knn(bank, queries, 1)[1][:, 0].tolist()))


# ---------------------------------------------------------------------------------------- screens
SCREENS = ["float32", "float16", "bfloat16"]
# bfloat16 runs natively on CPUs with AVX512-BF16/AMX (bfloat16-rounded products) and is emulated
# elsewhere; "bfloat16-emulated" forces the emulation so both paths are tested on any CPU
MODES = SCREENS + ["bfloat16-emulated"]


def screen_mode(mode, monkeypatch):
    from irs_callbacks import retrieval

    if mode == "bfloat16-emulated":
        monkeypatch.setattr(retrieval, "_CPU_BF16", False)
        return "bfloat16"
    return mode


def brute_keys(bank, queries, distance="euclidean"):
    """float64 keys the bank compares: squared Euclidean distances or cosine distances."""
    b, q = bank.double(), queries.double()
    if distance == "cosine":
        den = q.norm(dim=1, keepdim=True) * b.norm(dim=1, keepdim=True).T
        cos = torch.where(den > 0, (q @ b.T) / den.clamp_min(1e-300), torch.zeros_like(den))
        return (1 - cos).clamp(0, 2)
    return (q[:, None, :] - b[None]).square().sum(-1)


def inception_like(n, d, seed, scale=1e8):
    """Non-negative features with a large common component and norms ~ scale (random Inception)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(16, d, generator=g)
    z = torch.randn(n, 16, generator=g)
    return (torch.relu(z @ basis + 2.0 + 0.5 * torch.randn(n, d, generator=g)) * (scale / d ** 0.5)).float()


@pytest.mark.parametrize("screen", SCREENS)
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_half_screens_are_exact_at_inception_scale(screen, distance):
    """Norms ~1e8 (float16 overflows at 65504 without the power-of-two scaling) and a large
    common component: every screen gives the float64 brute force's indices."""
    feats = inception_like(700, 96, 0)
    queries = torch.cat([feats[:50] + 1e5 * torch.randn(50, 96), inception_like(50, 96, 1), feats[50:60]])
    fb = FeatureBank(feats, distance=distance, screen_dtype=screen, chunk_size=256, block_size=40)
    assert fb.screen_dtype == SCREEN_DTYPES[screen] and fb.features.data_ptr() == feats.data_ptr()
    dist, idx = fb.knn(queries, 3)
    ref = brute_keys(feats, queries, distance)
    ref_i = torch.argsort(ref, dim=1, stable=True)[:, :3]
    assert torch.equal(idx, ref_i)
    ref_d = ref.gather(1, ref_i)
    if distance == "euclidean":  # the same float64 formula: the same bits
        assert torch.equal(dist.double(), ref_d.sqrt().float().double())
    else:  # the brute force's matrix product sums in another order
        assert torch.allclose(dist.double(), ref_d, rtol=1e-6, atol=1e-12)


def near_tie_data(seed=0):
    """Integer features: every float64 distance is an exact integer, so ties are exact and near-ties
    differ by 1 against squared norms ~1e7 (far below any half-precision screen's resolution);
    an outlier row with a huge norm widens every error band, so the band re-scan runs too."""
    g = torch.Generator().manual_seed(seed)
    d = 64
    base = torch.randint(0, 200, (d,), generator=g).double()
    bank = base + torch.randint(-3, 4, (900, d), generator=g).double()
    bank[100:140] = bank[7]  # 40 identical rows: more ties than candidates
    for j in range(20):  # rows at squared distance 1 and 2 from row 7: near-ties in every screen
        bank[300 + j] = bank[7]
        bank[300 + j, j] += 1 if j % 2 else -1
        bank[400 + j] = bank[300 + j]
        bank[400 + j, j + 20] += 1
    bank[899] = base * 300  # outlier: B ~ 1e11
    queries = torch.cat([bank[[7, 300, 301, 400, 5, 899]], base + torch.randint(-3, 4, (30, d), generator=g)])
    return bank.float(), queries.float()


@pytest.mark.parametrize("screen", MODES)
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_constructed_near_ties_match_float64_brute_force(screen, distance, monkeypatch):
    screen = screen_mode(screen, monkeypatch)
    bank, queries = near_tie_data()
    fb = FeatureBank(bank, distance=distance, screen_dtype=screen, chunk_size=200, block_size=16, candidates=4)
    _, idx = fb.knn(queries, 5)
    ref_i = torch.argsort(brute_keys(bank, queries, distance), dim=1, stable=True)[:, :5]
    assert torch.equal(idx, ref_i)
    if distance == "euclidean":
        assert idx[0].tolist() == [7, 100, 101, 102, 103]  # exact ties: lowest indices first


@pytest.mark.parametrize("screen", MODES)
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("scale", [1e-30, 1e-12, 1.0, 1e8])
def test_screened_distances_stay_within_the_rigorous_bound(screen, distance, scale, monkeypatch):
    """|screened - exact| <= tol for every pair (distance_blocks), including rows whose entries
    span 12 decades (float16 subnormals after scaling) -- and the bound is not vacuous."""
    screen = screen_mode(screen, monkeypatch)
    g = torch.Generator().manual_seed(3)
    d = 256
    spread = 10.0 ** (-12 * torch.rand(300, d, generator=g))
    feats = (torch.randn(300, d, generator=g) * spread * scale).float()
    queries = (torch.randn(40, d, generator=g) * scale).float()
    queries[:20] = feats[:20] + 1e-3 * scale * torch.randn(20, d, generator=g)
    fb = FeatureBank(feats, distance=distance, screen_dtype=screen, chunk_size=128, block_size=16)
    if scale < 1e-20:  # squared distances below float32's range: no float32 distance blocks, but exact search
        ref = torch.argsort(brute_keys(feats, queries, distance), dim=1, stable=True)[:, :2]
        assert torch.equal(fb.knn(queries, 2)[1], ref)
        return
    if distance == "cosine":
        unit = lambda x: x.double() / x.double().norm(dim=1, keepdim=True)  # noqa: E731
        exact = (unit(queries)[:, None] - unit(feats)[None]).square().sum(-1)
    else:
        exact = (queries.double()[:, None] - feats.double()[None]).square().sum(-1)
    worst = 0.0
    for q0, q1, b0, b1, approx, tol in fb.distance_blocks(queries):
        err = (approx.double() - exact[q0:q1, b0:b1]).abs()
        ratio = float((err / tol.double()[:, None]).max())
        worst = max(worst, ratio)
    assert worst <= 1.0
    assert worst > 1e-4  # the bound is of the order of the real error, not a vacuous one


def test_rounding_bound_terms():
    from irs_callbacks import _rounding as r

    d, q, b = 2048, 3.0, 5.0
    f32 = r.product_screen_tolerance(q, b, d, input_unit=r.F32_UNIT_ROUNDOFF)
    f16 = r.product_screen_tolerance(q, b, d, input_unit=r.F16_UNIT_ROUNDOFF)
    tc = r.product_screen_tolerance(q, b, d, input_unit=r.F16_UNIT_ROUNDOFF,
                                    accumulation_unit=r.TENSOR_CORE_UNIT_ROUNDOFF)
    bf = r.product_screen_tolerance(q, b, d, input_unit=r.BF16_UNIT_ROUNDOFF,
                                    accumulation_unit=r.TENSOR_CORE_UNIT_ROUNDOFF)
    # leading terms: 2 (2u) (Q+B)/2 for the inputs, 2 gamma_d(u_acc) (Q+B)/2 for the sums
    s = (q + b) / 2
    assert f16 == pytest.approx(2 * (2 * 2 ** -11 + r.gamma(d)) * s, rel=0.01)
    assert tc == pytest.approx(2 * (2 * 2 ** -11 + r.gamma(d, 2 ** -20)) * s, rel=0.01)
    assert bf == pytest.approx(2 * (2 * 2 ** -8 + r.gamma(d, 2 ** -20)) * s, rel=0.01)
    assert f32 < f16 < tc < bf
    assert r.product_screen_tolerance(q, b, d, input_unit=r.F16_UNIT_ROUNDOFF, floor_q=1e-3) > f16


def test_search_restricted_to_rows_returns_bank_indices():
    bank, queries = tie_data(5, n=400)
    fb = FeatureBank(bank, chunk_size=128, screen_dtype="float16")
    allowed = torch.arange(1, 400, 3)
    idx, dist = fb.search(queries, rows=allowed)
    ref = brute_keys(bank[allowed], queries).argmin(1)
    assert torch.equal(idx, allowed[ref])
    mask = torch.zeros(400, dtype=torch.bool)
    mask[allowed] = True
    assert torch.equal(fb.search(queries, rows=mask)[0], idx)
    with pytest.raises(ValueError, match="k must be"):
        fb.knn(queries, 2, rows=torch.tensor([3]))


def test_zero_and_huge_queries():
    g = torch.Generator().manual_seed(6)
    bank = torch.randn(200, 16, generator=g)
    fb = FeatureBank(bank, distance="cosine", screen_dtype="float16")
    d, i = fb.knn(torch.zeros(2, 16), 3)
    assert i.tolist() == [[0, 1, 2]] * 2 and torch.equal(d, torch.ones(2, 3))
    d, i = FeatureBank(bank, distance="cosine").knn(None, 2, exclude_self=True)
    assert (i != torch.arange(200)[:, None]).all()
    # a query too large for float32 keys is answered by an exact scan (no overflow, no crash)
    huge = torch.randn(3, 16, generator=g, dtype=torch.float64) * 1e200
    for screen in SCREENS:
        idx, _ = FeatureBank(bank, screen_dtype=screen).search(huge)
        assert torch.equal(idx, brute_keys(bank, huge).argmin(1))


def test_finite_rows_checks_overflowing_sums_exactly():
    from irs_callbacks.retrieval import finite_rows

    x = torch.ones(5, 4)
    x[1] = 3e38  # finite values whose sum overflows float32
    x[2, 3] = float("nan")
    x[4, 0] = -float("inf")
    assert finite_rows(x).tolist() == [True, True, False, True, False]
    assert finite_rows(torch.ones(3, 2, dtype=torch.int64)).all()


def test_memory_layout_and_options():
    x = torch.randn(300, 32)
    fb = FeatureBank(x, screen_dtype="float32")
    assert fb.features.data_ptr() == x.data_ptr() and fb.screen_bytes == 0  # float32 screen = master
    half = FeatureBank(x, screen_dtype=torch.float16)
    assert half.features.data_ptr() == x.data_ptr() and half.screen_bytes == 300 * 32 * 2
    assert FeatureBank(x.double()).features.dtype == torch.float32
    huge = FeatureBank(torch.full((2, 3), 1e30), screen_dtype="float16")  # centred and scaled: fine
    assert huge.search(torch.full((1, 3), 1e30))[0].tolist() == [0]
    # defaults never depend on CUDA being present: the features' device, its screen
    assert fb.device == torch.device("cpu") and FeatureBank(x).device == torch.device("cpu")
    assert FeatureBank(x).screen_dtype == resolve_screen_dtype(None, "cpu")
    assert resolve_screen_dtype(None, "cuda") == torch.float16
    if faiss_available():
        with pytest.raises(ValueError, match="faiss"):
            FeatureBank(x, backend="faiss", screen_dtype="float16")
    with pytest.raises(ValueError, match="candidates"):
        FeatureBank(x, candidates=-1)


@pytest.mark.parametrize("screen", ["float16", "bfloat16-emulated", "bfloat16"])
def test_wide_half_bands_are_rescreened_in_float32_on_the_master(screen, monkeypatch):
    """Queries far from every row (all distances nearly equal) put many rows inside a half
    screen's error band; they are re-screened in float32 on the master (no copy), still exact."""
    screen = screen_mode(screen, monkeypatch)
    g = torch.Generator().manual_seed(8)
    bank, queries = torch.randn(2000, 256, generator=g), torch.randn(32, 256, generator=g)
    fb = FeatureBank(bank, screen_dtype=screen, candidates=8)
    _, idx = fb.knn(queries, 2)
    assert torch.equal(idx, torch.argsort(brute_keys(bank, queries), dim=1, stable=True)[:, :2])
    if screen == "bfloat16":  # (float16's band is narrow enough here)
        assert fb._fallback is not None and fb._fallback.data is fb.features  # used, and shares the master
    cosine = FeatureBank(bank, distance="cosine", screen_dtype=screen, candidates=8)  # no fallback: band scan
    _, idx = cosine.knn(queries, 2)
    assert torch.equal(idx, torch.argsort(brute_keys(bank, queries, "cosine"), dim=1, stable=True)[:, :2])


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_exact_stage_fetches_master_rows_per_bounded_chunk(distance, monkeypatch):
    """Band re-scans and exact scans (unscreenable queries) hand many pairs to the exact stage at
    once; it fetches master rows per chunk of ``_PAIR_ELEMENTS // d`` pairs (at N = 1.28M, d = 2048
    a whole scan step at once was 8 GiB), and the answers stay the float64 brute force's."""
    from irs_callbacks import retrieval

    monkeypatch.setattr(retrieval, "_PAIR_ELEMENTS", 64 * 8, raising=False)  # d = 64: 8 pairs per chunk
    fetched, asked = [], []
    master_rows, exact_pairs = FeatureBank._master_rows, FeatureBank._exact_pairs

    def counting_rows(self, cols):
        fetched.append(cols.numel())
        return master_rows(self, cols)

    def counting_pairs(self, queries, qrow, cols):
        asked.append(qrow.numel())
        return exact_pairs(self, queries, qrow, cols)

    monkeypatch.setattr(FeatureBank, "_master_rows", counting_rows)
    monkeypatch.setattr(FeatureBank, "_exact_pairs", counting_pairs)
    bank, queries = near_tie_data()
    g = torch.Generator().manual_seed(9)
    huge = torch.randn(3, 64, generator=g, dtype=torch.float64) * 1e100  # squared norms > 2^120: exact scan
    queries = torch.cat([queries.double(), huge])
    fb = FeatureBank(bank, distance=distance, screen_dtype="float16", chunk_size=200, block_size=16, candidates=4)
    _, idx = fb.knn(queries, 5)
    assert torch.equal(idx, torch.argsort(brute_keys(bank, queries, distance), dim=1, stable=True)[:, :5])
    assert max(asked) > 200  # the band re-scan / exact scan asked for many pairs at once ...
    assert 0 < max(fetched) <= 8  # ... and no gather fetched more rows than one chunk
