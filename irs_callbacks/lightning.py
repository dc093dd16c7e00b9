"""Lightning integration: :class:`IRSCallback`, the IRS monitor as a ``lightning.pytorch.Callback``.

Needs the optional extra ``lightning`` (``pip install 'irs-callbacks[lightning]'``). Same core as
:class:`~irs_callbacks.monitor.IRSMonitor`; logs through the trainer's loggers (scalars via
``log_metrics``, histogram / images / figure via a TensorBoardLogger's ``experiment``), sets
``trainer.should_stop`` after ``patience`` consecutive rejections, and puts the score into
``trainer.callback_metrics`` under ``metric`` (default ``"irs/adjusted"``; IRS_inf when there is
no real reference) so that ``ModelCheckpoint(monitor="irs/adjusted", mode="max",
every_n_train_steps=<every_n_steps>)`` keeps the top-k::

    trainer = L.Trainer(callbacks=[
        IRSCallback(sampler_factory=lambda module: module.make_pipeline(), every_n_steps=1000),
        ModelCheckpoint(monitor="irs/adjusted", mode="max", save_top_k=3, every_n_train_steps=1000),
    ])
"""

from __future__ import annotations

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - depends on the environment
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError:
        raise ImportError(
            "irs_callbacks.lightning needs Lightning: pip install 'irs-callbacks[lightning]' "
            "(or pip install lightning)") from None

import contextlib

import torch

from irs_callbacks.monitor import IRSMonitor
from irs_callbacks.tracking import TensorBoardLogger

__all__ = ["IRSCallback", "LightningProcesses"]


class LightningProcesses:
    """:class:`~irs_callbacks.evaluation.Processes` of a Lightning strategy (DDP or one device)."""

    def __init__(self, strategy):
        self.strategy = strategy
        self.rank, self.world = strategy.global_rank, strategy.world_size
        self.is_main = strategy.is_global_zero
        self.device = strategy.root_device

    def gather(self, tensor):
        return self.strategy.all_gather(tensor.to(self.device)).reshape(-1)

    def any(self, flag: bool) -> bool:
        return bool(self.strategy.reduce_boolean_decision(bool(flag), all=False))

    @contextlib.contextmanager
    def main_process_first(self):
        if not self.is_main:
            self.strategy.barrier("irs-main-first")
        try:
            yield
        finally:
            if self.is_main:
                self.strategy.barrier("irs-main-first")


class IRSCallback(Callback):
    """IRS monitoring in ``Trainer.fit``.

    Args:
        sampler: a ready sampler (diffusers pipeline, ``PipelineSampler``, callable
            ``(batch_size, generator)``, or :class:`~irs_callbacks.samplers.Sampler`).
        sampler_factory: or a function ``(pl_module) -> sampler``, called at each evaluation.
        metric: the ``trainer.callback_metrics`` key set to the score after each evaluation.
        monitor: an existing :class:`~irs_callbacks.monitor.IRSMonitor`; otherwise one is built
            from ``**monitor_kwargs`` (every_n_steps, num_samples, target_irs, patience, ...).
            Training data: the monitor's ``reference`` or the trainer's train dataloader's dataset.
            No ``pruner``: Lightning's ``ModelCheckpoint(monitor=metric, save_top_k=...)`` prunes.
    """

    def __init__(self, sampler=None, *, sampler_factory=None, metric: str = "irs/adjusted",
                 monitor: IRSMonitor | None = None, **monitor_kwargs):
        if sampler is not None and sampler_factory is not None:
            raise ValueError("pass either sampler= or sampler_factory=, not both")
        if sampler_factory is not None and not callable(sampler_factory):
            raise TypeError("sampler_factory must be callable as sampler_factory(pl_module) -> sampler")
        if monitor is not None and monitor_kwargs:
            raise ValueError("pass either monitor= or IRSMonitor keyword arguments, not both")
        self.monitor = monitor if monitor is not None else IRSMonitor(sampler, **monitor_kwargs)
        if self.monitor.pruner is not None:
            raise ValueError(f"IRSCallback does not take a pruner (got pruner={self.monitor.pruner!r}): Lightning's "
                             "checkpoints never reach the monitor, so nothing would be pruned; keep the best ones "
                             f"with ModelCheckpoint(monitor=\"{metric}\", mode=\"max\", save_top_k=...) instead")
        if sampler is not None:
            self.monitor.sampler = sampler
        self.sampler_factory = sampler_factory
        self.metric = metric

    @property
    def state_key(self) -> str:
        return f"IRSCallback[{self.metric}]"

    def setup(self, trainer, pl_module, stage: str) -> None:
        m = self.monitor

        def tensorboard():
            writer, sinks = None, []
            for lg in trainer.loggers:
                sinks.append(lambda values, step, lg=lg: lg.log_metrics(values, step=step))
                if writer is None and type(lg).__name__ == "TensorBoardLogger":
                    writer = lg.experiment
            images = m.options.log_images
            return TensorBoardLogger(writer, scalar_sinks=sinks, write_scalars=False, images=images, figure=images)

        processes = LightningProcesses(trainer.strategy)
        m.connect(processes, log_dir=trainer.log_dir or trainer.default_root_dir, tensorboard=tensorboard,
                  main_process_first=processes.main_process_first)

    def on_train_start(self, trainer, pl_module) -> None:
        loaders = trainer.train_dataloader
        loader = loaders if hasattr(loaders, "dataset") else None
        if isinstance(loaders, (list, tuple)) and loaders:
            loader = loaders[0]
        elif isinstance(loaders, dict) and loaders:
            loader = next(iter(loaders.values()))
        if loader is not None and hasattr(loader, "dataset"):
            self.monitor.connect(train_data=loader.dataset)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        m = self.monitor
        step = trainer.global_step
        before = len(m.history)
        if self.sampler_factory is not None and m.is_due(step):
            m.sampler = self.sampler_factory(pl_module)
        if m.step(step):
            trainer.should_stop = True
        if len(m.history) > before and m.history[-1].step == step and m.history[-1].score is not None:
            trainer.callback_metrics[self.metric] = torch.tensor(float(m.history[-1].score))

    def on_train_end(self, trainer, pl_module) -> None:
        self.monitor.close()

    def state_dict(self) -> dict:
        return self.monitor.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.monitor.load_state_dict(state_dict)
