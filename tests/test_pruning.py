"""Checkpoint pruning: verdict-based deletion, protected directories, ledger, crash safety."""

import json
import os
import shutil

import pytest

from irs_callbacks import pruning
from irs_callbacks.pruning import LEDGER_NAME, CheckpointPruner


def make_checkpoints(root, steps):
    for s in steps:
        d = root / f"checkpoint-{s}"
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"x" * 10)


def ledger(root):
    return json.loads((root / LEDGER_NAME).read_text())


def existing(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith("checkpoint"))


def test_rejected_mode_deletes_only_rejected_and_records_why(tmp_path):
    make_checkpoints(tmp_path, [100, 200, 300, 400, 500])
    p = CheckpointPruner(tmp_path)
    for step, verdict, score in [(100, "reject", 0.2), (200, "pass", 0.9), (300, "reject", 0.1),
                                 (400, "pass", 0.95), (500, "reject", 0.05)]:
        p.record(step, verdict, score)
    deleted = p.prune()
    assert sorted(deleted) == ["checkpoint-100", "checkpoint-300"]
    # 500 is rejected but newest; 400 best; 200 passed
    assert existing(tmp_path) == ["checkpoint-200", "checkpoint-400", "checkpoint-500"]
    entries = ledger(tmp_path)["checkpoints"]
    assert entries["checkpoint-100"]["status"] == "deleted" and "rejected" in entries["checkpoint-100"]["reason"]
    assert entries["checkpoint-500"]["status"] == "kept" and entries["checkpoint-500"]["reason"] == "newest checkpoint"
    assert entries["checkpoint-400"]["reason"].startswith("best score")
    assert entries["checkpoint-200"]["reason"].startswith("passed")


def test_best_is_kept_even_when_everything_is_rejected(tmp_path):
    make_checkpoints(tmp_path, [1, 2, 3])
    p = CheckpointPruner(tmp_path)
    for step, score in [(1, 0.3), (2, 0.1), (3, 0.2)]:
        p.record(step, "reject", score)
    p.prune()
    assert existing(tmp_path) == ["checkpoint-1", "checkpoint-3"]  # best (0.3) and newest


def test_unevaluated_checkpoints_are_kept(tmp_path):
    make_checkpoints(tmp_path, [10, 20, 30])
    p = CheckpointPruner(tmp_path)
    p.record(30, "pass", 0.9)
    assert p.prune() == []
    assert "not evaluated" in ledger(tmp_path)["checkpoints"]["checkpoint-10"]["reason"]


def test_top_k_mode(tmp_path):
    steps = [1, 2, 3, 4, 5, 6]
    scores = [0.5, 0.9, 0.3, 0.8, 0.7, 0.1]
    make_checkpoints(tmp_path, steps)
    p = CheckpointPruner(tmp_path, mode="top_k", top_k=2)
    for s, sc in zip(steps, scores):
        p.record(s, "pass", sc)
    p.prune()
    # top-2 by score: 2 (0.9), 4 (0.8); newest 6 protected
    assert existing(tmp_path) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


def test_protected_directories_survive(tmp_path):
    out = tmp_path / "out"
    make_checkpoints(out, [1, 2, 3, 4])
    outside = tmp_path / "elsewhere"
    make_checkpoints(outside, [5])
    nested = out / "sub"
    make_checkpoints(nested, [6])
    os.symlink(outside / "checkpoint-5", out / "checkpoint-7")  # symlink with a checkpoint name
    for name in ("checkpoint-abc", "checkpoint-8-old", "ckpt-9", "Checkpoint-10"):
        (out / name).mkdir()
    (out / "checkpoint-11").write_text("a file, not a directory")
    p = CheckpointPruner(out, resumed_from=out / "checkpoint-2")
    for s in [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]:
        p.record(s, "reject", 0.1 * s if s != 1 else 0.99)
    deleted = p.prune()
    assert deleted == ["checkpoint-3"]  # 1 best, 2 resumed-from, 4 newest real directory
    assert (outside / "checkpoint-5" / "model.safetensors").exists()
    assert (nested / "checkpoint-6").is_dir()
    assert os.path.islink(out / "checkpoint-7")
    for name in ("checkpoint-abc", "checkpoint-8-old", "ckpt-9", "Checkpoint-10", "checkpoint-11"):
        assert (out / name).exists()
    assert ledger(out)["checkpoints"]["checkpoint-2"]["reason"] == "training resumed from it"
    assert set(ledger(out)["checkpoints"]) == {"checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4"}


