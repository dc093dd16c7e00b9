"""IRSMonitor: diversity monitoring of a diffusion model while it trains (IRS paper, appendix 6).

Every ``every_n_steps`` training steps the monitor draws up to ``num_samples`` images from the
model, batch by batch; each sample's nearest training image is found in a reference bank of
training features, and the set of distinct training images retrieved ("learned") grows. After
each batch a :class:`~irs_callbacks.stats.SequentialRejectionTest` (k_min computed once, up front,
on the adjusted scale: the target is relative to held-out real data) may end the evaluation
early -- deterministically, when N_learned can no longer exceed k_min (or already does), or at a
statistical interim look. The result: verdict ("pass"/"reject"), IRS_alpha, IRS_inf with its
interval and the adjusted score IRS_inf / IRS_inf(real).

Three lines in an existing Accelerate loop::

    monitor = IRSMonitor(sampler=pipeline)          # IRSMonitor: construct
    monitor.attach(accelerator)                     # IRSMonitor: after accelerator.prepare(...)
    ...
        if monitor.step(global_step):               # IRSMonitor: once per step, True = stop
            break

The training data are found where the trainer has them (the first dataloader handed to
``accelerator.prepare``, or ``train_data=``), their features extracted once (progress bar) and
cached; ``ReferenceBank.build`` holds out a real split for the adjusted score when none is given.

Multi-process: one round of ``batch_size`` samples is split over the processes (sample ``i`` is
always seeded from ``(seed, i)``), the retrieved indices are gathered every round so that every
rank updates an identical learned set, and every rank takes the same decision (Accelerate's
``set_trigger``/``check_trigger``); only the main process logs, writes and deletes. The same seed
gives the same result with any number of processes.

Early stopping of training is optional: after ``start_step``, ``patience`` consecutive rejected
evaluations make :meth:`IRSMonitor.step` return True. Checkpoint pruning (``prune="rejected"`` or
``"top_k"``) judges ``output_dir/checkpoint-<step>`` directories by the evaluation at their step
(see :mod:`irs_callbacks.pruning`). Monitoring problems are logged and never stop training unless
``strict=True``. History file schema: :data:`irs_callbacks.tracking.HISTORY_SCHEMA`.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from irs_callbacks.pruning import CHECKPOINT_PATTERN, PRUNE_MODES, CheckpointPruner
from irs_callbacks.samplers import as_sampler, preserved_training_state, sample_seed
from irs_callbacks.stats import IRSEstimate, SequentialRejectionTest, adjusted_irs, irs_infinity
from irs_callbacks.tracking import (LAST_EVALUATION_NAME, BackgroundWork, HistoryFile, TensorBoardLogger,
                                    save_evaluation)

__all__ = ["IRSMonitor", "EvaluationResult", "EvaluationError", "default_budget"]

logger = logging.getLogger(__name__)

_PAD = -2  # gather padding (a rank with fewer samples in a round); -1 = invalid sample
HISTORY_NAME = "irs_history.jsonl"
_PRECOMPUTED_ROUNDS = 8  # real_at(n) is prepared at set-up for evaluations that end within this many rounds


class EvaluationError(RuntimeError):
    """An evaluation failed (on any process); raised identically on every process."""


def default_budget(n_train: int) -> int:
    """Default samples per evaluation: 10% of the training set (alpha = 0.1, where the paper's
    estimates become confident, appendix 6), at least 1,000 and at most 10,000, never more than
    n_train."""
    return int(min(n_train, max(1000, min(10_000, math.ceil(0.1 * n_train)))))


@dataclass
class EvaluationResult:
    """One evaluation. Fractions are of ``n_train``; ``estimate`` is IRS_inf with its interval
    (``None`` if no valid sample was drawn); ``adjusted`` = IRS_inf / IRS_inf(real) (``None``
    without a real reference)."""

    step: int | None
    verdict: str
    rule: str | None
    samples_used: int
    budget: int
    n_learned: int
    n_invalid: int
    n_train: int
    k_min: int
    target_irs: float
    alpha_e: float
    estimate: IRSEstimate | None
    adjusted: float | None
    real: IRSEstimate | None
    seed: int
    target_s: float
    curve: list = field(default_factory=list)
    timing: dict = field(default_factory=dict)
    hits: torch.Tensor | None = field(default=None, repr=False)

    @property
    def irs_alpha(self) -> float:
        return self.n_learned / self.n_train

    @property
    def stopped_early(self) -> bool:
        return self.samples_used < self.budget

    @property
    def score(self) -> float | None:
        """What checkpoints are ranked by: the adjusted IRS, else IRS_inf."""
        if self.adjusted is not None:
            return self.adjusted
        return None if self.estimate is None else self.estimate.estimate

    def as_record(self) -> dict:
        """The history-file object (schema: ``irs_callbacks.tracking.HISTORY_SCHEMA``)."""
        est, real = self.estimate, self.real
        scale = real.estimate if (real is not None and est is not None and real.estimate > 0) else None
        return {
            "step": self.step, "verdict": self.verdict, "rule": self.rule, "stopped_early": self.stopped_early,
            "budget": self.budget, "samples_used": self.samples_used, "n_learned": self.n_learned,
            "n_invalid": self.n_invalid, "n_train": self.n_train, "k_min": self.k_min,
            "target_irs": self.target_irs, "target_s": self.target_s, "alpha_e": self.alpha_e,
            "irs_alpha": self.irs_alpha,
            "estimate": None if est is None else est.estimate,
            "lower": None if est is None else est.lower,
            "upper": None if est is None else est.upper,
            "adjusted": self.adjusted,
            "adjusted_lower": None if scale is None else est.lower / scale,
            "adjusted_upper": None if scale is None else est.upper / scale,
            "real_irs": None if real is None else real.estimate,
            "seed": self.seed, "timing": dict(self.timing), "curve": [list(p) for p in self.curve],
            "score": self.score,
        }


# ------------------------------------------------------------------------------------ processes


class _SingleProcess:
    rank, world, is_main = 0, 1, True

    def __init__(self, device=None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    def gather(self, tensor):
        return tensor

    def any(self, flag: bool) -> bool:
        return bool(flag)


class _AccelerateProcesses:
    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.is_main = accelerator.is_main_process
        self.device = accelerator.device

    def gather(self, tensor):
        return self.accelerator.gather(tensor.to(self.device))

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is set on any rank (Accelerate's set_trigger /
        check_trigger, called collectively); a trigger the user set is left pending."""
        acc = self.accelerator
        if not hasattr(acc, "flag_tensor"):  # very old/new Accelerate: plain reduce
            return bool(acc.reduce(torch.tensor(int(flag), device=self.device), "sum").item() > 0)
        saved, acc.flag_tensor = acc.flag_tensor, None
        try:
            if flag:
                acc.set_trigger()
            return bool(acc.check_trigger())
        finally:
            acc.flag_tensor = saved


