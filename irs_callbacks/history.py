"""The history of evaluations: one typed record per evaluation, one JSON object per line.

:class:`EvaluationRecord` is the single definition of what an evaluation writes: the JSON-lines
history file (``irs_history.jsonl``), the monitor's ``history`` list, the state saved into each
checkpoint and the README table all come from its fields. :data:`HISTORY_SCHEMA` (text) and
:func:`schema_markdown` (the README table) are generated from the field documentation, so they
cannot drift from the code.

Records read like dicts as well as objects (``record["step"] == record.step``), so that code
written against the JSON file works on them unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from irs_callbacks.files import expand_path, write_text_atomic

__all__ = ["EvaluationRecord", "HISTORY_SCHEMA", "HISTORY_NAME", "HistoryFile", "read_history", "schema_markdown",
           "json_value"]

#: file name of the history, in the monitor's log folder
HISTORY_NAME = "irs_history.jsonl"


def _doc(kind: str, text: str, default=dataclasses.MISSING):
    """A record field with its JSON type and documentation (read by the schema generators)."""
    return field(default=default, metadata={"type": kind, "doc": text})


@dataclass(frozen=True)
class EvaluationRecord(Mapping):
    """One evaluation as written to the history (fractions are of ``n_train``)."""

    step: int = _doc("int", "training step of the evaluation")
    verdict: str = _doc("str", '"pass" or "reject"')
    rule: str | None = _doc(
        "str", 'what decided (see irs_callbacks.stats.SequentialRejectionTest): "deterministic" (certain '
               'whatever the rest of the budget), "interim" (statistical early rejection), "early_pass" '
               '(statistical early pass), "final" (the whole budget was drawn)')
    stopped_early: bool = _doc("bool", "decided before the budget was drawn")
    budget: int = _doc("int", "samples the evaluation may draw")
    samples_used: int = _doc("int", "samples drawn (invalid ones included)")
    n_learned: int = _doc("int", "distinct training images retrieved (N_learned)")
    n_invalid: int = _doc("int", "samples with NaN/Inf values (counted as failures, never learned)")
    n_train: int = _doc("int", "training images in the reference bank (N_train)")
    k_min: int = _doc("int", "Eq. 10 threshold for the full budget at alpha_e (what irs threshold prints)")
    target_irs: float = _doc("float", "target diversity IRS_d, relative to real data when real_irs is known")
    target_s: float = _doc("float", "target in images: s_d = target_irs * real_irs * n_train")
    alpha_e: float = _doc("float", "error probability of a wrong rejection")
    irs_alpha: float = _doc("float", "N_learned / N_train")
    estimate: float | None = _doc("float", "IRS_inf from the valid samples, or null when nothing was learned")
    lower: float | None = _doc("float", "one-sided alpha_e lower bound of IRS_inf, or null")
    upper: float | None = _doc("float", "one-sided alpha_e upper bound of IRS_inf, or null")
    adjusted: float | None = _doc("float", "IRS_inf,a = IRS_inf / IRS_inf(real), both at one sampling rate "
                                           "(real_matching), or null without a real reference")
    adjusted_lower: float | None = _doc("float", "lower bound of the samples' IRS_inf at that rate / IRS_inf(real)")
    adjusted_upper: float | None = _doc("float", "upper bound of the samples' IRS_inf at that rate / IRS_inf(real)")
    real_irs: float | None = _doc("float", "IRS_inf of held-out real data that adjusted divides by, or null")
    score: float | None = _doc("float", "what checkpoints are ranked by: adjusted, else estimate")
    real_n_samples: int | None = _doc("int", "real images behind real_irs", default=None)
    real_matching: str | None = _doc("str", "how samples and real data were brought to one sampling rate for "
                                            "adjusted (which side was subsampled, the alpha, the set sizes)",
                                     default=None)
    k_final: int | None = _doc("int", "the threshold the last look uses: reject iff N_learned <= k_final after the "
                                      "whole budget (k_min, or lower by the error the interim looks may spend)",
                               default=None)
    seed: int = _doc("int", "sampling seed of the evaluation", default=0)
    timing: dict = _doc("dict", "seconds: sampling, features, retrieval, logging, monitor (everything but "
                                "sampling and features), total", default=None)
    curve: list = _doc("list", "[[samples drawn, N_learned], ...] after each batch", default=None)

    def __post_init__(self):
        # JSON has no tuples; keep the containers as plain lists / dicts whatever was passed in
        object.__setattr__(self, "timing", dict(self.timing or {}))
        object.__setattr__(self, "curve", [list(point) for point in (self.curve or [])])

    # --- read-only mapping view (the JSON object) -----------------------------------------
    def __getitem__(self, key: str):
        if key not in _FIELD_NAMES:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self):
        return iter(_FIELD_NAMES)

    def __len__(self) -> int:
        return len(_FIELD_NAMES)

    def as_dict(self) -> dict:
        """The JSON object of this record (non-finite floats become null)."""
        return {name: json_value(getattr(self, name)) for name in _FIELD_NAMES}

    @classmethod
    def from_dict(cls, data: Mapping) -> "EvaluationRecord":
        """A record from its JSON object; keys this version does not know are ignored, keys it
        added since are filled with their defaults."""
        known = {name: data[name] for name in _FIELD_NAMES if name in data}
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in known
                   and f.default is dataclasses.MISSING]
        if missing:
            raise ValueError(f"history record lacks {', '.join(missing)}: {dict(data)!r:.200}")
        return cls(**known)


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(EvaluationRecord))


def json_value(value):
    """``value`` with numpy / torch scalars as Python numbers and non-finite floats as None (JSON)."""
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, float) or hasattr(value, "__float__") and not isinstance(value, int):
        value = float(value)
        return value if math.isfinite(value) else None
    if hasattr(value, "__index__"):
        return int(value)
    return value


def _schema_rows():
    for f in dataclasses.fields(EvaluationRecord):
        yield f.name, f.metadata["type"], f.metadata["doc"]


def _schema_text() -> str:
    width = max(len(name) for name, _, _ in _schema_rows())
    indent = " " * (width + 11)
    lines = ["One JSON object per line, one line per evaluation, in order of training step:", ""]
    for name, kind, doc in _schema_rows():
        lines += textwrap.wrap(doc, 100, initial_indent=f"  {name:<{width}}  {kind:<5}  ", subsequent_indent=indent)
    return "\n".join(lines) + "\n"


def schema_markdown() -> str:
    """The history record as a markdown table (the README's copy is generated from this)."""
    rows = ["| field | type | meaning |", "|---|---|---|"]
    rows += [f"| `{name}` | {kind} | {doc} |" for name, kind, doc in _schema_rows()]
    return "\n".join(rows) + "\n"


#: the history file's schema, generated from :class:`EvaluationRecord`
HISTORY_SCHEMA = _schema_text()


def read_history(path) -> list[EvaluationRecord]:
    """The evaluations recorded in a history file. A missing file or a line that is not a record
    (e.g. cut off by a kill while it was written) raises a ValueError naming the file and line."""
    path = expand_path(path, "history file")
    if not path.is_file():
        raise ValueError(f"history file {str(path)!r} does not exist (the monitor writes irs_history.jsonl "
                         "in its log folder)")
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"history file {str(path)!r} is not a text file") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(EvaluationRecord.from_dict(json.loads(line)))
        except (ValueError, TypeError) as error:
            raise ValueError(f"history file {str(path)!r} line {number} is not an evaluation record "
                             f"(cut off while written?): {error}") from None
    return records


class HistoryFile:
    """The JSON-lines history of one run (schema: :data:`HISTORY_SCHEMA`)."""

    def __init__(self, path):
        self.path = expand_path(path, "history file")

    def append(self, record: EvaluationRecord) -> None:
        """Add one line (a crash can cut off only this line; :meth:`rewrite` repairs)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record.as_dict(), sort_keys=True) + "\n")

    def rewrite(self, records) -> None:
        """Replace the whole file by ``records`` atomically (after a resume)."""
        write_text_atomic(self.path, "".join(json.dumps(r.as_dict(), sort_keys=True) + "\n" for r in records))

    def archive_previous_run(self, suffix: str) -> Path | None:
        """Move an existing file aside to ``irs_history.<suffix>.jsonl`` (a fresh run into a folder
        that holds another run's history: nothing is overwritten or deleted). Returns the new path."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return None
        target = self.path.with_name(f"{self.path.stem}.{suffix}{self.path.suffix}")
        os.replace(self.path, target)
        return target


if __name__ == "__main__":  # python -m irs_callbacks.history: the README's table
    print(schema_markdown(), end="")
