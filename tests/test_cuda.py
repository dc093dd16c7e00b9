"""CUDA paths (run only where a CUDA device is present; see tests/conftest.py): tensor-core half
screens, host master gathers, faiss' GPU index, device-side set-up and a monitor evaluation."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_retrieval import SCREENS, brute_keys, inception_like, near_tie_data, tie_data  # noqa: E402

from irs_callbacks.retrieval import FeatureBank, faiss_available  # noqa: E402

pytestmark = pytest.mark.cuda
CUDA = "cuda"


@pytest.mark.parametrize("screen", SCREENS)
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("master", ["cpu", "cuda"])
def test_cuda_banks_match_float64_brute_force(screen, distance, master):
    for bank, queries in (near_tie_data(), tie_data(), (inception_like(700, 96, 0), inception_like(80, 96, 1))):
        fb = FeatureBank(bank, distance=distance, device=CUDA, screen_dtype=screen, master_device=master,
                         chunk_size=256, block_size=32, candidates=4)
        assert fb.device.type == "cuda" and fb.master_device.type == master
        dist, idx = fb.knn(queries, 5)
        assert idx.device.type == "cuda"
        ref = brute_keys(bank, queries, distance)
        ref_i = torch.argsort(ref, dim=1, stable=True)[:, :5]
        assert torch.equal(idx.cpu(), ref_i)
        ref_d = ref.gather(1, ref_i)
        expect = ref_d.sqrt() if distance == "euclidean" else ref_d
        assert torch.allclose(dist.double().cpu(), expect, rtol=1e-6, atol=1e-9)


def test_default_cuda_bank_halves_and_keeps_the_master_on_the_host():
    x = inception_like(2000, 64, 3)
    fb = FeatureBank(x, device=CUDA)
    assert fb.screen_dtype == torch.float16 and fb.master_device == torch.device("cpu")
    assert fb.features.data_ptr() == x.data_ptr() and fb.screen_bytes == x.numel() * 2
    q = x[:100] + 1e3 * torch.randn(100, 64)
    assert torch.equal(fb.search(q)[0].cpu(), brute_keys(x, q).argmin(1))
    assert fb.duplicate_count == FeatureBank(x).duplicate_count == 0


@pytest.mark.parametrize("screen", SCREENS)
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_tensor_core_screen_stays_within_the_bound(screen, distance):
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(4000, 512, generator=g) * 10.0 ** (-6 * torch.rand(4000, 512, generator=g))
    queries = torch.randn(300, 512, generator=g)
    fb = FeatureBank(feats, distance=distance, device=CUDA, screen_dtype=screen)
    if distance == "cosine":
        unit = lambda x: x.double() / x.double().norm(dim=1, keepdim=True)  # noqa: E731
        exact = ((unit(queries)[:, None] - unit(feats)[None]) ** 2).sum(-1)
    else:
        exact = ((queries.double()[:, None] - feats.double()[None]) ** 2).sum(-1)
    worst = 0.0
    for q0, q1, b0, b1, approx, tol in fb.distance_blocks(queries):
        err = (approx.double().cpu() - exact[q0:q1, b0:b1]).abs()
        worst = max(worst, float((err / tol.double().cpu()[:, None]).max()))
    assert 1e-4 < worst <= 1.0


def test_host_master_gathers_keep_a_bounded_pinned_buffer(monkeypatch):
    """Exact scans and band re-scans gather master rows per chunk of pairs; the pinned staging
    buffer kept between calls stays within _PINNED_ELEMENTS (larger gathers, e.g. many duplicate
    suspects, go through a transient copy) and answers stay exact."""
    from irs_callbacks import retrieval

    monkeypatch.setattr(retrieval, "_PAIR_ELEMENTS", 64 * 8)  # d = 64: 8 pairs per chunk
    monkeypatch.setattr(retrieval, "_PINNED_ELEMENTS", 64 * 16)  # at most 16 pinned rows kept
    bank, queries = near_tie_data()
    huge = torch.randn(3, 64, dtype=torch.float64) * 1e100  # squared norms > 2^120: exact scan
    queries = torch.cat([queries.double(), huge])
    for distance in ("euclidean", "cosine"):
        fb = FeatureBank(bank, distance=distance, device=CUDA, screen_dtype="float16", master_device="cpu",
                         chunk_size=200, block_size=16, candidates=4)
        idx = fb.knn(queries, 5)[1].cpu()
        assert torch.equal(idx, torch.argsort(brute_keys(bank, queries, distance), dim=1, stable=True)[:, :5])
        assert fb._pinned is not None and fb._pinned.shape[0] <= 16
        assert fb.duplicate_count == 40  # rows 100..139 equal row 7: 41 suspects, more than the pinned rows
        assert fb._pinned.shape[0] <= 16


def test_cuda_bank_keeps_no_row_hashes_until_duplicates_are_counted():
    """Row hashes (N x 4 float64) are computed when duplicate_count is first asked, and freed;
    a bank whose count comes from file metadata never holds them on the GPU."""
    small = FeatureBank(inception_like(500, 64, 8), device=CUDA)  # warm-up: cuBLAS workspace, kernels
    small.search(inception_like(10, 64, 9))
    n = 100_000
    x = inception_like(n, 64, 7)
    x[-5:] = x[:5]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    fb = FeatureBank(x, device=CUDA)  # float16 screen, float32 master on the host
    kept = fb.screen_bytes + n * 4  # the half copy and its float32 squared norms
    assert torch.cuda.memory_allocated() - before <= kept + 2 ** 16  # (hashes would add n * 32 bytes)
    assert fb.duplicate_count == 5
    assert torch.cuda.memory_allocated() - before <= kept + 2 ** 16


def test_tf32_float32_screen_is_still_exact():
    bank, queries = near_tie_data(1)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        idx = FeatureBank(bank, device=CUDA, screen_dtype="float32", candidates=4).knn(queries, 3)[1]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert torch.equal(idx.cpu(), torch.argsort(brute_keys(bank, queries), dim=1, stable=True)[:, :3])


@pytest.mark.skipif(not faiss_available(), reason="needs faiss")
def test_faiss_backend_on_cuda():
    bank, queries = tie_data(7)
    fb = FeatureBank(bank, device=CUDA, backend="faiss")
    assert fb.screen_dtype == torch.float32
    assert torch.equal(fb.knn(queries, 4)[1].cpu(), torch.argsort(brute_keys(bank, queries), dim=1, stable=True)[:, :4])


def test_reference_bank_set_up_on_cuda_equals_cpu():
    from irs_callbacks.reference import ReferenceBank

    x = inception_like(3000, 64, 4)
    x[2990:] = x[:10]
    on_gpu = ReferenceBank.from_features(x, device=CUDA)
    on_cpu = ReferenceBank.from_features(x)
    assert torch.equal(on_gpu.real_nearest, on_cpu.real_nearest) and on_gpu.real == on_cpu.real
    assert on_gpu.duplicate_count == on_cpu.duplicate_count == 10
    assert on_gpu.bank(device=CUDA).screen_dtype == torch.float16


def test_unmeasured_reference_bank_counts_duplicates_on_its_device(monkeypatch):
    from irs_callbacks.reference import ReferenceBank

    built = []
    original = FeatureBank._prepare_screen
    monkeypatch.setattr(FeatureBank, "_prepare_screen", lambda self, *args: built.append(self) or original(self, *args))
    x = inception_like(3000, 64, 4)
    x[2990:] = x[:10]
    ref = ReferenceBank.from_features(x, measure=False, device=CUDA)
    assert ref.duplicate_count == 10
    assert [b.device.type for b in built] == ["cuda"]  # (was a CPU bank whatever the device)
    assert ref.bank(device=CUDA) is built[0]


def test_reference_score_searches_cuda_samples_without_a_host_round_trip(monkeypatch):
    from irs_callbacks.reference import ReferenceBank

    x = inception_like(2000, 64, 6)
    ref = ReferenceBank.from_features(x, device=CUDA)
    bank, seen = ref.bank(device=CUDA), []
    search = bank.search
    monkeypatch.setattr(bank, "search", lambda queries, **kw: seen.append(queries) or search(queries, **kw))
    samples = (x[:100] + 1e3 * torch.randn(100, 64)).to(CUDA)
    samples[5, 0] = float("nan")
    result = ref.score(samples, device=CUDA)
    assert seen[-1].data_ptr() == samples.data_ptr()  # searched where it was (was copied to the host and back)
    truth = brute_keys(x, samples.cpu()).argmin(1)
    truth[5] = -1
    assert result == ref.score_indices(truth)


class _Rows:
    """A 'model' drawing training rows of a fixed subset; the extractor maps images back to rows."""

    def __init__(self, n_train, subset):
        self.n_train, self.subset = n_train, subset

    def sampler(self):
        from irs_callbacks.samplers import Sampler

        rows, n_train = self.subset, self.n_train

        class RowSampler(Sampler):
            def generate(self, indices, generators):
                picks = torch.tensor([int(torch.randint(len(rows), (1,), generator=g)) for g in generators])
                return ((rows[picks].double() + 0.5) / n_train).float().view(-1, 1, 1, 1)

        return RowSampler()


def test_monitor_evaluation_on_cuda_equals_cpu(tmp_path, monkeypatch):
    from irs_callbacks import IRSMonitor
    from irs_callbacks.reference import ReferenceBank

    monkeypatch.chdir(tmp_path)  # the monitor's default log folder
    n = 4000
    train = torch.randn(n, 128, generator=torch.Generator().manual_seed(0))
    ref = ReferenceBank.from_features(train, reference_features=train[:1000] + 0.01 * torch.randn(1000, 128))
    model = _Rows(n, torch.randperm(n, generator=torch.Generator().manual_seed(1))[:1500])

    def extractor(images):  # row of each 1-pixel image, plus a little noise
        rows = (images[:, 0, 0, 0].double() * n).floor().long()
        return train.to(images.device)[rows] + 0.01 * torch.randn(len(rows), 128, device=images.device)

    results = {}
    for device in ("cpu", CUDA):
        monitor = IRSMonitor(sampler=model.sampler(), reference_bank=ref, extractor=extractor, num_samples=1000,
                             batch_size=250, target_irs=0.8, device=device)
        results[device] = monitor.evaluate(step=None)
    cpu, gpu = results["cpu"], results[CUDA]
    assert (gpu.verdict, gpu.rule, gpu.samples_used, gpu.n_learned) == (cpu.verdict, cpu.rule, cpu.samples_used,
                                                                         cpu.n_learned)
    assert gpu.verdict == "reject" and gpu.curve == cpu.curve  # coverage 1500 / 4000 < 0.8
