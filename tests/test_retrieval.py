"""FeatureBank / LearnedSet against brute-force float64 truth (ties -> lowest index)."""

import io

import numpy as np
import pytest
import torch

from irs_callbacks.retrieval import FeatureBank, LearnedSet, faiss_available

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
        FeatureBank(torch.full((2, 3), 1e30))
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
