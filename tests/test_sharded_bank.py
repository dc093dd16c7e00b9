"""ShardedFeatureBank: 2 gloo processes (spawned here) give exactly the single-process answers."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parent / "sharded_bank_worker.py"
sys.path.insert(0, str(WORKER.parent))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(base, device):
    root = str(Path(__file__).parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root, "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "BANK_DEVICE": device}
    one = subprocess.run([sys.executable, str(WORKER), str(base)], env={**env, "WORLD_SIZE": "1"},
                         capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-3000:]
    single = torch.load(base / "rank0.pt", weights_only=True)
    (base / "two").mkdir()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(base / "two")],
                              env={**env, "WORLD_SIZE": "2", "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
    return single, [torch.load(base / "two" / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("sharded"), "cpu")


def test_two_ranks_give_the_single_process_indices(runs):
    from sharded_bank_worker import ROUNDS

    single, (r0, r1) = runs
    for setting, rounds in enumerate(single["results"]):
        for n, (idx, dist, n_learned) in enumerate(rounds):
            (a0, b0), (a1, b1) = ROUNDS[n]
            i0, d0, l0 = r0["results"][setting][n]
            i1, d1, l1 = r1["results"][setting][n]
            assert torch.equal(torch.cat([i0, i1]), idx)  # every rank got its own queries' answers
            torch.testing.assert_close(torch.cat([d0, d1]), dist, rtol=0, atol=0, equal_nan=True)
            assert l0 == l1 == n_learned  # the same learned-set history on every rank
            assert (len(i0), len(i1)) == (b0 - a0, b1 - a1)


def test_ties_across_shards_go_to_the_lowest_global_index(runs):
    single, (r0, _) = runs
    idx = r0["results"][0][0][0]  # euclidean, round 0, rank 0: queries 0..19
    assert idx[:4].tolist() == [10, 10, 49, 49] and idx[6] == -1
    cosine = r0["results"][2][0][0]
    assert cosine[4] == 5 and cosine[5] == 5 and cosine[7] == 0  # same direction; a zero query: row 0
    assert "rows [0, 50)" in r0["shard_error"]


@pytest.mark.cuda
def test_two_ranks_with_cuda_banks_equal_one(tmp_path):
    """Both ranks screen on the CUDA device (float16 / bfloat16 tensor cores), gloo exchanges on the CPU."""
    single, (r0, r1) = launch(tmp_path, "cuda")
    for setting, rounds in enumerate(single["results"]):
        for n, (idx, dist, n_learned) in enumerate(rounds):
            assert torch.equal(torch.cat([r0["results"][setting][n][0], r1["results"][setting][n][0]]), idx)
            assert r0["results"][setting][n][2] == r1["results"][setting][n][2] == n_learned
