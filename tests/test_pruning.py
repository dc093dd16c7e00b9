"""Checkpoint pruning: verdict-based deletion of registered checkpoints, protection rules, the
ledger written first, crash safety, failures that do not block, one pruning monitor per ledger."""

import gc
import json
import os
import shutil
import subprocess
import sys

import pytest

from irs_callbacks import pruning
from irs_callbacks.checkpoints import CheckpointRegistry, write_checkpoint_state
from irs_callbacks.pruning import LEDGER_NAME, CheckpointPruner, Verdict


def save(root, registry, steps, *, name="checkpoint-{}", complete=True):
    """What the monitor does for each save_state: folder, registration, state file, step."""
    for s in steps:
        folder = root / name.format(s)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.safetensors").write_bytes(b"x" * 10)
        entry = registry.register(folder)
        write_checkpoint_state(folder, entry, {})
        if complete:
            registry.resolve(s)
    return registry


def verdicts(*triples):
    return {step: Verdict(verdict, score) for step, verdict, score in triples}


def opened(root, run_id="run", **kwargs):
    pruner = CheckpointPruner(**kwargs)
    pruner.open(root, run_id)
    return pruner


def ledger(root):
    return json.loads((root / LEDGER_NAME).read_text())["checkpoints"]


def existing(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith("checkpoint"))


@pytest.fixture
def registry():
    return CheckpointRegistry(run_id="run")


def test_rejected_mode_deletes_only_rejected_and_records_why(tmp_path, registry):
    save(tmp_path, registry, [100, 200, 300, 400, 500])
    p = opened(tmp_path)
    changes = p.update(registry, verdicts((100, "reject", 0.2), (200, "pass", 0.9), (300, "reject", 0.1),
                                          (400, "pass", 0.95), (500, "reject", 0.05)))
    assert sorted(os.path.basename(d) for d in changes["deleted"]) == ["checkpoint-100", "checkpoint-300"]
    # 500 is rejected but the newest of this run; 400 best; 200 passed
    assert existing(tmp_path) == ["checkpoint-200", "checkpoint-400", "checkpoint-500"]
    entries = ledger(tmp_path)
    assert entries["checkpoint-100"]["status"] == "deleted" and "rejected" in entries["checkpoint-100"]["reason"]
    assert entries["checkpoint-500"]["status"] == "kept"
    assert entries["checkpoint-500"]["reason"] == "newest checkpoint of this run"
    assert entries["checkpoint-400"]["reason"].startswith("best score")
    assert entries["checkpoint-200"]["reason"].startswith("passed")


def test_best_and_unevaluated_are_kept_and_top_k(tmp_path, registry):
    save(tmp_path / "a", registry, [1, 2, 3])
    opened(tmp_path / "a").update(registry, verdicts((1, "reject", 0.3), (2, "reject", 0.1), (3, "reject", 0.2)))
    assert existing(tmp_path / "a") == ["checkpoint-1", "checkpoint-3"]  # best (0.3) and newest

    other = save(tmp_path / "b", CheckpointRegistry("run"), [10, 20, 30])
    assert opened(tmp_path / "b").update(other, verdicts((30, "pass", 0.9)))["deleted"] == []
    assert "not evaluated" in ledger(tmp_path / "b")["checkpoint-10"]["reason"]

    steps, scores = [1, 2, 3, 4, 5, 6], [0.5, 0.9, 0.3, 0.8, 0.7, 0.1]
    top = save(tmp_path / "c", CheckpointRegistry("run"), steps)
    opened(tmp_path / "c", mode="top_k", top_k=2).update(top, verdicts(*[(s, "pass", c) for s, c in zip(steps, scores)]))
    assert existing(tmp_path / "c") == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]  # top 2 and the newest


def test_any_name_or_folder_is_judged_by_its_registered_step(tmp_path, registry):
    """Accelerate's automatic naming (checkpoints/checkpoint_<i>): names carry no step."""
    root = tmp_path / "project"
    save(root / "checkpoints", registry, [0, 1, 2], name="checkpoint_{}")
    for entry, step in zip(registry.entries, [50, 100, 150]):
        entry.step = step  # the training steps they were saved at
    p = CheckpointPruner()
    p.open(pruning.default_ledger_folder(registry.entries[0].path), "run")
    assert p.ledger_path == root / LEDGER_NAME  # beside, not inside, Accelerate's checkpoints/ folder
    with pytest.raises(AttributeError):
        p.ledger_path = tmp_path / "elsewhere.json"  # read-only: moving an open ledger would orphan it
    p.update(registry, verdicts((50, "reject", 0.1), (100, "pass", 0.9), (150, "pass", 0.8)))
    assert sorted(os.listdir(root / "checkpoints")) == ["checkpoint_1", "checkpoint_2"]
    assert ledger(root)["checkpoints/checkpoint_0"]["step"] == 50


