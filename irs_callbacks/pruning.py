"""Checkpoint pruning by IRS verdict, with a ledger written before anything is deleted.

The pruner judges only checkpoints the monitor saw being saved (a
:class:`~irs_callbacks.checkpoints.CheckpointRegistry`, whatever their names), each by the
evaluation at its training step. Mode ``"rejected"`` deletes rejected checkpoints; mode
``"top_k"`` keeps the ``top_k`` best by score (the adjusted IRS, else IRS_inf) and deletes the
other evaluated ones. Never deleted:

- the newest complete checkpoint *this run* wrote (not the highest step on disk: after a resume
  from an earlier point, or a re-run into the same folder, the current run's checkpoints win);
- the best-scoring one, the one training resumed from, unevaluated ones;
- a checkpoint whose writing was interrupted (kept, marked ``incomplete``);
- a folder that now holds another run's or another monitor's checkpoint (its state file carries
  another id), symbolic links, anything that is not a real folder;
- a folder that contains another registered checkpoint or the ledger (``save_state(output_dir)``
  registers ``output_dir`` itself: deleting it would delete everything inside);
- a checkpoint of an earlier run (restored by a resume) outside the ledger's folder: after resuming
  from another experiment's checkpoint, that experiment's folders are not this run's to prune.

Every decision goes to a JSON ledger (default ``irs_pruning_ledger.json`` beside the first
checkpoint this run wrote, written atomically) *before* anything is deleted: a deletion is recorded as ``"pending"``, then
the folder is removed, then the entry becomes ``"deleted"``; a folder that cannot be removed
becomes ``"delete_failed"`` (with the error) and the others go on. A registered folder that
disappeared without the pruner (a trainer's ``checkpoints_total_limit``, Accelerate's
``total_limit``, a user) is marked ``"missing"``. ``dry_run`` only writes the ledger
(``"would_delete"``). One pruning monitor per ledger: a second one (in this or another live
process) is refused.

Ledger schema (``version`` 2)::

    {"version": 2, "mode": "rejected" | "top_k", "top_k": int | null, "dry_run": bool,
     "owner": {"run_id": str, "pid": int, "host": str},
     "checkpoints": {"<folder>": {"step": int | null, "run_id": str, "checkpoint_id": str,
        "verdict": "pass" | "reject" | null, "score": float | null,
        "status": "kept" | "pending" | "deleted" | "would_delete" | "delete_failed" | "missing"
                  | "incomplete" | "replaced",
        "reason": str, "time": ISO-8601 str}}}

``<folder>`` is the path relative to the ledger's folder when inside it, else absolute.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import weakref
from dataclasses import dataclass
from pathlib import Path

from irs_callbacks.checkpoints import CheckpointRegistry, read_checkpoint_state, timestamp
from irs_callbacks.files import expand_path, write_json_atomic
from irs_callbacks.validation import check_choice, check_int

__all__ = ["CheckpointPruner", "LEDGER_NAME", "PRUNE_MODES", "Verdict", "default_ledger_folder"]

LEDGER_NAME = "irs_pruning_ledger.json"
PRUNE_MODES = ("rejected", "top_k")
LEDGER_VERSION = 2
#: ledger path -> the pruner holding it in this process (weak: a pruner that no longer exists, e.g.
#: one whose monitor was never closed after an error in a notebook, holds nothing)
_HELD: "weakref.WeakValueDictionary[str, CheckpointPruner]" = weakref.WeakValueDictionary()


@dataclass(frozen=True)
class Verdict:
    """The evaluation a checkpoint is judged by."""

    verdict: str
    score: float | None


def default_ledger_folder(checkpoint_path) -> Path:
    """Where the ledger goes by default: beside the checkpoint folders (one level up for
    Accelerate's automatic ``<project>/checkpoints/checkpoint_<i>``, whose container Accelerate
    itself prunes and must hold folders only)."""
    parent = Path(checkpoint_path).resolve().parent
    return parent.parent if parent.name == "checkpoints" else parent


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CheckpointPruner:
    """Deletes rejected (or non-top-k) checkpoints, recording why first (module docstring).

    Args:
        mode: ``"rejected"`` or ``"top_k"``.
        top_k: checkpoints kept by ``"top_k"``.
        dry_run: only write the ledger.
        ledger: the ledger file (default: ``irs_pruning_ledger.json`` beside the first checkpoint this run
            writes).
    """

    def __init__(self, mode: str = "rejected", *, top_k: int = 3, dry_run: bool = False, ledger=None):
        self.mode = check_choice(mode, "mode", PRUNE_MODES)
        self.top_k = check_int(top_k, "top_k", 1)
        self.dry_run = bool(dry_run)
        self._ledger_path = None if ledger is None else expand_path(ledger, "ledger")
        self.checkpoints: dict[str, dict] = {}
        self.run_id: str | None = None

    def __repr__(self) -> str:
        return (f"CheckpointPruner(mode={self.mode!r}, top_k={self.top_k}, dry_run={self.dry_run}, "
                f"ledger={None if self.ledger_path is None else str(self.ledger_path)!r})")

    # -- the ledger ---------------------------------------------------------------------------
    @property
    def ledger_path(self) -> Path | None:
        """The ledger file: the one given, else set by :meth:`open` (None before); kept after
        :meth:`close`, for reading the ledger back."""
        return self._ledger_path

    @property
    def is_open(self) -> bool:
        return self.run_id is not None

    def open(self, default_folder, run_id: str) -> None:
        """Load (or start) the ledger and claim it for this run. Raises ValueError when it is
        unreadable or held by another live monitor (the message says what to do)."""
        if self.is_open:
            return
        if self.ledger_path is None:
            self._ledger_path = expand_path(default_folder, "ledger folder") / LEDGER_NAME
        path = self.ledger_path
        key = str(path.resolve())
        if _HELD.get(key, self) is not self:
            raise ValueError(f"pruning ledger {path} is already used by another monitor in this process; two "
                             "pruning monitors on one folder would delete each other's checkpoints: give the second "
                             "its own ledger and checkpoint folder, or prune with one monitor only")
        data = {}
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                raise ValueError(f"pruning ledger {path} is unreadable ({error}); move it away to start a new "
                                 "one") from None
            owner = data.get("owner") or {}
            if (owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int)
                    and owner["pid"] != os.getpid() and _pid_alive(owner["pid"])):
                raise ValueError(f"pruning ledger {path} belongs to a monitor in another running process (pid "
                                 f"{owner['pid']}); a second pruning monitor on the same checkpoints is refused")
        if data and data.get("version") != LEDGER_VERSION:
            raise ValueError(f"pruning ledger {path} has version {data.get('version')!r} (this library writes "
                             f"{LEDGER_VERSION}); move it away to start a new one")
        self.checkpoints = dict(data.get("checkpoints", {}))
        self.run_id = run_id
        _HELD[key] = self
        self._save()

    def close(self) -> None:
        """Release the ledger (the owner field is cleared; nothing else changes)."""
        if not self.is_open:
            return
        key = str(self.ledger_path.resolve())
        if _HELD.get(key) is self:
            del _HELD[key]
        self._save(owner=False)
        self.run_id = None

    def _save(self, owner: bool = True) -> None:
        write_json_atomic(self.ledger_path, {
            "version": LEDGER_VERSION, "mode": self.mode, "top_k": self.top_k if self.mode == "top_k" else None,
            "dry_run": self.dry_run,
            "owner": {"run_id": self.run_id, "pid": os.getpid(), "host": socket.gethostname()} if owner else None,
            "checkpoints": dict(sorted(self.checkpoints.items(), key=lambda kv: (kv[1].get("step") is None,
                                                                                  kv[1].get("step") or 0, kv[0]))),
        })

    def _key(self, path: str) -> str:
        """The ledger's name of a folder: relative to the ledger's folder when inside it (links are
        not followed: a symbolic link is named as itself)."""
        folder, path = os.path.abspath(self.ledger_path.parent), os.path.abspath(path)
        return os.path.relpath(path, folder) if os.path.commonpath([path, folder]) == folder else path

    # -- the rules ----------------------------------------------------------------------------
    def plan(self, registry: CheckpointRegistry, evaluations: dict, protected: dict | None = None) -> dict:
        """For each registered checkpoint: ``(status, reason)`` by the rules of the module
        docstring, without touching the disk. ``evaluations``: step -> :class:`Verdict`;
        ``protected``: absolute path -> reason."""
        protected = {os.path.realpath(p): r for p, r in (protected or {}).items()}
        newest = registry.newest()
        present, decisions = {}, {}
        for entry in registry.entries:
            if entry.run_id != registry.run_id and not _inside(entry.path, self.ledger_path.parent):
                decisions[entry.path] = ("kept", "an earlier run's checkpoint in another folder than the ledger's "
                                                 "(resumed from another experiment): not judged, never deleted")
                continue
            path = Path(entry.path)
            done = self.checkpoints.get(self._key(entry.path), {})
            if not path.exists() and not path.is_symlink():
                if done.get("status") in ("pending", "deleted") and done.get("checkpoint_id") == entry.checkpoint_id:
                    decisions[entry.path] = ("deleted", done.get("reason", "deleted"))  # by us (maybe before a crash)
                else:
                    decisions[entry.path] = ("missing", "deleted outside the monitor (e.g. a trainer's "
                                                        "checkpoints_total_limit or Accelerate's total_limit)")
                continue
            if path.is_symlink() or not path.is_dir():
                decisions[entry.path] = ("kept", "not a real folder (symbolic link or file): never deleted")
                continue
            try:
                state = read_checkpoint_state(path)
            except ValueError:
                state = None
            if state is None or state["checkpoint"].get("checkpoint_id") != entry.checkpoint_id:
                decisions[entry.path] = ("replaced", "the folder now holds a checkpoint this monitor did not save "
                                                     "(another run or monitor): left alone")
                continue
            if not entry.complete:
                decisions[entry.path] = ("incomplete", "writing was interrupted: never counted as the newest "
                                                       "checkpoint, never deleted")
                continue
            holds = [e.path for e in registry.entries if _inside(e.path, entry.path)]
            if holds:
                names = ", ".join(os.path.relpath(p, entry.path) for p in holds[:3])
                names += ", ..." if len(holds) > 3 else ""
                decisions[entry.path] = ("kept", f"holds other checkpoints ({names}): never deleted")
                continue
            if _inside(self.ledger_path, entry.path):
                decisions[entry.path] = ("kept", "holds the pruning ledger: never deleted")
                continue
            present[entry.path] = entry
        judged = {p: e for p, e in present.items() if e.step in evaluations}
        score = {p: evaluations[e.step].score for p, e in judged.items()}
        ranked = sorted(judged, key=lambda p: (-(score[p] if score[p] is not None else -float("inf")),
                                               -judged[p].step))
        best = ranked[0] if ranked else None
        for path, entry in present.items():
            verdict = evaluations.get(entry.step)
            if newest is not None and path == newest.path:
                decisions[path] = ("kept", "newest checkpoint of this run")
            elif os.path.realpath(path) in protected:
                decisions[path] = ("kept", protected[os.path.realpath(path)])
            elif verdict is None:
                decisions[path] = ("kept", f"not evaluated (no IRS evaluation at step {entry.step})")
            elif path == best:
                decisions[path] = ("kept", f"best score ({_fmt(verdict.score)})")
            elif self.mode == "rejected":
                delete = verdict.verdict == "reject"
                what = "rejected" if delete else "passed"
                decisions[path] = ("delete" if delete else "kept",
                                   f"{what} at step {entry.step} (score {_fmt(verdict.score)})")
            else:
                rank = ranked.index(path) + 1
                decisions[path] = ("kept" if rank <= self.top_k else "delete",
                                   f"rank {rank} of {len(ranked)} by score ({_fmt(verdict.score)}); top_k={self.top_k}")
        return decisions

    def update(self, registry: CheckpointRegistry, evaluations: dict, protected: dict | None = None) -> dict:
        """Apply the rules: write the ledger, then delete. Returns ``{"deleted": [...],
        "missing": [...], "failed": {path: error}}`` for what changed in this call (in dry-run,
        ``deleted`` lists what would be). Call on the main process only, after :meth:`open`."""
        if not self.is_open:
            raise RuntimeError("CheckpointPruner.update() before open()")
        changes = {"deleted": [], "missing": [], "failed": {}}
        to_delete = []
        for path, (status, reason) in self.plan(registry, evaluations, protected).items():
            entry = registry.find(path)
            verdict = evaluations.get(entry.step)
            if status == "delete":
                status = "would_delete" if self.dry_run else "pending"
                to_delete.append(path)
            key = self._key(path)
            old = self.checkpoints.get(key, {})
            if old.get("status") == status and old.get("reason") == reason:
                continue
            if status == "missing" and old.get("status") != "missing":
                changes["missing"].append(path)
            self.checkpoints[key] = {
                "step": entry.step, "run_id": entry.run_id, "checkpoint_id": entry.checkpoint_id,
                "verdict": None if verdict is None else verdict.verdict,
                "score": None if verdict is None else verdict.score,
                "status": status, "reason": reason, "time": timestamp()}
        self._save()  # the ledger says why *before* anything is deleted
        if self.dry_run:
            changes["deleted"] = to_delete
            return changes
        for path in to_delete:
            record = self.checkpoints[self._key(path)]
            try:
                if Path(path).is_symlink() or not Path(path).is_dir():
                    raise OSError("no longer a real folder")
                shutil.rmtree(path)
            except OSError as error:
                record.update(status="delete_failed", reason=f"{record['reason']}; could not delete: {error}",
                              time=timestamp())
                changes["failed"][path] = str(error)
            else:
                record.update(status="deleted", time=timestamp())
                changes["deleted"].append(path)
            self._save()
        return changes


def _inside(path, folder) -> bool:
    """Whether ``path`` lies strictly inside ``folder`` (links not followed)."""
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return path != folder and os.path.commonpath([path, folder]) == folder


def _fmt(score) -> str:
    return "n/a" if score is None else f"{score:.4f}"
