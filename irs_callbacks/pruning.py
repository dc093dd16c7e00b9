"""Checkpoint pruning by IRS verdict, for the diffusers convention ``output_dir/checkpoint-<step>``.

Each checkpoint directory ``checkpoint-<int>`` directly inside ``output_dir`` gets the verdict of
the evaluation at its step (no evaluation at that step: it is kept, "not evaluated"). Mode
``"rejected"`` deletes rejected checkpoints; mode ``"top_k"`` keeps the ``top_k`` best by score
(the adjusted IRS, else IRS_inf) and deletes the other evaluated ones. Never deleted: the newest
checkpoint, the best one, the one training resumed from, anything that is not a real directory
named ``checkpoint-<int>`` directly inside ``output_dir`` (symlinks, foreign names, other places).

Every decision is written to a JSON ledger (``irs_pruning_ledger.json`` in ``output_dir``,
written atomically: temp file + ``os.replace``) *before* anything is deleted: a deletion is
recorded as ``"pending"``, then the directory is removed, then the entry becomes ``"deleted"``.
After a crash in between, the next :meth:`CheckpointPruner.prune` re-checks pending entries
against the rules (deletes, or keeps them with the reason). ``dry_run`` only writes the ledger
(status ``"would_delete"``).

Ledger schema (``version`` 1)::

    {"version": 1, "output_dir": str, "mode": "rejected" | "top_k", "top_k": int | null,
     "dry_run": bool,
     "evaluations": {"<step>": {"verdict": "pass" | "reject", "score": float | null}},
     "checkpoints": {"checkpoint-<step>": {"step": int, "verdict": str | null,
        "score": float | null, "status": "kept" | "pending" | "deleted" | "would_delete",
        "reason": str, "time": ISO-8601 str}}}
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from irs_callbacks.files import write_json_atomic

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
LEDGER_NAME = "irs_pruning_ledger.json"
PRUNE_MODES = ("rejected", "top_k")

__all__ = ["CheckpointPruner", "CHECKPOINT_PATTERN", "LEDGER_NAME"]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class CheckpointPruner:
    """Deletes rejected (or non-top-k) ``checkpoint-<step>`` directories, with a ledger.

    Args:
        output_dir: the folder holding ``checkpoint-<step>`` sub-directories.
        mode: ``"rejected"`` (delete rejected checkpoints) or ``"top_k"`` (keep the ``top_k``
            best by score among evaluated checkpoints).
        top_k: how many evaluated checkpoints mode ``"top_k"`` keeps (>= 1).
        dry_run: only write the ledger (status ``"would_delete"``), delete nothing.
        ledger: ledger file path (default ``output_dir / "irs_pruning_ledger.json"``).
        resumed_from: the checkpoint directory training resumed from (never deleted).
    """

    def __init__(self, output_dir, *, mode: str = "rejected", top_k: int = 3, dry_run: bool = False,
                 ledger=None, resumed_from=None):
        if output_dir is None or not isinstance(output_dir, (str, os.PathLike)):
            raise TypeError(f"output_dir must be a path (str or os.PathLike), got {type(output_dir).__name__}")
        if mode not in PRUNE_MODES:
            raise ValueError(f"mode must be one of {PRUNE_MODES}, got {mode!r}")
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
        self.output_dir = Path(output_dir)
        self.mode, self.top_k, self.dry_run = mode, top_k, bool(dry_run)
        self.ledger_path = Path(ledger) if ledger is not None else self.output_dir / LEDGER_NAME
        self.evaluations: dict[int, dict] = {}
        self.checkpoints: dict[str, dict] = {}
        self.protected: dict[str, str] = {}  # realpath -> reason
        if resumed_from is not None:
            self.protect(resumed_from, "training resumed from it")
        self._load_ledger()

    # -- inputs -------------------------------------------------------------------------------
    def record(self, step: int, verdict: str, score: float | None) -> None:
        """Record the verdict (``"pass"``/``"reject"``) and score of the evaluation at ``step``."""
        if verdict not in ("pass", "reject"):
            raise ValueError(f"verdict must be 'pass' or 'reject', got {verdict!r}")
        self.evaluations[int(step)] = {"verdict": verdict, "score": None if score is None else float(score)}

    def set_evaluations(self, records) -> None:
        """Replace all recorded evaluations by ``records`` (dicts with step, verdict, score)."""
        self.evaluations = {}
        for r in records:
            if r.get("verdict") in ("pass", "reject"):
                self.record(r["step"], r["verdict"], r.get("score"))

    def protect(self, path, reason: str) -> None:
        """Never delete ``path`` (e.g. the checkpoint training resumed from)."""
        self.protected[os.path.realpath(path)] = reason

    # -- ledger -------------------------------------------------------------------------------
    def _load_ledger(self) -> None:
        if not self.ledger_path.is_file():
            return
        try:
            data = json.loads(self.ledger_path.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"pruning ledger {self.ledger_path} is unreadable ({error}); move it away to start a new one") from error
        for step, entry in data.get("evaluations", {}).items():
            self.evaluations.setdefault(int(step), entry)
        self.checkpoints = dict(data.get("checkpoints", {}))

    def _save_ledger(self) -> None:
        write_json_atomic(self.ledger_path, {
            "version": 1, "output_dir": str(self.output_dir), "mode": self.mode,
            "top_k": self.top_k if self.mode == "top_k" else None, "dry_run": self.dry_run,
            "evaluations": {str(s): e for s, e in sorted(self.evaluations.items())},
            "checkpoints": dict(sorted(self.checkpoints.items(), key=lambda kv: kv[1]["step"])),
        })

    # -- rules --------------------------------------------------------------------------------
    def scan(self) -> dict[str, int]:
        """Checkpoint directories eligible for pruning: name -> step (real dirs only, no symlinks)."""
        found = {}
        if not self.output_dir.is_dir():
            return found
        root = os.path.realpath(self.output_dir)
        with os.scandir(self.output_dir) as entries:
            for entry in entries:
                match = CHECKPOINT_PATTERN.match(entry.name)
                if not match or entry.is_symlink() or not entry.is_dir(follow_symlinks=False):
                    continue
                if os.path.dirname(os.path.realpath(entry.path)) != root:  # paranoia: stays inside
                    continue
                found[entry.name] = int(match.group(1))
        return found

    def plan(self) -> dict[str, tuple[bool, str]]:
        """For each existing checkpoint: (delete?, reason). Does not touch the disk."""
        found = self.scan()
        if not found:
            return {}
        newest = max(found, key=found.get)
        judged = {n: s for n, s in found.items() if s in self.evaluations}
        score = {n: self.evaluations[s]["score"] for n, s in judged.items()}
        ranked = sorted(judged, key=lambda n: (-(score[n] if score[n] is not None else -float("inf")), -judged[n]))
        best = ranked[0] if ranked else None
        decisions = {}
        for name, step in found.items():
            realpath = os.path.realpath(self.output_dir / name)
            ev = self.evaluations.get(step)
            if name == newest:
                decisions[name] = (False, "newest checkpoint")
            elif realpath in self.protected:
                decisions[name] = (False, self.protected[realpath])
            elif ev is None:
                decisions[name] = (False, f"not evaluated (no IRS evaluation at step {step})")
            elif name == best:
                decisions[name] = (False, f"best score ({_fmt(ev['score'])})")
            elif self.mode == "rejected":
                if ev["verdict"] == "reject":
                    decisions[name] = (True, f"rejected at step {step} (score {_fmt(ev['score'])})")
                else:
                    decisions[name] = (False, f"passed at step {step} (score {_fmt(ev['score'])})")
            else:
                rank = ranked.index(name) + 1
                keep = rank <= self.top_k
                decisions[name] = (not keep, f"rank {rank} of {len(ranked)} by score ({_fmt(ev['score'])}); top_k={self.top_k}")
        return decisions

    def prune(self) -> list[str]:
        """Apply the rules: write the ledger, then delete. Returns the names deleted (or that
        would be, in dry-run). Call on the main process only."""
        found = self.scan()
        changed = False
        for name, entry in self.checkpoints.items():  # finished deletions from an earlier crash
            if entry["status"] == "pending" and name not in found and not os.path.lexists(self.output_dir / name):
                entry.update(status="deleted", time=_now())
                changed = True
        decisions = self.plan()
        to_delete = []
        for name, (delete, reason) in decisions.items():
            step = found[name]
            ev = self.evaluations.get(step) or {}
            status = ("would_delete" if self.dry_run else "pending") if delete else "kept"
            old = self.checkpoints.get(name, {})
            if old.get("status") != status or old.get("reason") != reason:
                self.checkpoints[name] = {"step": step, "verdict": ev.get("verdict"), "score": ev.get("score"),
                                          "status": status, "reason": reason, "time": _now()}
                changed = True
            if delete:
                to_delete.append(name)
        if changed:
            self._save_ledger()  # the ledger says why *before* anything is deleted
        if self.dry_run:
            return to_delete
        for name in to_delete:
            path = self.output_dir / name
            if path.is_symlink() or not path.is_dir():  # changed under our feet: leave it
                continue
            shutil.rmtree(path)
            self.checkpoints[name].update(status="deleted", time=_now())
            self._save_ledger()
        return to_delete


def _fmt(score) -> str:
    return "n/a" if score is None else f"{score:.4f}"