def test_protected_symlinked_replaced_and_foreign_folders_survive(tmp_path, registry):
    out = tmp_path / "out"
    save(out, registry, [1, 2, 3, 4, 5])
    os.rename(out / "checkpoint-5", tmp_path / "moved")
    os.symlink(tmp_path / "moved", out / "checkpoint-5")  # a symlink where a checkpoint was
    write_checkpoint_state(out / "checkpoint-3", CheckpointRegistry("other").register(out / "checkpoint-3"), {})
    (out / "checkpoint-9").mkdir()  # never registered: not ours
    p = opened(out)
    p.update(registry, verdicts(*[(s, "reject", 0.1 * s if s != 1 else 0.99) for s in range(1, 6)]),
             protected={str(out / "checkpoint-2"): "training resumed from it"})
    assert existing(out) == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-5", "checkpoint-9"]
    entries = ledger(out)
    assert entries["checkpoint-1"]["reason"].startswith("best")
    assert entries["checkpoint-2"]["reason"] == "training resumed from it"
    assert entries["checkpoint-3"]["status"] == "replaced"
    assert entries["checkpoint-4"]["status"] == "deleted"  # 5 (a symlink now) is not the newest real checkpoint
    assert "symbolic link" in entries["checkpoint-5"]["reason"] and (tmp_path / "moved" / "model.safetensors").exists()
    assert "checkpoint-9" not in entries


def test_newest_is_this_runs_not_the_highest_step_on_disk(tmp_path):
    """After resuming from an earlier checkpoint, the old run's later checkpoints do not make the
    current run's fresh one look old."""
    old = save(tmp_path, CheckpointRegistry("old"), [10, 20, 30, 40])
    current = CheckpointRegistry("new")
    current.load_state_dict({"entries": [e.as_dict() for e in old.entries[:2]]})  # resumed from step 20
    save(tmp_path, current, [30])  # the new run overwrites checkpoint-30 with its own
    p = opened(tmp_path, run_id="new")
    p.update(current, verdicts((10, "reject", 0.1), (20, "pass", 0.5), (30, "reject", 0.2)),
             protected={str(tmp_path / "checkpoint-20"): "training resumed from it"})
    assert existing(tmp_path) == ["checkpoint-20", "checkpoint-30", "checkpoint-40"]
    assert ledger(tmp_path)["checkpoint-30"]["reason"] == "newest checkpoint of this run"
    assert "checkpoint-40" not in ledger(tmp_path)  # the abandoned timeline's folder is left alone


def test_incomplete_checkpoints_are_never_newest_or_deleted(tmp_path, registry):
    save(tmp_path, registry, [1, 2])
    save(tmp_path, registry, [3], complete=False)  # killed while save_state wrote it
    opened(tmp_path).update(registry, verdicts((1, "reject", 0.1), (2, "reject", 0.2)))
    entries = ledger(tmp_path)
    assert entries["checkpoint-3"]["status"] == "incomplete"
    assert entries["checkpoint-2"]["reason"] == "newest checkpoint of this run"
    assert existing(tmp_path) == ["checkpoint-2", "checkpoint-3"]


def test_folders_deleted_by_someone_else_are_marked_missing(tmp_path, registry):
    save(tmp_path, registry, [1, 2, 3])
    p = opened(tmp_path)
    shutil.rmtree(tmp_path / "checkpoint-2")  # e.g. the trainer's checkpoints_total_limit
    changes = p.update(registry, verdicts((1, "pass", 0.5), (2, "pass", 0.9), (3, "pass", 0.4)))
    assert [os.path.basename(x) for x in changes["missing"]] == ["checkpoint-2"]
    assert ledger(tmp_path)["checkpoint-2"]["status"] == "missing"
    assert p.update(registry, verdicts((1, "pass", 0.5), (2, "pass", 0.9)))["missing"] == []  # said once


def test_an_undeletable_folder_does_not_block_the_others(tmp_path, registry, monkeypatch):
    save(tmp_path, registry, [1, 2, 3, 4])
    real_rmtree = shutil.rmtree

    def rmtree(path, *a, **k):
        if str(path).endswith("checkpoint-1"):
            raise PermissionError("read-only file system (simulated)")
        real_rmtree(path, *a, **k)

    monkeypatch.setattr(pruning.shutil, "rmtree", rmtree)
    changes = opened(tmp_path).update(registry, verdicts((1, "reject", 0.1), (2, "reject", 0.2), (3, "pass", 0.9),
                                                         (4, "pass", 0.3)))
    assert existing(tmp_path) == ["checkpoint-1", "checkpoint-3", "checkpoint-4"]
    assert list(changes["failed"]) == [str(tmp_path / "checkpoint-1")]
    entries = ledger(tmp_path)
    assert entries["checkpoint-1"]["status"] == "delete_failed" and "read-only" in entries["checkpoint-1"]["reason"]
    assert entries["checkpoint-2"]["status"] == "deleted"


