"""Worker for tests/test_sharded_bank.py: one rank of a 2-process gloo run (or the 1-process
reference). Writes ``<out>/rank<k>.pt`` with the indices and distances of every search."""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from irs_callbacks.retrieval import FeatureBank, LearnedSet, ShardedFeatureBank, shard_range


def data():
    """101 rows (shards [0, 50) and [50, 101) for 2 ranks) with ties across the shard boundary."""
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(101, 24, generator=g) * 1e6
    bank[70] = bank[10]  # identical rows in different shards: the lower global index wins
    bank[50] = bank[49]  # ... and on either side of the boundary
    bank[90] = bank[5] * 4  # same direction (cosine tie), other shard
    queries = torch.randn(60, 24, generator=g, dtype=torch.float64) * 1e6
    queries[:6] = bank[[10, 70, 49, 50, 5, 90]].double()
    queries[6, 3] = float("nan")  # invalid row: -1 / nan
    queries[7] = 0.0
    return bank, queries


# rounds: (rank 0 rows, rank 1 rows); rank 1 is empty in round 1, rank 0 in round 2
ROUNDS = [((0, 20), (20, 35)), ((35, 50), (50, 50)), ((50, 50), (50, 60))]
SETTINGS = [dict(distance="euclidean", screen_dtype="float32"), dict(distance="euclidean", screen_dtype="float16"),
            dict(distance="cosine", screen_dtype="bfloat16")]


def main(out, world):
    out = Path(out)
    device = os.environ.get("BANK_DEVICE", "cpu")
    bank, queries = data()
    results = []
    if world == 1:
        for settings in SETTINGS:
            fb = FeatureBank(bank, device=device, **settings)
            learned, rounds = LearnedSet(len(bank)), []
            for parts in ROUNDS:
                (a0, b0), (a1, b1) = parts  # rank 1 sends float32 queries (gathered exactly as float64)
                idx, dist_ = fb.search(torch.cat([queries[a0:b0], queries[a1:b1].float().double()]))
                learned.update(idx)
                rounds.append((idx.cpu(), dist_.cpu(), learned.n_learned))
            results.append(rounds)
        torch.save({"results": results, "world": 1}, out / "rank0.pt")
        return
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    start, stop = shard_range(len(bank), world, rank)
    for settings in SETTINGS:
        sharded = ShardedFeatureBank.from_features(bank, device=device, **settings)
        assert (sharded.offset, sharded.local.n_train) == (start, stop - start)
        learned, rounds = LearnedSet(len(bank)), []
        for parts in ROUNDS:
            a, b = parts[rank]
            local = queries[a:b] if rank == 0 else queries[a:b].float()  # dtypes differ across ranks
            idx, dist_ = sharded.search(local)
            idx, dist_ = idx.cpu(), dist_.cpu()
            sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
            dist.all_gather(sizes, torch.tensor([idx.numel()]))
            padded = torch.full((max(int(s) for s in sizes),), -2, dtype=torch.int64)
            padded[: idx.numel()] = idx
            everyone = [torch.empty_like(padded) for _ in range(world)]
            dist.all_gather(everyone, padded)
            gathered = torch.cat(everyone)
            learned.update(gathered[gathered != -2])
            rounds.append((idx, dist_, learned.n_learned))
        results.append(rounds)
    # a shard of a saved-bank slice has the wrong size -> a clear error
    try:
        ShardedFeatureBank(bank[:3], n_train=len(bank))
        shard_error = None
    except ValueError as error:
        shard_error = str(error)
    torch.save({"results": results, "world": world, "shard_error": shard_error}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], int(os.environ.get("WORLD_SIZE", "1")))
