"""Accelerate adapter: connects :class:`~irs_callbacks.monitor.IRSMonitor` to an
``accelerate.Accelerator`` through Accelerate's public API only.

- processes: ``process_index``, ``num_processes``, ``is_main_process``, ``device``, ``gather``,
  ``reduce`` and ``main_process_first``;
- checkpoints: ``register_save_state_pre_hook`` (the monitor writes its state, JSON, into the
  checkpoint folder and learns of the checkpoint) and ``register_load_state_pre_hook`` (it reads
  that state back on resume). Nothing is registered with ``register_for_checkpointing``: no
  pickle, no matching of custom states by position, so registration order does not matter,
  checkpoints saved before the monitor existed load (with a warning) and checkpoints saved with it
  load in a script without it;
- logging: the accelerator's ``tensorboard`` tracker (``get_tracker(..., unwrap=True)``) receives
  everything, other trackers the scalars (``tracker.log``);
- the sampler, when none was given: at the first ``save_state``, a DDIM pipeline over the one
  diffusers ``UNet2DModel`` among the saved models (the noise schedule of diffusers' training
  scripts: ``DDPMScheduler(num_train_timesteps=1000)``'s linear betas), logged. This needs
  ``save_state`` on every process (as Accelerate documents it); a script that saves on the main
  process only must pass a sampler.
"""

from __future__ import annotations

import logging

import torch

__all__ = ["AccelerateProcesses", "attach", "infer_sampler"]

logger = logging.getLogger(__name__)


class AccelerateProcesses:
    """:class:`~irs_callbacks.evaluation.Processes` of an ``accelerate.Accelerator``."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.is_main = accelerator.is_main_process
        self.device = accelerator.device

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(tensor.to(self.device))

    def any(self, flag: bool) -> bool:
        if self.world == 1:
            return bool(flag)
        total = self.accelerator.reduce(torch.tensor([1 if flag else 0], device=self.device), reduction="sum")
        return bool(total.item() > 0)

    def main_process_first(self):
        return self.accelerator.main_process_first()


def _tensorboard_logger(accelerator, monitor):
    """The TensorBoard logger over the accelerator's trackers (None: the monitor makes its own)."""
    from irs_callbacks.tracking import TensorBoardLogger

    trackers = list(accelerator.trackers)
    if not trackers:
        return None
    writer, sinks = None, []
    for tracker in trackers:
        if tracker.name == "tensorboard":
            writer = accelerator.get_tracker("tensorboard", unwrap=True)
        else:
            sinks.append(lambda values, step, t=tracker: t.log(values, step=step))
    if writer is None:  # scalars to the other trackers, the rest to the monitor's own writer
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(monitor.log_folder / "irs"))
    images = monitor.options.log_images
    return TensorBoardLogger(writer, scalar_sinks=sinks, images=images, figure=images)


def infer_sampler(models, accelerator):
    """A ``PipelineSampler`` over the one diffusers ``UNet2DModel`` among ``models`` (unwrapped
    with ``accelerator.unwrap_model``), or None when there is not exactly one."""
    try:
        from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return None
    from irs_callbacks.samplers import PipelineSampler

    unets = [m for m in (accelerator.unwrap_model(model) for model in models) if isinstance(m, UNet2DModel)]
    if len(unets) != 1:
        return None
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    return PipelineSampler(DDIMPipeline(unet=unets[0], scheduler=scheduler))


def attach(monitor, accelerator, train_data=None) -> None:
    """Connect ``monitor`` to ``accelerator`` (see the module docstring)."""
    processes = AccelerateProcesses(accelerator)
    monitor.connect(processes, log_dir=accelerator.logging_dir or accelerator.project_dir,
                    tensorboard=lambda: _tensorboard_logger(accelerator, monitor), train_data=train_data,
                    main_process_first=processes.main_process_first, follows_checkpoints=True)

    def on_save(models, weights, output_dir):
        if monitor.sampler is None:
            sampler = infer_sampler(models, accelerator)
            if sampler is not None:
                monitor.sampler = sampler
                if processes.is_main:
                    # a guess that decides deletions deserves more than an INFO line
                    level = logging.WARNING if monitor.pruner is not None else logging.INFO
                    logger.log(level, "IRSMonitor: sampler = DDIM (50 steps, linear betas of diffusers' training "
                               "scripts, epsilon prediction, no EMA) over the saved %s%s; pass "
                               "IRSMonitor(PipelineSampler(...)) to choose", type(monitor.sampler.pipeline.unet).__name__,
                               "; pruning relies on it: a model trained with another noise schedule or prediction "
                               "type would be rejected and its checkpoints deleted" if monitor.pruner is not None
                               else "")
        monitor.checkpoint_saved(output_dir)

    def on_load(models, input_dir):
        monitor.checkpoint_loaded(input_dir)

    accelerator.register_save_state_pre_hook(on_save)
    accelerator.register_load_state_pre_hook(on_load)
