"""IRSMonitor: diversity monitoring of a diffusion model while it trains (IRS paper, appendix 6).

The monitor schedules evaluations and fans their results out; the work is done by small parts
that can be used on their own:

- :class:`~irs_callbacks.evaluation.EvaluationEngine` draws samples batch by batch, retrieves
  their nearest training images and decides with the sequential test (no files, no Accelerate);
- :mod:`irs_callbacks.reference_setup` finds the training images and builds the reference bank;
- :class:`~irs_callbacks.stopping.EarlyStopping` (patience), :mod:`irs_callbacks.sinks` (history,
  TensorBoard, the saved evaluation), :class:`~irs_callbacks.checkpoints.CheckpointRegistry` and
  :class:`~irs_callbacks.pruning.CheckpointPruner` (which checkpoints exist and which go);
- :mod:`irs_callbacks.accelerate` and :mod:`irs_callbacks.lightning` connect it to a trainer with
  public verbs only.

In an Accelerate loop (``examples/train_unconditional.py`` marks the lines)::

    monitor = IRSMonitor(PipelineSampler(pipeline, num_inference_steps=25))
    monitor.attach(accelerator, train_dataloader)   # after accelerator.prepare(...)
    for batch in train_dataloader:
        ...                                         # training step, maybe accelerator.save_state(...)
        if monitor.step(global_step):               # once per step, at its end; True = stop
            break
    monitor.close()

``step(n)`` is called on every process once per training step, after the optimizer step and after
any ``save_state`` of that step. Evaluations run there (never inside ``save_state``): at every
checkpoint the trainer saves (default), or every ``every_n_steps`` steps. Monitoring problems are
logged and never stop training unless ``strict=True``. History schema:
:data:`irs_callbacks.history.HISTORY_SCHEMA`.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from irs_callbacks.checkpoints import CheckpointRegistry, read_checkpoint_state, write_checkpoint_state
from irs_callbacks.evaluation import (EvaluationEngine, EvaluationError, EvaluationResult, EvaluationSettings,
                                      SingleProcess, default_budget)
from irs_callbacks.files import expand_path
from irs_callbacks.history import HISTORY_NAME, EvaluationRecord
from irs_callbacks.log import library_logger
from irs_callbacks.pruning import PRUNE_MODES, CheckpointPruner, Verdict, default_ledger_folder
from irs_callbacks.reference_setup import ReferenceConfig, cache_folder, check_training_data, prepare_reference
from irs_callbacks.samplers import as_sampler, preserved_rng
from irs_callbacks.sinks import EvaluationFileSink, HistorySink, TensorBoardSink
from irs_callbacks.stopping import EarlyStopping
from irs_callbacks.tracking import LAST_EVALUATION_NAME, BackgroundWork, TensorBoardLogger
from irs_callbacks.validation import check_choice, check_fraction, check_int, check_probability

__all__ = ["IRSMonitor", "MonitorOptions", "ReferenceConfig", "EvaluationResult", "EvaluationError", "SetupError",
           "default_budget"]

logger = logging.getLogger(__name__)
library_logger()

#: evaluate every this many steps when neither every_n_steps nor a trainer's checkpoints say when
DEFAULT_EVERY_N_STEPS = 500


@dataclass(frozen=True)
class MonitorOptions:
    """The monitor's rarely changed settings.

    Args:
        seed: sampling seed; sample ``i`` of an evaluation is seeded from ``(seed, i)``.
        fixed_noise: the same noise at every evaluation (curves compare like with like); False
            draws new noise per step.
        adjust: put the target on the scale of real data and report IRS_inf,a (needs the bank's
            real-data measurement).
        device: where retrieval runs (default: the trainer's device, else CUDA if available).
        tensorboard: log to TensorBoard (the trainer's writer, else ``<log_dir>/irs``).
        log_images: sample and over-retrieved grids, the curve figure, galleries for the report.
        num_log_images: generated images in the TensorBoard grid.
        history_file: the JSON-lines history (default ``<log_dir>/irs_history.jsonl``).
        shard_bank: with several processes, each process's device holds a shard of the training
            features for the search (False: a full copy on every device). Host memory is not
            sharded: every process loads the whole reference bank (N_train x dim float32, 10.5 GB
            for ImageNet at dim 2048).
    """

    seed: int = 0
    fixed_noise: bool = True
    adjust: bool = True
    device: object = None
    tensorboard: bool = True
    log_images: bool = True
    num_log_images: int = 36
    history_file: object = None
    shard_bank: bool = True

    def __post_init__(self):
        check_int(self.seed, "seed", 0)
        check_int(self.num_log_images, "num_log_images", 0)
        if self.history_file is not None:
            object.__setattr__(self, "history_file", expand_path(self.history_file, "history_file"))


class IRSMonitor:
    """Diversity monitor for diffusion training; every argument is optional.

    Args:
        sampler: what to evaluate: a diffusers pipeline, a
            :class:`~irs_callbacks.samplers.PipelineSampler` (``num_inference_steps``, ``ema``), an
            object with ``as_irs_sampler()`` (``diadm.DiADMPipeline``), a callable
            ``(batch_size, generator) -> images`` or any :class:`~irs_callbacks.samplers.Sampler`.
            Default: with Accelerate, a DDIM pipeline over the one diffusers ``UNet2DModel`` the
            accelerator saves (logged).
        reference: a :class:`ReferenceConfig`, a ``ReferenceBank`` or saved bank path, or the
            training data; default: the data given to :meth:`attach`.
        every_n_steps: evaluate when ``step % every_n_steps == 0``; default: at every checkpoint
            the trainer saves (Accelerate), else every 500 steps.
        start_step: no evaluation before this step (warm-up).
        num_samples: budget of samples per evaluation (default
            :func:`~irs_callbacks.evaluation.default_budget`).
        batch_size: samples per round, all processes together.
        target_irs: target diversity IRS_d, relative to real data (default 0.8).
        alpha_e: probability of wrongly rejecting a model at the target (default 0.05).
        pass_alpha: allow an early statistical pass with this error probability (a model below the
            target passes early with at most this probability; default None: off, a pass needs
            N_learned > k_min, i.e. usually the whole budget). See
            :class:`~irs_callbacks.stats.SequentialRejectionTest`.
        patience: stop training after this many consecutive rejections (None: never).
        pruner: a :class:`~irs_callbacks.pruning.CheckpointPruner`, or its mode ``"rejected"`` /
            ``"top_k"`` (default None: nothing is ever deleted).
        log_dir: history, TensorBoard events (without the trainer's writer) and the bank cache;
            default: the trainer's logging folder, else ``./irs_logs``.
        strict: raise on monitoring problems (NaN samples included) instead of logging them; a failure
            of the background display work is raised from the next step(), flush() or close().
        options: :class:`MonitorOptions`.
    """

    def __init__(self, sampler=None, *, reference=None, every_n_steps: int | None = None, start_step: int = 0,
                 num_samples: int | None = None, batch_size: int = 64, target_irs: float = 0.8,
                 alpha_e: float = 0.05, pass_alpha: float | None = None, patience: int | None = None, pruner=None,
                 log_dir=None, strict: bool = False, options: MonitorOptions | None = None):
        self.options = options if options is not None else MonitorOptions()
        if not isinstance(self.options, MonitorOptions):
            raise TypeError(f"options must be a MonitorOptions, got {type(self.options).__name__}")
        self.sampler = sampler
        self.reference = ReferenceConfig.of(reference)
        self.every_n_steps = None if every_n_steps is None else check_int(every_n_steps, "every_n_steps", 1)
        self.start_step = check_int(start_step, "start_step", 0)
        self.settings = EvaluationSettings(
            num_samples=None if num_samples is None else check_int(num_samples, "num_samples", 1),
            batch_size=check_int(batch_size, "batch_size", 1),
            target_irs=check_fraction(target_irs, "target_irs"), alpha_e=check_probability(alpha_e, "alpha_e"),
            pass_alpha=None if pass_alpha is None else check_probability(pass_alpha, "pass_alpha"),
            adjust=bool(self.options.adjust), seed=self.options.seed, fixed_noise=bool(self.options.fixed_noise),
            keep_samples=self.options.num_log_images if self.options.log_images else 0)
        self.stopping = EarlyStopping(patience)
        if isinstance(pruner, str):
            pruner = CheckpointPruner(check_choice(pruner, "pruner", PRUNE_MODES))
        if pruner is not None and not isinstance(pruner, CheckpointPruner):
            raise TypeError(f"pruner must be a CheckpointPruner, a mode string or None, got {type(pruner).__name__}")
        self.pruner = pruner
        self.log_dir = None if log_dir is None else expand_path(log_dir, "log_dir")
        self.strict = bool(strict)

        self.history: list[EvaluationRecord] = []  # identical on every process
        self.registry = CheckpointRegistry()       # checkpoints of this run and the runs it resumed
        self.errors: list[tuple[int | None, str]] = []  # (step, message) of failed evaluations
        # set by connect() (trainer adapters) or defaults
        self.processes = None
        self._default_log_dir = None
        self._tensorboard_factory = None
        self._main_process_first = None
        self._follows_checkpoints = False
        # built on first use
        self._engine = None
        self._sinks = None  # TensorBoard, the saved evaluation (main process)
        self._history_sink = None
        self._background = BackgroundWork()
        self._disabled: str | None = None  # why evaluations are off (set-up failed), logged once
        self._pruning_off: str | None = None
        self._resumed_from: str | None = None
        self._last_step = 0  # the latest step() argument
        self._attempted: int | None = None  # the latest step an evaluation was tried at (passed or failed)
        self._warned: set = set()

    # ------------------------------------------------------------------------------ connecting
    def attach(self, accelerator, train_data=None) -> "IRSMonitor":
        """Connect to an ``accelerate.Accelerator`` (after ``accelerator.prepare``, before
        ``accelerator.load_state``); ``train_data``: the training dataloader, dataset or images
        (see :class:`ReferenceConfig`). Returns the monitor."""
        from irs_callbacks.accelerate import attach

        attach(self, accelerator, train_data)
        return self

    def connect(self, processes=None, *, log_dir=None, tensorboard=None, train_data=None, main_process_first=None,
                follows_checkpoints: bool = False) -> "IRSMonitor":
        """What a trainer adapter tells the monitor (the public verb behind :meth:`attach` and the
        Lightning callback): the run's processes (:class:`~irs_callbacks.evaluation.Processes`),
        its logging folder, a ``TensorBoardLogger`` (or a callable making one on first use),
        the training data, a ``main_process_first`` context-manager factory, and whether the
        trainer reports its checkpoints (then evaluations follow them unless ``every_n_steps``)."""
        if processes is not None:
            self.processes = processes
        if log_dir is not None:
            self._default_log_dir = expand_path(log_dir, "log_dir")
        if tensorboard is not None:
            self._tensorboard_factory = tensorboard
        if main_process_first is not None:
            self._main_process_first = main_process_first
        self._follows_checkpoints = self._follows_checkpoints or bool(follows_checkpoints)
        if train_data is not None:
            self.reference = self.reference.with_train_data(train_data)
            try:
                description = check_training_data(train_data)
            except ValueError as error:
                self._disable(f"cannot read the training data: {error}")
            else:
                self._info("IRSMonitor: training data %s", description)
        return self

    # ------------------------------------------------------------------------------ properties
    @property
    def log_folder(self) -> Path:
        """Where the history, TensorBoard events (without the trainer's writer) and caches go."""
        return self.log_dir or self._default_log_dir or Path("irs_logs")

    @property
    def history_file(self) -> Path | None:
        """Path of the JSON-lines history (``MonitorOptions(history_file=...)``, else
        ``<log_folder>/irs_history.jsonl``); None on processes other than the main one."""
        if not self._procs().is_main:
            return None
        return self.options.history_file or self.log_folder / HISTORY_NAME

    @property
    def engine(self) -> EvaluationEngine | None:
        """The evaluation engine (reference bank, search structure, settings) once set up."""
        return self._engine

    @property
    def should_stop(self) -> bool:
        return self.stopping.should_stop

    @property
    def consecutive_rejections(self) -> int:
        return self.stopping.consecutive_rejections

    @property
    def best(self) -> EvaluationRecord | None:
        """The history record with the highest score (adjusted IRS, else IRS_inf)."""
        scored = [r for r in self.history if r.score is not None]
        return max(scored, key=lambda r: r.score) if scored else None

    def _procs(self):
        if self.processes is None:
            world = torch.distributed.get_world_size() if _distributed() else 1
            if world > 1:  # not connected to the run's processes: every one would evaluate and write
                self.processes = _UnconnectedProcess(torch.distributed.get_rank(), self.options.device)
                self._disable(f"torch.distributed runs {world} processes but the monitor was not connected to them: "
                              "call monitor.attach(accelerator) after accelerator.prepare(...), or use "
                              "irs_callbacks.lightning.IRSCallback")
            else:
                self.processes = SingleProcess(self.options.device)
        return self.processes

    def _device(self) -> torch.device:
        return torch.device(self.options.device) if self.options.device is not None else self._procs().device

    def _info(self, message, *args) -> None:
        if self._procs().is_main:
            logger.info(message, *args)

    def _disable(self, reason: str) -> None:
        if self._disabled is None:
            self._disabled = reason
            if self._procs().is_main:
                logger.error("IRSMonitor is off for this run: %s. Training goes on; no evaluation, verdict or "
                             "pruning will happen.", reason)

    # ------------------------------------------------------------------------------ set-up
    def prepare(self):
        """Build the reference bank, the engine and the outputs now (otherwise done at the first
        evaluation); returns the :class:`~irs_callbacks.reference.ReferenceBank`. Raises on
        problems (the monitor's own calls catch them)."""
        self._prepare_engine()
        self._ensure_sinks()
        return self._engine.reference.bank

    def _prepare_engine(self) -> None:
        if self._engine is not None:
            return
        procs = self._procs()
        t0 = time.perf_counter()
        shard = procs.world > 1 and self.options.shard_bank
        with preserved_rng():
            prepared = prepare_reference(
                self.reference, device=self._device(), seed=self.options.seed, batch_size=self.settings.batch_size,
                default_cache_dir=cache_folder(self.log_folder), main_process_first=self._main_process_first,
                show_progress=procs.is_main, search_options={"sharded": True} if shard else None)
            engine = EvaluationEngine(prepared, procs, self.settings)
            if self.settings.adjust and prepared.bank.real is None:
                self._info("IRSMonitor: the reference bank has no real-data measurement: the target is on the "
                           "absolute scale and no adjusted score is reported")
            engine.warm_up()
        self._engine = engine
        test = engine.rejection_test()
        bank = prepared.bank
        real = bank.real
        at_budget = bank.real_at(test.budget) if real is not None else None
        self._info("IRSMonitor: reference ready in %.1f s: %d training images (%s), dim %d; %s; budget %d samples, "
                   "k_min %d for target %.2f%s", time.perf_counter() - t0, bank.n_train,
                   prepared.description or "bank", bank.dim,
                   "no real reference" if real is None else
                   f"real IRS_inf {real.estimate:.2%} (all {real.n_samples} real queries against {real.n_train} "
                   f"training images), {at_budget.estimate:.2%} at the budget's sampling rate",
                   test.budget, test.k_min, self.settings.target_irs,
                   " of the latter" if self.settings.adjust and real is not None else "")

    def _ensure_sinks(self) -> None:
        """History, TensorBoard and the saved evaluation (main process only; after
        :meth:`_prepare_engine`)."""
        if self._sinks is not None or not self._procs().is_main:
            return
        path = self.history_file
        history = HistorySink(path)
        if self.history or self._resumed_from is not None:
            history.rewrite(self.history)  # resumed: exactly the restored evaluations
        else:
            archived = history.file.archive_previous_run(time.strftime("%Y%m%d-%H%M%S", time.localtime(
                path.stat().st_mtime)) if path.is_file() else "previous")
            if archived is not None:
                logger.info("IRSMonitor: %s held another run's history; moved to %s", path, archived)
        sinks = []
        images = self._engine.reference.training_images
        if self.options.tensorboard:
            factory = self._tensorboard_factory
            tensorboard = factory() if callable(factory) else factory
            if tensorboard is None:
                from torch.utils.tensorboard import SummaryWriter

                purge = (max(r.step for r in self.history) + 1) if self.history else None
                writer = SummaryWriter(log_dir=str(self.log_folder / "irs"), purge_step=purge)
                tensorboard = TensorBoardLogger(writer, images=self.options.log_images, figure=self.options.log_images)
            sinks.append(TensorBoardSink(tensorboard, training_images=images,
                                         num_images=self.options.num_log_images if self.options.log_images else 0))
        sinks.append(EvaluationFileSink(Path(history.path).with_name(LAST_EVALUATION_NAME),
                                        training_images=images if self.options.log_images else None))
        self._sinks, self._history_sink = sinks, history
        test = self._engine.rejection_test()
        for sink in sinks:
            if hasattr(sink, "warm_up"):
                sink.warm_up({"n_train": self._engine.reference.bank.n_train, "budget": test.budget,
                              "k_min": int(test.k_min), "target_s": float(test.s_d)})

    # ------------------------------------------------------------------------------ per step
    def step(self, step, sampler=None) -> bool:
        """Call once per training step on every process, at its end (after the optimizer step and
        any ``save_state``), with the step number used for checkpoints. Evaluates when due;
        returns True when training should stop (``patience``). Never raises on monitoring
        problems unless ``strict``."""
        step = check_int(step, "step", 0)
        self._raise_if_strict()
        self._last_step = step
        if sampler is not None:
            self.sampler = sampler
        saved = self.registry.resolve(step)  # save_state has returned: these are complete
        if saved:
            self._write_checkpoint_states(saved)
        result = None
        if self._due(step, bool(saved)):
            self._attempted = step  # tried once: a failure is not retried on every micro-batch
            result = self._guarded_evaluate(step)
            if result is not None:
                self._update_stopping(result)
                if saved:
                    self._write_checkpoint_states(saved)  # the checkpoint's state includes its verdict
        if self.pruner is not None and (saved or result is not None):
            self._prune(saved)
        return self.should_stop

    def is_due(self, step) -> bool:
        """Whether :meth:`step` would evaluate at ``step`` now (a collective call when evaluations
        follow a multi-process trainer's checkpoints, like :meth:`step` itself)."""
        return self._due(check_int(step, "step", 0), bool(self.registry.pending))

    def _due(self, step: int, saved: bool) -> bool:
        if (self._disabled is not None or self.should_stop or step <= 0 or step < self.start_step
                or step == self._attempted or any(r.step == step for r in self.history)):
            return False
        if self.every_n_steps is not None:
            return step % self.every_n_steps == 0
        if self._follows_checkpoints:  # the main process may be the only one that saved
            return self._procs().any(saved) if self._procs().world > 1 else saved
        return step % DEFAULT_EVERY_N_STEPS == 0

    def _guarded_evaluate(self, step):
        try:
            return self.evaluate(step=step)
        except Exception as error:  # noqa: BLE001 - monitoring never stops training unless strict
            if self.strict:
                raise
            if isinstance(error, SetupError):  # the reference cannot be built: say so once, then stay quiet
                self._disable(f"set-up failed ({error})")
                logger.debug("IRSMonitor set-up failure:\n%s", traceback.format_exc())
                return None
            self.errors.append((step, str(error)))
            if self._procs().is_main:
                logger.error("IRSMonitor: evaluation at step %s failed: %s. No verdict for this step and nothing "
                             "pruned on its account; training goes on (strict=True raises instead).", step, error)
                logger.debug("%s", traceback.format_exc())
            return None

    def _update_stopping(self, result: EvaluationResult) -> None:
        """Every process holds the same history and stopping state and gets the same verdict (the
        engine gathers the retrieved indices and decides identically everywhere), so each takes
        the same decision here, without a collective call."""
        self.stopping.update(result.step, result.verdict)
        if self.should_stop and self.stopping.stopped_at == result.step and self._procs().is_main:
            logger.warning("IRSMonitor: %d consecutive rejected evaluations (patience=%s) at step %s: stop training",
                           self.stopping.consecutive_rejections, self.stopping.patience, result.step)

    # ------------------------------------------------------------------------------ evaluate
    def evaluate(self, sampler=None, step: int | None = None) -> EvaluationResult:
        """Run one evaluation now. With ``step`` it is recorded (history, TensorBoard, checkpoint
        verdicts); without, it is only returned. Collective: with several processes, call it on
        every process (like :meth:`step`). Raises on problems, the same error type on every
        process (``step()`` catches them)."""
        procs = self._procs()
        if isinstance(procs, _UnconnectedProcess):
            raise SetupError(self._disabled)
        error = None  # set up on every process first: prepare_reference waits for the others
        try:
            self._prepare_engine()
        except Exception as exc:  # noqa: BLE001 - raised below, on every process alike
            error = SetupError(f"{type(exc).__name__}: {exc}")
            error.__cause__ = exc
        chosen = sampler if sampler is not None else self.sampler
        if error is None and chosen is not None:
            try:
                sampler = as_sampler(chosen)
                if step is not None:
                    self._ensure_sinks()  # before the evaluation's clock starts (figure warm-up, writers)
            except Exception as exc:  # noqa: BLE001
                error = exc
        _raise_alike(procs, error, chosen is None)
        result = self._engine.run(sampler, step)
        if result.n_invalid:
            message = (f"IRSMonitor: {result.n_invalid} of {result.samples_used} samples at step {step} contain "
                       "NaN/Inf (counted as failures, never as learned)")
            if self.strict:
                raise EvaluationError(message)
            if procs.is_main:
                logger.warning(message)
        if step is not None:
            self._record(result)
        return result

    def _record(self, result: EvaluationResult) -> None:
        """History (every process), sinks and the verdict line (main process). A sink that fails
        is logged and skipped (strict: raised), so the evaluation counts alike on every process
        (history, patience, pruning). The time spent in the loop here counts as the monitor's;
        display work runs on the background thread."""
        t0 = time.perf_counter()
        is_main = self._procs().is_main
        if is_main:
            record = result.as_record()
            payloads = []
            for sink in self._sinks:
                self._write(sink, result, record)
                if hasattr(sink, "display"):
                    payloads.append((sink, sink.prepare(result) if hasattr(sink, "prepare") else None))
            for sink, payload in payloads:  # PNG encoding, figures, files: off the training loop
                self._background.submit(sink.display, result, record, payload)
            spent = time.perf_counter() - t0
            result.timing.update(logging=spent, monitor=result.timing["monitor"] + spent,
                                 total=result.timing["total"] + spent)
        record = result.as_record()
        self.history = [r for r in self.history if r.step != result.step] + [record]
        if is_main:
            self._write(self._history_sink, result, record)
            logger.info("%s", _verdict_line(result))

    def _write(self, sink, result: EvaluationResult, record: EvaluationRecord) -> None:
        """``sink.write``; a failure (a full disk, a tracker's error) is one ERROR per output (then
        DEBUG), never a lost evaluation, unless ``strict``."""
        try:
            sink.write(result, record)
        except Exception as error:  # noqa: BLE001 - an output problem must not drop the evaluation
            if self.strict:
                raise
            output = f"{type(sink).__name__}({getattr(sink, 'path', '')})"
            if ("write", output) in self._warned:
                logger.debug("IRSMonitor: %s failed again at step %s: %r", output, result.step, error)
                return
            self._warned.add(("write", output))
            logger.error("IRSMonitor: could not write the evaluation at step %s to %s: %r. The evaluation counts "
                         "(history in memory and in checkpoints, patience, pruning); later failures of this output "
                         "are logged at DEBUG level only (strict=True raises instead).", result.step, output, error)

    # ------------------------------------------------------------------------------ checkpoints
    def checkpoint_saved(self, path) -> None:
        """A checkpoint is being written into ``path`` (the adapters call this from the trainer's
        save hook, on every process that saves): register it and write the monitor's state into it.
        Never raises unless ``strict``."""
        try:
            entry = self.registry.register(path)
            if self._procs().is_main:
                write_checkpoint_state(entry.path, entry, self.state_dict())
        except Exception as error:  # noqa: BLE001
            if self.strict:
                raise
            logger.error("IRSMonitor: could not record the checkpoint %s (%s); it will not be judged or pruned",
                         path, error)

    def _write_checkpoint_states(self, entries) -> None:
        if not self._procs().is_main:
            return
        state = self.state_dict()
        for entry in entries:
            try:
                if os.path.isdir(entry.path):
                    write_checkpoint_state(entry.path, entry, state)
            except OSError as error:
                logger.error("IRSMonitor: could not update the monitor state in %s: %s", entry.path, error)

    def checkpoint_loaded(self, path) -> None:
        """Training resumes from the checkpoint in ``path`` (the adapters call this from the
        trainer's load hook, before the weights are read): restore the monitor's state from it.
        A checkpoint saved without the monitor gives an empty history and a warning."""
        path = os.path.abspath(expand_path(path, "checkpoint folder"))
        self._resumed_from = path
        try:
            state = read_checkpoint_state(path)
        except ValueError as error:
            state = None
            logger.error("IRSMonitor: %s; starting with an empty history", error)
        if state is None:
            if self._procs().is_main:
                logger.warning("IRSMonitor: %s holds no monitor state (saved before the monitor was added, or by a "
                               "script without it): starting with an empty history", path)
            return
        self.load_state_dict(state["monitor"])

    def _prune(self, saved) -> None:
        if not self._procs().is_main or self._pruning_off is not None:
            return
        try:
            if not self.pruner.is_open:
                own = self.registry.of_this_run  # not a restored one: it may lie in another experiment's folder
                if not own:
                    return
                self.pruner.open(default_ledger_folder(own[0].path), self.registry.run_id)
            evaluations = {r.step: Verdict(r.verdict, r.score) for r in self.history}
            unjudged = [entry for entry in saved if entry.step not in evaluations]
            if unjudged and "unjudged" not in self._warned:
                self._warned.add("unjudged")
                logger.warning("IRSMonitor: checkpoint %s (step %s) has no evaluation at its step, so it (and any "
                               "other such checkpoint) will never be pruned: leave every_n_steps=None to evaluate at "
                               "every checkpoint, or align it with the checkpointing interval",
                               unjudged[0].path, unjudged[0].step)
            protected = {self._resumed_from: "training resumed from it"} if self._resumed_from else {}
            changes = self.pruner.update(self.registry, evaluations, protected)
        except Exception as error:  # noqa: BLE001 - pruning never stops the evaluations
            if self.strict:
                raise
            self._pruning_off = str(error)
            logger.error("IRSMonitor: checkpoint pruning is off for this run: %s. Evaluations, history and TensorBoard "
                         "go on; no checkpoint will be deleted.", error)
            return
        best = self.best
        for path in changes["missing"]:
            entry = self.registry.find(path)
            is_best = best is not None and entry is not None and entry.step == best.step
            logger.warning("IRSMonitor: checkpoint %s was deleted outside the monitor%s", path,
                           f" -- it was the best-scoring one (step {best.step}, score {best.score:.4f})"
                           if is_best else "")
        for path, error in changes["failed"].items():
            if ("failed", path) not in self._warned:
                self._warned.add(("failed", path))
                logger.warning("IRSMonitor: could not delete %s (%s); recorded in the ledger, the others go on",
                               path, error)
        if changes["deleted"]:
            logger.info("IRSMonitor: %s %s (ledger: %s)", "would delete" if self.pruner.dry_run else "deleted",
                        ", ".join(changes["deleted"]), self.pruner.ledger_path)

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """JSON-able state: history, early stopping, the checkpoints of this lineage."""
        return {"version": 2, "history": [r.as_dict() for r in self.history], "stopping": self.stopping.state_dict(),
                "checkpoints": self.registry.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` (e.g. from a checkpoint): later evaluations are not counted
        twice, and the history file is rewritten to match."""
        if not isinstance(state, dict) or state.get("version") != 2:
            raise ValueError("not an IRSMonitor state (expected a dict with version 2)")
        self.history = [EvaluationRecord.from_dict(r) for r in state["history"]]
        self.stopping.load_state_dict(state["stopping"])
        self.registry.load_state_dict(state.get("checkpoints", {}))
        if self._history_sink is not None:
            self._history_sink.rewrite(self.history)

    def flush(self) -> None:
        """Wait until the background display work submitted so far is written (strict: and raise
        what failed there)."""
        self._background.flush()
        self._raise_if_strict()

    def _raise_if_strict(self) -> None:
        """In strict mode, a display job that failed on the background thread raises here, in the
        caller's next call (step, flush, close); otherwise it was a logged warning."""
        if self.strict:
            self._background.raise_failure()

    @property
    def display_seconds(self) -> float:
        """Seconds the background thread has spent on display work (TensorBoard images, figures,
        the saved evaluation): off the training loop, but CPU time all the same."""
        return self._background.seconds

    def close(self) -> None:
        """At the end of training, before ``accelerator.end_training()``: mark the last checkpoints
        complete, prune once more, wait for the background logging, flush the writers and release
        the pruning ledger."""
        saved = self.registry.resolve(self._last_step)  # saved after the last step(): complete by now
        if saved:
            self._write_checkpoint_states(saved)
        if self.pruner is not None:
            self._prune(saved)
            if self.pruner.is_open:
                self.pruner.close()
        self._background.close()
        for sink in [self._history_sink, *self._sinks] if self._sinks is not None else ():
            sink.close()
        self._raise_if_strict()


class SetupError(EvaluationError):
    """The monitor's reference could not be prepared (training data, extractor, bank)."""


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class _UnconnectedProcess(SingleProcess):
    """One process of a torch.distributed run the monitor was not connected to (it stays off): no
    collective call, and only rank 0 writes and logs."""

    def __init__(self, rank: int, device=None):
        super().__init__(device)
        self.rank, self.is_main = rank, rank == 0


def _raise_alike(procs, error: Exception | None, no_sampler: bool) -> None:
    """Before an evaluation's first collective call: one gather of every process's set-up outcome
    (``error``; whether it has no sampler), then the same decision on every process, so that none
    is left waiting in a collective call the others skipped. A sampler on some processes only is a
    :class:`SetupError` (the monitor turns off), on none a ValueError; then, with one process its
    own error, with several a set-up failure anywhere is a :class:`SetupError` and any other (e.g.
    the main process's outputs) an :class:`EvaluationError`."""
    code = 0 if error is None else 2 if isinstance(error, SetupError) else 1
    flags = [[code, int(no_sampler)]]
    if procs.world > 1:
        flags = procs.gather(torch.tensor([code, int(no_sampler)], device=procs.device)).view(procs.world, 2).tolist()
    without = [rank for rank, (_, missing) in enumerate(flags) if missing]
    if without and len(without) < procs.world:
        raise SetupError(f"no sampler on process(es) {without}, while the others have one (the sampler inferred "
                         "at save_state exists only where save_state ran, e.g. on the main process only): pass "
                         "IRSMonitor(PipelineSampler(...))")
    if without:
        raise ValueError("IRSMonitor has no sampler: pass one to IRSMonitor(sampler), step(..., sampler=) or "
                         "evaluate(sampler) (a diffusers pipeline, a PipelineSampler, a callable "
                         "(batch_size, generator) -> images, or an irs_callbacks.samplers.Sampler)")
    if procs.world == 1:
        if error is not None:
            raise error
        return
    own = "" if error is None else f": {error}"
    setup = [rank for rank, (c, _) in enumerate(flags) if c == 2]
    failed = [rank for rank, (c, _) in enumerate(flags) if c]
    if setup:
        raise SetupError(f"set-up failed on process(es) {setup}{own}") from error
    if failed:
        raise EvaluationError(f"evaluation set-up failed on process(es) {failed}{own}") from error


def _verdict_line(result: EvaluationResult) -> str:
    """The one line an evaluation logs, every figure labelled."""
    relation = ">" if result.n_learned > result.k_final else "<="
    eq10 = "" if result.k_final == result.k_min else f" (Eq. 10 k_min {result.k_min})"
    parts = [f"IRSMonitor step {result.step}: {result.verdict.upper()} ({result.rule}) after "
             f"{result.samples_used}/{result.budget} samples",
             f"N_learned {result.n_learned} {relation} final threshold {result.k_final}{eq10}"]
    if result.estimate is not None:
        parts.append(f"IRS_inf {result.estimate}")
    if result.adjusted is not None:
        parts.append(f"adjusted {result.adjusted:.3f} vs target {result.target_irs:g} (real IRS_inf "
                     f"{result.real.estimate:.2%}; {result.matching})")
    if result.n_invalid:
        parts.append(f"{result.n_invalid} invalid")
    parts.append(f"{result.timing.get('total', 0.0):.1f} s")
    return "; ".join(parts)
