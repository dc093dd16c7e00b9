"""Two processes give the single-process result.

``accelerate launch --cpu --num_processes 2`` starts a single process on a machine without an MPI
hostfile (Accelerate's simple launcher), so two CPU processes are started with Accelerate's
torchrun launcher (``--multi_gpu --num_processes 2``) while the worker asks for
``Accelerator(cpu=True)``: Accelerate then runs MULTI_CPU with the gloo backend.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "dist_monitor_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(out, processes, mode="shard"):
    # a CPU (gloo) test wherever it runs: with a GPU visible, --multi_gpu would put ranks on it
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1]), "CUDA_VISIBLE_DEVICES": ""}
    if processes == 1:
        cmd = [sys.executable, str(WORKER), str(out), mode]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(WORKER), str(out), mode]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    return run(base / "one", 1), run(base / "two", 2), base


@pytest.fixture(scope="module")
def replicated(tmp_path_factory):
    return run(tmp_path_factory.mktemp("dist") / "replicated", 2, mode="replicate")


def test_two_processes_with_a_sharded_bank_equal_one(runs):
    (single,), (r0, r1), _ = runs
    assert r0["world"] == 2 and r1["world"] == 2
    assert r0["search"] == r1["search"] == "ShardedFeatureBank" and single["search"] == "FeatureBank"
    assert [h["verdict"] for h in single["history"]] == ["reject", "pass", "reject", "reject"]
    assert r0["history"] == single["history"]  # verdicts, counts, curves, estimates: identical
    assert r1["history"] == single["history"]  # every rank holds the same learned set and decisions
    assert single["stopped_at"] == r0["stopped_at"] == r1["stopped_at"] == 16  # patience 2, on every rank


def test_a_full_copy_per_process_gives_the_same(runs, replicated):
    (single,), _, _ = runs
    assert replicated[0]["search"] == "FeatureBank"
    assert replicated[0]["history"] == replicated[1]["history"] == single["history"]


def test_samples_are_split_not_repeated(runs):
    (single,), (r0, r1), _ = runs
    assert not set(r0["seen"]) & set(r1["seen"])  # each global index drawn by one rank only
    # per evaluation, the two ranks together drew exactly the indices one process drew
    assert sorted(r0["seen"] + r1["seen"]) == sorted(single["seen"])
    assert r0["seen"] and r1["seen"]


def test_only_the_main_process_writes(runs):
    (single,), (r0, r1), base = runs
    assert r0["history_file"] is not None and r1["history_file"] is None
    lines = Path(r0["history_file"]).read_text().splitlines()
    assert len(lines) == len(r0["history"])
    ledger_one = json.loads((base / "one" / "irs_pruning_ledger.json").read_text())["checkpoints"]
    ledger_two = json.loads((base / "two" / "irs_pruning_ledger.json").read_text())["checkpoints"]
    # rejected at 4 and 12: deleted; 8 passed (and is the best), 16 is the newest
    expected = {"checkpoint-4": "deleted", "checkpoint-8": "kept", "checkpoint-12": "deleted", "checkpoint-16": "kept"}
    assert {k: v["status"] for k, v in ledger_one.items()} == expected
    assert {k: v["status"] for k, v in ledger_two.items()} == expected
    for run_folder in (base / "one", base / "two"):
        assert sorted(p.name for p in run_folder.glob("checkpoint-*")) == ["checkpoint-16", "checkpoint-8"]