# ------------------------------------------------------------------------------------ monitor


class IRSMonitor:
    """Diversity monitor for diffusion training; every argument is optional.

    Args:
        sampler: what to evaluate -- a diffusers pipeline, ``diadm.DiADMPipeline``, a callable
            ``(batch_size, generator) -> images`` or a :class:`~irs_callbacks.samplers.Sampler`
            (may also be passed to :meth:`step` / :meth:`evaluate`).
        reference_bank: a prebuilt :class:`~irs_callbacks.reference.ReferenceBank` or the path of
            a saved one. Default: built from ``train_data`` (or the trainer's dataloader).
        train_data: training images (Dataset, DataLoader, tensor, array, image folder, .npy/.npz).
        heldout_data: held-out real images for the adjusted score (default: the paper's split of
            the training data, done by ``ReferenceBank.build``).
        train_value_range: value range of ``train_data`` float images ((0, 1) or (-1, 1));
            default: guessed from a few items (logged).
        extractor: feature extractor name, module or callable (default ``"random-inception"``);
            ``extractor_options``: e.g. ``{"input_size": 75}``.
        distance: ``"euclidean"`` (paper default) or ``"cosine"``.
        every_n_steps: evaluate when ``step % every_n_steps == 0`` (default 500, the diffusers
            scripts' ``checkpointing_steps``, so checkpoints and verdicts line up).
        start_step: warm-up: no evaluation (and no early stopping) before this step.
        num_samples: budget of samples per evaluation (default :func:`default_budget`).
        batch_size: samples per round, over all processes together.
        target_irs: target diversity IRS_d, relative to real data (default 0.8).
        alpha_e: error probability of a wrong rejection (default 0.05).
        interim_alpha, look_every: the sequential test's interim looks (see
            :class:`~irs_callbacks.stats.SequentialRejectionTest`; ``interim_alpha=0`` disables).
        adjust: put the target on the adjusted scale (needs the real reference; default True).
        patience: stop training after this many consecutive rejections (None = never stop).
        seed: sampling seed; ``fixed_noise=True`` (default) uses the same noise at every
            evaluation so curves compare like with like, False draws new noise per step.
        num_inference_steps, ema: for diffusers pipelines (see ``PipelineSampler``).
        log_dir: where the history, the monitor's own TensorBoard events (when the accelerator
            has no tensorboard tracker) and the feature cache go. Default: the accelerator's
            logging/project dir, else ``./irs_logs``.
        history_file: JSON-lines history path (default ``log_dir/irs_history.jsonl``).
        tensorboard: log to TensorBoard; log_images: sample / over-retrieved grids and the curve;
            num_log_images: samples in the grid (default 36).
        output_dir: folder of ``checkpoint-<step>`` dirs (default: the accelerator's project dir).
        prune: None (keep all), ``"rejected"`` or ``"top_k"``; top_k: kept by ``"top_k"``;
            dry_run: only write the pruning ledger.
        strict: raise on monitoring problems (and on NaN/Inf samples) instead of logging them.
        device: where retrieval runs (default: the accelerator's device, else CUDA if available).
        cache_dir: feature cache of the reference bank (default ``log_dir/reference_cache``).
        progress: progress bar while extracting training features.
    """

    def __init__(self, sampler=None, *, reference_bank=None, train_data=None, heldout_data=None,
                 train_value_range=None, extractor="random-inception", extractor_options=None,
                 distance: str = "euclidean", every_n_steps: int = 500, start_step: int = 0,
                 num_samples: int | None = None, batch_size: int = 64, target_irs: float = 0.8,
                 alpha_e: float = 0.05, interim_alpha: float | None = None, look_every: int | None = None,
                 adjust: bool = True, patience: int | None = None, seed: int = 0, fixed_noise: bool = True,
                 num_inference_steps: int | None = None, ema=None, log_dir=None, history_file=None,
                 tensorboard: bool = True, log_images: bool = True, num_log_images: int = 36,
                 output_dir=None, prune: str | None = None, top_k: int = 3, dry_run: bool = False,
                 strict: bool = False, device=None, cache_dir=None, progress: bool = True):
        _int(every_n_steps, "every_n_steps", 1)
        _int(start_step, "start_step", 0)
        _int(batch_size, "batch_size", 1)
        _int(num_log_images, "num_log_images", 0)
        _int(seed, "seed", 0)
        if num_samples is not None:
            _int(num_samples, "num_samples", 1)
        if patience is not None:
            _int(patience, "patience", 1)
        if not (isinstance(target_irs, (int, float)) and 0 < target_irs <= 1):
            raise ValueError(f"target_irs must be a fraction in (0, 1], got {target_irs!r}")
        if not (isinstance(alpha_e, float) and 0 < alpha_e < 1):
            raise ValueError(f"alpha_e must be a probability in (0, 1), got {alpha_e!r}")
        if prune is not None and prune not in PRUNE_MODES:
            raise ValueError(f"prune must be None or one of {PRUNE_MODES}, got {prune!r}")
        if distance not in ("euclidean", "cosine"):
            raise ValueError(f"distance must be 'euclidean' or 'cosine', got {distance!r}")
        self.sampler = sampler
        self.reference_bank, self.train_data, self.heldout_data = reference_bank, train_data, heldout_data
        self.train_value_range = train_value_range
        self.extractor_spec, self.extractor_options = extractor, dict(extractor_options or {})
        self.distance = distance
        self.every_n_steps, self.start_step = every_n_steps, start_step
        self.num_samples, self.batch_size = num_samples, batch_size
        self.target_irs, self.alpha_e = float(target_irs), alpha_e
        self.interim_alpha, self.look_every, self.adjust = interim_alpha, look_every, adjust
        self.patience, self.seed, self.fixed_noise = patience, seed, fixed_noise
        self.num_inference_steps, self.ema = num_inference_steps, ema
        self.log_dir, self.history_path = log_dir, history_file
        self.tensorboard, self.log_images, self.num_log_images = tensorboard, log_images, num_log_images
        self.output_dir, self.prune_mode, self.top_k, self.dry_run = output_dir, prune, top_k, dry_run
        self.strict, self.device, self.cache_dir, self.progress = strict, device, cache_dir, progress

        # state (saved by state_dict)
        self.history: list[dict] = []
        self.consecutive_rejections = 0
        self.should_stop = False
        # runtime
        self.accelerator = None
        self._procs = None
        self._bank = None          # ReferenceBank
        self._feature_bank = None  # FeatureBank on the device
        self._extractor = None
        self._train_images = None  # callable: bank rows -> images in [0, 1], or None
        self._tracker = None
        self._background = BackgroundWork()  # TensorBoard images etc. off the training loop
        self._history_file = None
        self._pruner = None
        self._resumed_from = None
        self._prune_pending = False
        self._rewrite_history = False
        self._purge_step = None
        self._reregister = False
        self._test_cache = None

    # -------------------------------------------------------------------------------- attach
    def attach(self, accelerator=None, *, train_data=None, reference_bank=None, sampler=None,
               output_dir=None, resumed_from=None) -> "IRSMonitor":
        """Connect to an ``accelerate.Accelerator`` (call after ``accelerator.prepare`` and before
        ``accelerator.load_state``): registers the monitor for checkpointing, watches
        ``save_state``/``load_state`` (checkpoints to judge, the one resumed from), takes the
        training data from the prepared dataloader unless given, and logs through the
        accelerator's tensorboard tracker when it has one. Returns the monitor."""
        if train_data is not None:
            self.train_data = train_data
        if reference_bank is not None:
            self.reference_bank = reference_bank
        if sampler is not None:
            self.sampler = sampler
        if output_dir is not None:
            self.output_dir = output_dir
        if resumed_from is not None:
            self._resumed_from = os.fspath(resumed_from)
        if accelerator is None:
            return self
        self.accelerator = accelerator
        self._procs = _AccelerateProcesses(accelerator)
        if self.reference_bank is None and self.train_data is None:
            loaders = list(getattr(accelerator, "_dataloaders", []) or [])
            if loaders:
                self.train_data = getattr(loaders[0], "dataset", loaders[0])
                logger.info("IRSMonitor: reference data = the dataset of the first prepared dataloader (%s, %s items)",
                            type(self.train_data).__name__, _len(self.train_data))
        if self.output_dir is None and self.prune_mode is not None:
            self.output_dir = getattr(accelerator, "project_dir", None)
        accelerator.register_for_checkpointing(self)
        accelerator.register_save_state_pre_hook(self._on_save_state)
        accelerator.register_load_state_pre_hook(self._on_load_state)
        return self

    def _on_save_state(self, models, weights, output_dir):
        # The pre-hook runs before the monitor's own state is saved: if the checkpoint is
        # "checkpoint-<step>" and an evaluation is due at that step, run it now, so the saved
        # state (and the checkpoint's verdict) include it whatever the order of the user's lines.
        match = CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(os.fspath(output_dir))))
        if match and self.sampler is not None and not self.should_stop and self._due(int(match.group(1))):
            result = self._guarded_evaluate(int(match.group(1)), None)
            if result is not None:
                self._update_stopping(result)
        self._prune_pending = True

    def _on_load_state(self, models, input_dir):
        self._resumed_from = os.fspath(input_dir)
        if self._pruner is not None:
            self._pruner.protect(self._resumed_from, "training resumed from it")
        # A checkpoint saved before the monitor was added has one custom state fewer: Accelerate
        # would refuse it. Step aside for this load (re-registered at the next step()).
        acc = self.accelerator
        objects = getattr(acc, "_custom_objects", None)
        if objects and objects[-1] is self and os.path.isdir(input_dir):
            saved = [f for f in os.listdir(input_dir) if re.fullmatch(r"custom_checkpoint_\d+\.pkl", f)]
            if len(saved) == len(objects) - 1:
                objects.pop()
                self._reregister = True
                logger.warning("IRSMonitor: %s holds no monitor state (saved before the monitor was added); "
                               "starting with an empty history", input_dir)

    # -------------------------------------------------------------------------------- per step
    def _due(self, step: int) -> bool:
        return (step > 0 and step >= self.start_step and step % self.every_n_steps == 0
                and not any(r["step"] == step for r in self.history))

    def step(self, step: int, sampler=None) -> bool:
        """Call once per training step (the same ``global_step`` used in checkpoint names).
        Evaluates when due; returns True when training should stop (``patience`` consecutive
        rejections after ``start_step``). Never raises on monitoring problems unless strict."""
        step = _int(step, "step", 0)
        if self._reregister and self.accelerator is not None:
            self.accelerator.register_for_checkpointing(self)
            self._reregister = False
        if sampler is not None:
            self.sampler = sampler
        if not self.should_stop and self._due(step):
            result = self._guarded_evaluate(step, None)
            if result is not None:
                self._update_stopping(result)
        if self._prune_pending:
            self._prune()
        return self.should_stop

    def _guarded_evaluate(self, step, sampler):
        try:
            return self.evaluate(sampler, step=step)
        except Exception as error:
            if self.strict:
                raise
            logger.warning("IRSMonitor: evaluation at step %s failed and was skipped (training goes on; "
                           "strict=True raises instead): %s\n%s", step, error, traceback.format_exc())
            return None

    def _update_stopping(self, result: "EvaluationResult") -> None:
        if result.verdict == "reject":
            self.consecutive_rejections += 1
        else:
            self.consecutive_rejections = 0
        local = self.patience is not None and self.consecutive_rejections >= self.patience
        stop = self._processes().any(local)
        if stop and not self.should_stop:
            self.should_stop = True
            if self._processes().is_main:
                logger.warning("IRSMonitor: %d consecutive rejected evaluations (patience=%s) at step %s: stop training",
                               self.consecutive_rejections, self.patience, result.step)

    # -------------------------------------------------------------------------------- setup
    def _processes(self):
        if self._procs is None:
            self._procs = _SingleProcess(self.device if self.device is not None else _default_device())
        return self._procs

    def _device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return self._processes().device

    def _root(self) -> Path:
        if self.log_dir is not None:
            return Path(self.log_dir)
        acc = self.accelerator
        for attr in ("logging_dir", "project_dir"):
            value = getattr(acc, attr, None) if acc is not None else None
            if value:
                return Path(value)
        return Path("irs_logs")

    def _ensure_reference(self):
        if self._feature_bank is not None:
            return self._bank
        from irs_callbacks.features import get_extractor
        from irs_callbacks.reference import ReferenceBank

        device = self._device()
        t0 = time.perf_counter()
        extractor = get_extractor(self.extractor_spec, device=device, **self.extractor_options)
        bank = self.reference_bank
        if isinstance(bank, (str, os.PathLike)):
            bank = ReferenceBank.load(bank, expect={"extractor": extractor.identity, "distance": self.distance})
        elif bank is None:
            if self.train_data is None:
                raise ValueError("IRSMonitor has no training data to compare against: pass reference_bank= or "
                                 "train_data=, or attach(accelerator) after accelerator.prepare(train_dataloader)")
            value_range = self.train_value_range or _guess_value_range(self.train_data)
            cache = self.cache_dir if self.cache_dir is not None else self._root() / "reference_cache"
            build = lambda: ReferenceBank.build(  # noqa: E731
                self.train_data, extractor=extractor, reference=self.heldout_data, distance=self.distance,
                batch_size=max(self.batch_size, 64), device=device, cache_dir=cache, seed=self.seed,
                value_range=value_range, progress=self.progress and self._processes().is_main)
            if self.accelerator is not None and self._processes().world > 1:
                with self.accelerator.main_process_first():  # main extracts and caches, others load
                    bank = build()
            else:
                bank = build()
            self._train_images = _image_lookup(self.train_data, bank, value_range)
        self._bank, self._extractor = bank, extractor
        self._feature_bank = bank.bank(device=device)
        if self.adjust and bank.real is None:
            logger.warning("IRSMonitor: the reference bank has no real-data measurement (bank.real is None): "
                           "the target is on the absolute scale and no adjusted score is reported")
        test = self._rejection_test(bank)  # one-time set-up, outside the evaluations' timing:
        if self.adjust:  # the real reference at the first rounds' sample counts (real_at caches them)
            for n in range(self.batch_size, min(test.budget, _PRECOMPUTED_ROUNDS * self.batch_size) + 1, self.batch_size):
                bank.real_at(n)
        self._feature_bank.search(self._feature_bank.features[: self.batch_size])  # first-call costs (BLAS, cuBLAS)
        self._ensure_outputs()  # writers, imports, the static part of the curve figure
        if self._tracker is not None:
            self._tracker.warm_up({"n_train": bank.n_train, "budget": test.budget, "k_min": int(test.k_min),
                                   "target_s": float(test.s_d)})
        logger.info("IRSMonitor: reference bank ready (N_train=%d, dim=%d, real IRS_inf=%s) in %.1f s",
                    bank.n_train, bank.dim, bank.real, time.perf_counter() - t0)
        return bank

    def _ensure_outputs(self):
        """Tracker, history file and pruner (main process only)."""
        if not self._processes().is_main:
            return
        if self._history_file is None:
            path = self.history_path if self.history_path is not None else self._root() / HISTORY_NAME
            self._history_file = HistoryFile(path)
        if self._rewrite_history:
            self._history_file.rewrite(self.history)
            self._rewrite_history = False
        if self._tracker is None:
            self._tracker = self._make_tracker()
        if self.prune_mode is not None and self._pruner is None:
            if self.output_dir is None:
                raise ValueError("prune=... needs output_dir= (the folder holding checkpoint-<step> directories)")
            self._pruner = CheckpointPruner(self.output_dir, mode=self.prune_mode, top_k=self.top_k,
                                            dry_run=self.dry_run, resumed_from=self._resumed_from)
            self._pruner.set_evaluations(self.history)

    def _make_tracker(self):
        acc, sinks, writer = self.accelerator, [], None
        kwargs = dict(images=self.log_images, figure=self.log_images)
        for tracker in list(getattr(acc, "trackers", []) or []):
            if tracker.name == "tensorboard":
                writer = acc.get_tracker("tensorboard", unwrap=True) if self.tensorboard else None
            else:
                sinks.append(lambda values, step, t=tracker: t.log(values, step=step))
        if writer is None and self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(log_dir=str(self._root() / "irs"), purge_step=self._purge_step)
        return TensorBoardLogger(writer, scalar_sinks=sinks, **kwargs)

    # -------------------------------------------------------------------------------- evaluate
    def evaluate(self, sampler=None, step: int | None = None) -> EvaluationResult:
        """Run one evaluation now. With ``step`` it is recorded (history, TensorBoard, checkpoint
        verdicts); without, it is only returned. Raises on problems (``step()`` catches them)."""
        sampler = as_sampler(sampler if sampler is not None else self._need_sampler(),
                             num_inference_steps=self.num_inference_steps, ema=self.ema)
        bank = self._ensure_reference()
        procs, device = self._processes(), self._device()
        t_start = time.perf_counter()
        n_train = bank.n_train
        test = self._rejection_test(bank)
        budget = test.budget
        from irs_callbacks.retrieval import LearnedSet

        learned = LearnedSet(n_train, device=device)
        seed = self.seed if (self.fixed_noise or step is None) else sample_seed(self.seed, step) & 0x7FFFFFFF
        t_sampling = t_features = t_retrieval = 0.0
        curve, samples_kept, decision = [], None, None
        sync = device.type == "cuda"
        with preserved_training_state(sampler.modules()), sampler.context():
            for start in range(0, budget, self.batch_size):
                stop = min(start + self.batch_size, budget)
                chunk = -(-(stop - start) // procs.world)
                mine = list(range(start + procs.rank * chunk, min(start + (procs.rank + 1) * chunk, stop)))
                local = torch.full((chunk + 1,), _PAD, dtype=torch.long, device=device)
                error = None
                try:
                    if mine:
                        t0 = time.perf_counter()
                        images = sampler.sample(mine, seed)
                        if sync:
                            torch.cuda.synchronize(device)
                        t1 = time.perf_counter()
                        images = images.to(device)
                        invalid = ~torch.isfinite(images.float()).flatten(1).all(dim=1)
                        features = self._extractor(images, value_range=sampler.value_range)
                        if sync:
                            torch.cuda.synchronize(device)
                        t2 = time.perf_counter()
                        t_sampling, t_features = t_sampling + t1 - t0, t_features + t2 - t1
                        t_retrieval -= time.perf_counter()
                        index, _ = self._feature_bank.search(features)
                        index = index.to(device=device, dtype=torch.long)
                        index[invalid.to(index.device)] = -1
                        local[: len(mine)] = index
                        t_retrieval += time.perf_counter()
                        if samples_kept is None and procs.is_main and self.log_images and self.num_log_images:
                            samples_kept = _to_unit(images[: self.num_log_images], sampler.value_range).cpu()
                except Exception as exc:  # reported on every rank through the gather below
                    error = exc
                    local[-1] = 1
                t0 = time.perf_counter()
                gathered = procs.gather(local).view(procs.world, chunk + 1)
                if bool((gathered[:, -1] != _PAD).any()):
                    failed = [r for r in range(procs.world) if int(gathered[r, -1]) != _PAD]
                    message = f"sampling/feature extraction failed on process(es) {failed} at step {step}"
                    if error is not None:
                        raise EvaluationError(f"{message}: {error!r}") from error
                    raise EvaluationError(message)
                indices = gathered[:, :-1].reshape(-1)
                learned.update(indices[indices != _PAD])
                curve.append((int(learned.n_samples), int(learned.n_learned)))
                decision = test.decide(learned.n_samples, learned.n_learned)
                t_retrieval += time.perf_counter() - t0
                if decision.verdict != "continue":
                    break

        n_drawn, n_learned, n_invalid = int(learned.n_samples), int(learned.n_learned), int(learned.n_invalid)
        n_valid = n_drawn - n_invalid
        estimate = irs_infinity(n_learned, n_valid, n_train, self.alpha_e) if n_learned >= 1 else None
        real = bank.real_at(n_valid) if n_valid > 0 else bank.real  # real data at the samples' alpha
        adjusted = None
        if estimate is not None and real is not None and real.estimate > 0:
            adjusted = adjusted_irs(estimate, real)
        if n_invalid:
            message = f"IRSMonitor: {n_invalid} of {n_drawn} samples at step {step} contain NaN/Inf (counted as failures)"
            if self.strict:
                raise EvaluationError(message)
            logger.warning(message)
        hits = learned.hits.detach().cpu()
        result = EvaluationResult(
            step=step, verdict=decision.verdict, rule=decision.rule, samples_used=n_drawn, budget=budget,
            n_learned=n_learned, n_invalid=n_invalid, n_train=n_train, k_min=int(test.k_min),
            target_irs=self.target_irs, alpha_e=self.alpha_e, estimate=estimate, adjusted=adjusted, real=real,
            seed=int(seed), target_s=float(test.s_d), curve=curve, hits=hits)
        t_end = time.perf_counter()
        result.timing = {"sampling": t_sampling, "features": t_features, "retrieval": t_retrieval,
                         "monitor": t_end - t_start - t_sampling - t_features, "total": t_end - t_start}
        if step is not None:
            self._record(result, samples_kept, t_end)
        return result

    def _rejection_test(self, bank) -> SequentialRejectionTest:
        """The decision rule for the configured budget (k_min and interim thresholds computed once,
        up front, on the adjusted scale when the bank has a real-data measurement, taken at the
        budget's sampling rate: ``bank.real_at(budget)``)."""
        budget = self.num_samples if self.num_samples is not None else default_budget(bank.n_train)
        real = bank.real_at(budget) if self.adjust else None
        real_irs = real.estimate if real is not None else None
        key = (bank.n_train, self.target_irs, budget, self.alpha_e, real_irs, self.look_every, self.interim_alpha)
        if self._test_cache is None or self._test_cache[0] != key:
            self._test_cache = (key, SequentialRejectionTest(
                bank.n_train, self.target_irs, budget, self.alpha_e, real_irs=real_irs, look_every=self.look_every,
                interim_alpha=self.interim_alpha))
        return self._test_cache[1]

    def _need_sampler(self):
        if self.sampler is None:
            raise ValueError("IRSMonitor has no sampler: pass sampler= to IRSMonitor(...), attach(...), "
                             "step(...) or evaluate(...) (a diffusers pipeline, a callable "
                             "(batch_size, generator) -> images, or an irs_callbacks.samplers.Sampler)")
        return self.sampler

    def _record(self, result: EvaluationResult, samples, t_end: float) -> None:
        """History, TensorBoard, checkpoint verdicts. The logging time counts as the monitor's."""
        main = self._processes().is_main
        if main:
            self._ensure_outputs()
            top = None
            if self.log_images and self._train_images is not None and self.num_log_images:
                top = torch.argsort(result.hits, descending=True, stable=True)[: min(16, self.num_log_images)]
                top = top[result.hits[top] > 1].tolist()
            record = result.as_record()
            self._tracker.log_scalars(record)
            # display work (histogram, PNG encoding, figure, the saved evaluation) runs on the
            # background thread, so the training loop does not wait for it; strict: here, raising
            if self.strict:
                self._log_display(record, result.hits, samples, top)
            else:
                self._background.submit(self._log_display, record, result.hits, samples, top)
            spent = time.perf_counter() - t_end
            result.timing["logging"] = spent
            result.timing["monitor"] += spent
            result.timing["total"] += spent
        record = result.as_record()
        self.history = [r for r in self.history if r["step"] != result.step] + [record]
        if main:
            self._history_file.append(record)
            if self._pruner is not None:
                self._pruner.record(result.step, result.verdict, result.score)
                self._prune_pending = True
        logger.info("IRSMonitor step %s: %s (%s) after %d/%d samples; N_learned=%d, k_min=%d, IRS_inf=%s, adjusted=%s",
                    result.step, result.verdict, result.rule, result.samples_used, result.budget, result.n_learned,
                    result.k_min, result.estimate, "n/a" if result.adjusted is None else f"{result.adjusted:.3f}")

    def _log_display(self, record: dict, hits: torch.Tensor, samples, top) -> None:
        """TensorBoard summaries and ``irs_last_evaluation.safetensors`` of one evaluation (runs on
        the background thread unless strict)."""
        over = None
        if top:
            try:
                over = self._train_images(top)
            except Exception as error:  # a display nicety: never fail the evaluation for it
                logger.warning("IRSMonitor: could not load over-retrieved training images: %s", error)
        try:
            self._tracker.log_display(record, hits=hits.numpy(), samples=samples, over_retrieved=over)
        except Exception as error:
            if self.strict:
                raise
            hint = ("; call monitor.close() before accelerator.end_training()"
                    if "closed" in str(error).lower() else "")  # the writer was closed under us
            logger.warning("IRSMonitor: TensorBoard histogram/images of step %s not logged: %r%s",
                           record["step"], error, hint)
        try:  # hits per training image, for `irs report --evaluation`; a display aid, never fatal
            save_evaluation(self._history_file.path.with_name(LAST_EVALUATION_NAME), record, hits)
        except Exception as error:
            logger.warning("IRSMonitor: could not save %s: %s", LAST_EVALUATION_NAME, error)

    def _prune(self) -> None:
        self._prune_pending = False
        if not self._processes().is_main or self.prune_mode is None:
            return
        try:
            self._ensure_outputs()
            deleted = self._pruner.prune()
            if deleted:
                logger.info("IRSMonitor: %s checkpoints %s (ledger: %s)", "would delete" if self.dry_run else "deleted",
                            ", ".join(deleted), self._pruner.ledger_path)
        except Exception as error:
            if self.strict:
                raise
            logger.warning("IRSMonitor: checkpoint pruning failed (nothing else affected): %s", error)

    # -------------------------------------------------------------------------------- state
    @property
    def history_file(self) -> Path | None:
        """Path of the JSON-lines history file (main process, once something was logged)."""
        return None if self._history_file is None else self._history_file.path

    @property
    def best(self) -> dict | None:
        """The history record with the highest score (adjusted IRS, else IRS_inf)."""
        scored = [r for r in self.history if r.get("score") is not None]
        return max(scored, key=lambda r: r["score"]) if scored else None

    def state_dict(self) -> dict:
        """JSON-able state: history, consecutive rejections, stop flag."""
        return {"version": 1, "history": [dict(r) for r in self.history],
                "consecutive_rejections": self.consecutive_rejections, "should_stop": self.should_stop}

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` (e.g. by ``accelerator.load_state``): the history file is
        rewritten to match, so evaluations after the checkpoint are not counted twice."""
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ValueError("not an IRSMonitor state_dict (expected a dict with version 1)")
        self.history = [dict(r) for r in state["history"]]
        self.consecutive_rejections = int(state["consecutive_rejections"])
        self.should_stop = bool(state["should_stop"])
        self._rewrite_history = True
        self._purge_step = (max(r["step"] for r in self.history) + 1) if self.history else None
        if self._pruner is not None:
            self._pruner.set_evaluations(self.history)
        if self._processes().is_main and self._history_file is not None:
            self._ensure_outputs()

    def close(self) -> None:
        """Prune once more, wait for the background logging and flush the logs (at the end of training)."""
        if self.prune_mode is not None:
            self._prune()
        self._background.close()
        if self._tracker is not None:
            self._tracker.close()


# ------------------------------------------------------------------------------------ helpers


def _int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _len(data):
    try:
        return len(data)
    except TypeError:
        return "?"


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _to_unit(images: torch.Tensor, value_range) -> torch.Tensor:
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    lo, hi = value_range
    return ((images.float() - lo) / (hi - lo)).clamp(0, 1)


def _first_image(item):
    if isinstance(item, dict):
        for key in ("image", "images", "img", "pixel_values", "input", "input_ids"):
            if key in item:
                return item[key]
        return next(iter(item.values()))
    if isinstance(item, (tuple, list)):
        return item[0]
    return item


def _guess_value_range(data) -> tuple[float, float]:
    """(-1, 1) if float training images go below 0, else (0, 1) (uint8 needs none); logged."""
    try:
        if isinstance(data, (torch.Tensor, np.ndarray)):
            sample = torch.as_tensor(np.asarray(data[:64]) if isinstance(data, np.ndarray) else data[:64])
        elif hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (str, os.PathLike)):
            n = len(data)
            sample = torch.stack([torch.as_tensor(np.asarray(_first_image(data[i]))).float()
                                  for i in range(0, n, max(1, n // 32))][:32])
        else:
            return (0.0, 1.0)
    except Exception:
        return (0.0, 1.0)
    if sample.dtype == torch.uint8:
        return (0.0, 1.0)
    value_range = (-1.0, 1.0) if float(sample.min()) < -0.01 else (0.0, 1.0)
    logger.info("IRSMonitor: training images look like value range %s (pass train_value_range= to override)",
                value_range)
    return value_range


def _image_lookup(data, bank, value_range):
    """Callable mapping bank rows to training images in [0, 1] (for the over-retrieved grid), or
    None when the data cannot be indexed."""
    meta = getattr(bank, "metadata", {}) or {}
    rows = meta.get("train_indices")
    if not (hasattr(data, "__getitem__") and hasattr(data, "__len__")) or isinstance(data, (str, os.PathLike)):
        return None

    def lookup(indices):
        images = []
        for i in indices:
            item = data[int(rows[i]) if rows is not None else int(i)]
            x = torch.as_tensor(np.asarray(_first_image(item)))
            if x.ndim == 2:
                x = x[None]
            images.append(_to_unit(x[None], value_range)[0])
        return torch.stack(images)

    return lookup
