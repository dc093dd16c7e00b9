"""Early stopping of training on IRS verdicts (the monitor's patience policy).

Like Lightning's ``EarlyStopping``: after ``patience`` consecutive rejected evaluations the
policy says stop; a passed evaluation resets the count (evaluations happen only after the
monitor's ``start_step``, its warm-up). The policy only counts: the monitor turns its answer into one decision shared by
every process, and Lightning's callback into ``trainer.should_stop``.
"""

from __future__ import annotations

from irs_callbacks.validation import check_int

__all__ = ["EarlyStopping"]


class EarlyStopping:
    """Stop after ``patience`` consecutive rejections (None: never stop).

    Attributes: ``consecutive_rejections`` (current run of rejections), ``stopped_at`` (the step of
    the evaluation that triggered the stop, or None).
    """

    def __init__(self, patience: int | None = None):
        self.patience = None if patience is None else check_int(patience, "patience", 1)
        self.consecutive_rejections = 0
        self.stopped_at: int | None = None

    @property
    def should_stop(self) -> bool:
        return self.stopped_at is not None

    def update(self, step: int, verdict: str) -> bool:
        """Count the evaluation at ``step`` with ``verdict`` ("pass"/"reject"); True when the count
        reaches ``patience`` (from then on :attr:`should_stop` stays True)."""
        self.consecutive_rejections = self.consecutive_rejections + 1 if verdict == "reject" else 0
        if self.patience is not None and self.consecutive_rejections >= self.patience and self.stopped_at is None:
            self.stopped_at = int(step)
        return self.should_stop

    def stop(self, step: int) -> None:
        """Record a stop decided elsewhere (another process reached its patience first)."""
        if self.stopped_at is None:
            self.stopped_at = int(step)

    def state_dict(self) -> dict:
        return {"consecutive_rejections": self.consecutive_rejections, "stopped_at": self.stopped_at}

    def load_state_dict(self, state: dict) -> None:
        self.consecutive_rejections = check_int(state.get("consecutive_rejections", 0), "consecutive_rejections")
        stopped = state.get("stopped_at")
        self.stopped_at = None if stopped is None else check_int(stopped, "stopped_at")

    def __repr__(self) -> str:
        return (f"EarlyStopping(patience={self.patience}, consecutive_rejections={self.consecutive_rejections}, "
                f"stopped_at={self.stopped_at})")