def test_dry_run_and_ledger_before_deletion(tmp_path, registry, monkeypatch):
    save(tmp_path, registry, [1, 2, 3])
    evaluations = verdicts((1, "reject", 0.1), (2, "reject", 0.3), (3, "pass", 0.2))
    dry = opened(tmp_path, dry_run=True)
    assert [os.path.basename(d) for d in dry.update(registry, evaluations)["deleted"]] == ["checkpoint-1"]
    assert existing(tmp_path) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert ledger(tmp_path)["checkpoint-1"]["status"] == "would_delete"
    dry.close()
    seen = []
    real_rmtree = shutil.rmtree

    def rmtree(path, *a, **k):
        seen.append(ledger(tmp_path)[os.path.basename(path)]["status"])
        real_rmtree(path, *a, **k)

    monkeypatch.setattr(pruning.shutil, "rmtree", rmtree)
    opened(tmp_path).update(registry, evaluations)
    assert seen == ["pending"] and ledger(tmp_path)["checkpoint-1"]["status"] == "deleted"


class Crash(Exception):
    pass


@pytest.mark.parametrize("delete_before_crash", [False, True])
def test_crash_between_ledger_and_deletion(tmp_path, registry, monkeypatch, delete_before_crash):
    save(tmp_path, registry, [1, 2, 3])
    evaluations = verdicts((1, "reject", 0.1), (2, "pass", 0.2), (3, "pass", 0.3))
    real_rmtree = shutil.rmtree

    def crash(path, *a, **k):
        if delete_before_crash:
            real_rmtree(path)
        raise Crash

    monkeypatch.setattr(pruning.shutil, "rmtree", crash)
    p = opened(tmp_path)
    with pytest.raises(Crash):
        p.update(registry, evaluations)
    assert ledger(tmp_path)["checkpoint-1"]["status"] == "pending"
    monkeypatch.undo()
    p.close()
    opened(tmp_path).update(registry, evaluations)  # restart: the pending entry is finished, not "missing"
    assert ledger(tmp_path)["checkpoint-1"]["status"] == "deleted" and not (tmp_path / "checkpoint-1").exists()


def test_one_pruning_monitor_per_ledger(tmp_path, registry):
    save(tmp_path, registry, [1])
    first = opened(tmp_path)
    with pytest.raises(ValueError, match="already used by another monitor"):
        opened(tmp_path)
    first.close()
    opened(tmp_path).close()  # free again
    abandoned = opened(tmp_path)  # e.g. a notebook cell that raised before monitor.close()
    del abandoned
    gc.collect()
    opened(tmp_path).close()  # a pruner that no longer exists holds nothing
    # a ledger owned by another live process on this host
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        data = json.loads((tmp_path / LEDGER_NAME).read_text())
        import socket

        data["owner"] = {"run_id": "x", "pid": holder.pid, "host": socket.gethostname()}
        (tmp_path / LEDGER_NAME).write_text(json.dumps(data))
        with pytest.raises(ValueError, match="another running process"):
            opened(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    opened(tmp_path)  # the holder is gone: its claim is stale


def test_bad_arguments_and_unreadable_ledger(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        CheckpointPruner("worst")
    with pytest.raises(ValueError, match="top_k"):
        CheckpointPruner("top_k", top_k=0)
    (tmp_path / LEDGER_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        opened(tmp_path)


def test_a_folder_holding_other_checkpoints_or_the_ledger_is_never_deleted(tmp_path, registry):
    """save_state(output_dir) registers output_dir itself: deleting it would take every checkpoint
    (and the ledger) inside it with it."""
    out = tmp_path / "out"
    save(out, registry, [1, 2])
    save(tmp_path, registry, [3], name="out")  # save_state(out) at step 3, rejected
    save(out, registry, [4])
    p = opened(out)  # the ledger inside out
    changes = p.update(registry, verdicts((1, "reject", 0.1), (2, "pass", 0.9), (3, "reject", 0.05),
                                          (4, "pass", 0.5)))
    assert [os.path.basename(d) for d in changes["deleted"]] == ["checkpoint-1"]
    assert existing(out) == ["checkpoint-2", "checkpoint-4"] and (out / LEDGER_NAME).is_file()
    record = ledger(out)["."]
    assert record["status"] == "kept" and "holds other checkpoints" in record["reason"]

    inner = tmp_path / "inner"  # the ledger elsewhere: the container alone is enough to keep it
    other = save(inner, CheckpointRegistry("run"), [1])
    save(tmp_path, other, [2], name="inner")
    save(tmp_path / "x", other, [3])
    q = opened(tmp_path / "ledger")
    q.update(other, verdicts((1, "pass", 0.9), (2, "reject", 0.1), (3, "pass", 0.5)))
    assert existing(inner) == ["checkpoint-1"]
    assert "holds other checkpoints" in json.loads((tmp_path / "ledger" / LEDGER_NAME).read_text())[
        "checkpoints"][str(inner)]["reason"]

    alone = tmp_path / "alone"  # holds only the ledger
    third = save(tmp_path, CheckpointRegistry("run"), [1], name="alone")
    save(tmp_path / "y", third, [2])
    opened(alone).update(third, verdicts((1, "reject", 0.1), (2, "pass", 0.9)))
    assert (alone / LEDGER_NAME).is_file() and (alone / "model.safetensors").is_file()
    assert "holds the pruning ledger" in ledger(alone)["."]["reason"]