def test_dry_run_deletes_nothing(tmp_path):
    make_checkpoints(tmp_path, [1, 2, 3])
    p = CheckpointPruner(tmp_path, dry_run=True)
    for s, score in [(1, 0.1), (2, 0.3), (3, 0.2)]:
        p.record(s, "reject", score)
    assert p.prune() == ["checkpoint-1"]
    assert existing(tmp_path) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    data = ledger(tmp_path)
    assert data["dry_run"] is True and data["checkpoints"]["checkpoint-1"]["status"] == "would_delete"


def test_ledger_is_written_before_deletion(tmp_path, monkeypatch):
    make_checkpoints(tmp_path, [1, 2])
    seen = []

    def rmtree(path, *a, **k):
        seen.append(ledger(tmp_path)["checkpoints"][os.path.basename(path)]["status"])
        real_rmtree(path, *a, **k)

    real_rmtree = shutil.rmtree
    monkeypatch.setattr(pruning.shutil, "rmtree", rmtree)
    p = CheckpointPruner(tmp_path)
    p.record(1, "reject", 0.1)
    p.record(2, "pass", 0.9)
    p.prune()
    assert seen == ["pending"]
    assert ledger(tmp_path)["checkpoints"]["checkpoint-1"]["status"] == "deleted"


class Crash(Exception):
    pass


@pytest.mark.parametrize("resume_from_pending", [False, True])
def test_crash_between_ledger_and_deletion(tmp_path, monkeypatch, resume_from_pending):
    make_checkpoints(tmp_path, [1, 2, 3])

    def crash(path, *a, **k):
        raise Crash

    monkeypatch.setattr(pruning.shutil, "rmtree", crash)
    p = CheckpointPruner(tmp_path)
    for s, v in [(1, "reject"), (2, "pass"), (3, "pass")]:
        p.record(s, v, 0.1 * s)
    with pytest.raises(Crash):
        p.prune()
    assert ledger(tmp_path)["checkpoints"]["checkpoint-1"]["status"] == "pending"
    assert (tmp_path / "checkpoint-1").is_dir()
    monkeypatch.undo()
    # restart: the verdicts come back from the ledger; the pending entry is re-checked
    resumed = tmp_path / "checkpoint-1" if resume_from_pending else None
    p2 = CheckpointPruner(tmp_path, resumed_from=resumed)
    p2.prune()
    entry = ledger(tmp_path)["checkpoints"]["checkpoint-1"]
    if resume_from_pending:
        assert (tmp_path / "checkpoint-1").is_dir() and entry["status"] == "kept"
        assert entry["reason"] == "training resumed from it"
    else:
        assert not (tmp_path / "checkpoint-1").exists() and entry["status"] == "deleted"


def test_crash_after_deletion_before_ledger_update(tmp_path, monkeypatch):
    make_checkpoints(tmp_path, [1, 2])
    p = CheckpointPruner(tmp_path)
    p.record(1, "reject", 0.1)
    p.record(2, "pass", 0.9)
    real_rmtree = shutil.rmtree

    def delete_then_crash(path, *a, **k):
        real_rmtree(path)
        raise Crash

    monkeypatch.setattr(pruning.shutil, "rmtree", delete_then_crash)
    with pytest.raises(Crash):
        p.prune()
    monkeypatch.undo()
    assert ledger(tmp_path)["checkpoints"]["checkpoint-1"]["status"] == "pending"
    CheckpointPruner(tmp_path).prune()
    assert ledger(tmp_path)["checkpoints"]["checkpoint-1"]["status"] == "deleted"


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        CheckpointPruner(tmp_path, mode="worst")
    with pytest.raises(ValueError, match="top_k"):
        CheckpointPruner(tmp_path, mode="top_k", top_k=0)
    with pytest.raises(TypeError, match="output_dir"):
        CheckpointPruner(None)
    with pytest.raises(ValueError, match="verdict"):
        CheckpointPruner(tmp_path).record(1, "maybe", 0.5)
