"""Which checkpoints a run saved, at which training step, and whether they were written whole.

The monitor learns of a checkpoint from Accelerate's public ``save_state`` pre-hook, whatever its
name or folder (diffusers' ``checkpoint-<step>``, Accelerate's automatic
``checkpoints/checkpoint_<i>``, any path). It writes its own state into the folder as
:data:`STATE_FILE` (JSON, no pickle) and registers a :class:`CheckpointEntry`. The entry is tied to
a training step, and counted as complete, at the next ``monitor.step(n)``: ``save_state`` has
returned by then, and the convention of the monitor is that ``step(n)`` is called once per
training step, after the optimizer step and after any checkpoint of that step was saved. A
process killed while ``save_state`` wrote leaves an entry (and a state file) marked incomplete:
such a checkpoint is never kept as "the newest", never offered by :func:`latest_checkpoint`.

The state file also carries a random ``id``: a folder whose state file holds another id was
overwritten by another run (or another monitor), and is not ours to judge or delete.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from irs_callbacks.files import expand_path, write_json_atomic

__all__ = ["STATE_FILE", "STATE_FORMAT", "CheckpointEntry", "CheckpointRegistry", "read_checkpoint_state",
           "latest_checkpoint", "new_id", "timestamp"]

#: the monitor's state file inside each checkpoint folder
STATE_FILE = "irs_monitor_state.json"
STATE_FORMAT = "irs-monitor-state"
STATE_VERSION = 2
_TRAILING_INT = re.compile(r"(\d+)$")


def new_id() -> str:
    """A short random identifier (runs, checkpoints)."""
    return secrets.token_hex(6)


def timestamp() -> str:
    """The local time now, ISO 8601 with its UTC offset (``2025-01-31T14:05:09+0100``)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@dataclass
class CheckpointEntry:
    """One checkpoint a run saved. ``path`` is absolute; ``step`` is None until the step it
    belongs to is known; ``complete`` turns True once ``save_state`` has returned."""

    path: str
    checkpoint_id: str
    run_id: str
    step: int | None = None
    complete: bool = False
    saved: str = ""

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CheckpointEntry":
        return cls(path=str(data["path"]), checkpoint_id=str(data["checkpoint_id"]), run_id=str(data["run_id"]),
                   step=None if data.get("step") is None else int(data["step"]), complete=bool(data.get("complete")),
                   saved=str(data.get("saved", "")))


class CheckpointRegistry:
    """The checkpoints of one training lineage (this run and the runs it resumed from).

    ``run_id`` identifies the current run; entries restored by :meth:`load_state_dict` keep the
    id of the run that wrote them.
    """

    def __init__(self, run_id: str | None = None):
        self.run_id = run_id or new_id()
        self.entries: list[CheckpointEntry] = []

    def register(self, path) -> CheckpointEntry:
        """A checkpoint is being saved into ``path`` (called from the save pre-hook). Saving into a
        folder registered before replaces that entry."""
        path = os.path.abspath(expand_path(path, "checkpoint folder"))
        self.entries = [e for e in self.entries if e.path != path]
        entry = CheckpointEntry(path=path, checkpoint_id=new_id(), run_id=self.run_id, saved=timestamp())
        self.entries.append(entry)
        return entry

    @property
    def of_this_run(self) -> list[CheckpointEntry]:
        """Entries this run wrote (not restored ones of the runs it resumed from), oldest first."""
        return [e for e in self.entries if e.run_id == self.run_id]

    @property
    def pending(self) -> list[CheckpointEntry]:
        """Entries of this run whose step is not known yet (saved since the last ``step()``)."""
        return [e for e in self.of_this_run if e.step is None]

    def resolve(self, step: int) -> list[CheckpointEntry]:
        """Tie the pending entries to ``step`` and mark them complete (``save_state`` returned)."""
        pending = self.pending
        for entry in pending:
            entry.step, entry.complete = int(step), True
        return pending

    def newest(self) -> CheckpointEntry | None:
        """The newest complete checkpoint this run wrote (never one of an earlier run)."""
        mine = [e for e in self.of_this_run if e.complete]
        return mine[-1] if mine else None

    def find(self, path) -> CheckpointEntry | None:
        path = os.path.abspath(expand_path(path, "checkpoint folder"))
        return next((e for e in self.entries if e.path == path), None)

    def state_dict(self) -> dict:
        return {"run_id": self.run_id, "entries": [e.as_dict() for e in self.entries]}

    def load_state_dict(self, state: dict) -> None:
        """Restore the entries of a resumed lineage; the current run keeps its own id."""
        self.entries = [CheckpointEntry.from_dict(e) for e in state.get("entries", [])]


def write_checkpoint_state(folder, entry: CheckpointEntry, monitor_state: dict) -> Path:
    """Write :data:`STATE_FILE` into ``folder``: the entry (id, step, complete) and the monitor's
    JSON-able state (history, stopping, registry)."""
    return write_json_atomic(Path(folder) / STATE_FILE, {
        "format": STATE_FORMAT, "version": STATE_VERSION, "checkpoint": entry.as_dict(), "monitor": monitor_state,
    }, indent=None)


def read_checkpoint_state(folder) -> dict | None:
    """The state file of ``folder`` as a dict, or None when there is none (a checkpoint saved
    without the monitor). Raises a ValueError naming the file when it is not a monitor state."""
    path = expand_path(folder, "checkpoint folder") / STATE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not readable monitor state ({error})") from None
    if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not an IRSMonitor state file (format {STATE_FORMAT!r} expected)")
    if data.get("version") != STATE_VERSION:
        raise ValueError(f"{path} has monitor state version {data.get('version')!r}; this library reads "
                         f"version {STATE_VERSION}")
    return data


def _looks_complete_without_monitor(folder: Path) -> bool:
    # Accelerate writes the RNG states after the models, optimizers and schedulers
    return any(folder.glob("random_states_*.pkl"))


def latest_checkpoint(folder) -> Path | None:
    """The newest checkpoint below ``folder`` that was written whole, for
    ``accelerator.load_state(...)``: ``checkpoint-<n>`` / ``checkpoint_<n>`` folders in ``folder``
    or in its ``checkpoints/`` (Accelerate's automatic naming). A folder with a monitor state
    counts when that state says complete (ordered by its step); one without counts when
    Accelerate finished writing it (ordered by the number in its name). None if there is none."""
    root = expand_path(folder, "folder")
    candidates = []
    for parent in (root, root / "checkpoints"):
        if not parent.is_dir():
            continue
        for child in parent.iterdir():
            match = _TRAILING_INT.search(child.name)
            if not child.is_dir() or child.is_symlink() or not child.name.startswith("checkpoint") or not match:
                continue
            try:
                state = read_checkpoint_state(child)
            except ValueError:
                continue
            if state is not None:
                entry = state["checkpoint"]
                if entry.get("complete") and entry.get("step") is not None:
                    candidates.append((int(entry["step"]), child))
            elif _looks_complete_without_monitor(child):
                candidates.append((int(match.group(1)), child))
    return max(candidates, key=lambda c: (c[0], str(c[1])))[1] if candidates else None
