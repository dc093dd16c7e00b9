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


FAILURES_WORKER = Path(__file__).parent / "dist_failures_worker.py"
SCENARIOS = ("no_sampler", "broken_outputs", "full_disk", "unconnected")


@pytest.fixture(scope="module")
def failures(tmp_path_factory):
    """Monitoring problems on one process of two (one launch, one monitor per scenario): every rank
    must end each scenario (no hang: the worker gives up after 90 s, the launch after 150 s) in the
    same state. Returns ({scenario: (rank0, rank1)}, the launch's output)."""
    out = tmp_path_factory.mktemp("dist_failures")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1]), "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(FAILURES_WORKER), str(out), *SCENARIOS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-6000:]
    runs = {name: tuple(json.loads((out / name / f"rank{r}.json").read_text()) for r in range(2)) for name in SCENARIOS}
    return runs, proc.stdout + proc.stderr


def test_a_sampler_on_the_main_process_only_turns_the_monitor_off_on_every_process(failures):
    """IRSMonitor() infers its sampler in save_state's hook; a script saving on the main process
    only leaves process 1 without one: both turn off at the first evaluation (it used to hang)."""
    (r0, r1), log = failures[0]["no_sampler"], failures[1]
    assert r0["ranks"] == r1["ranks"] == [0, 1]
    assert r0["history"] == r1["history"] == [] and r0["errors"] == r1["errors"] == []
    assert r0["due_next"] is r1["due_next"] is False  # off on both
    assert log.count("IRSMonitor is off for this run") == 1 + 1  # this scenario (main only) + unconnected
    assert "no sampler on process(es) [1]" in log and "IRSMonitor(PipelineSampler(...))" in log


def test_a_main_process_output_failure_is_the_same_error_on_every_process(failures):
    """The tracker factory fails on the main process only: every evaluation is the same failure on
    both processes, the monitor stays on on both (it used to turn off on one only: mismatch)."""
    r0, r1 = failures[0]["broken_outputs"]
    assert r0["ranks"] == r1["ranks"] == [0, 1]
    assert r0["errors"] == r1["errors"] == [2, 4, 6] and r0["history"] == r1["history"] == []
    assert r0["due_next"] is r1["due_next"] is True
    assert "evaluation set-up failed on process(es) [0]: log folder not writable" in failures[1]


def test_a_main_process_history_write_failure_keeps_the_evaluation_on_every_process(failures):
    """A full disk on the main process: the evaluation still counts on both processes (history,
    patience 2 stops both at step 4), one ERROR (it used to hang in the stopping decision)."""
    (r0, r1), log = failures[0]["full_disk"], failures[1]
    assert r0["ranks"] == r1["ranks"] == [0, 1]
    assert [h["step"] for h in r0["history"]] == [2, 4] and r0["history"] == r1["history"]
    assert [h["verdict"] for h in r0["history"]] == ["reject", "reject"]  # one digit class of ten
    assert r0["stopped_at"] == r1["stopped_at"] == 4 and r0["errors"] == r1["errors"] == []
    assert not r0["history_file_exists"]
    assert log.count("could not write the evaluation") == 1 and "No space left on device" in log


def test_a_monitor_not_connected_to_a_distributed_run_stays_off(failures):
    """torch.distributed runs 2 processes but attach() was never called: one ERROR (rank 0), no
    evaluation, no file, instead of two processes each evaluating and writing as the main one."""
    (r0, r1), log = failures[0]["unconnected"], failures[1]
    assert r0["history"] == r1["history"] == [] and r0["due_next"] is r1["due_next"] is False
    assert r0["history_file"] is not None and r1["history_file"] is None and not r0["history_file_exists"]
    assert log.count("was not connected to them: call monitor.attach(accelerator)") == 1
