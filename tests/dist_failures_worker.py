"""Worker for tests/test_distributed.py: monitoring problems on some processes only, under
``accelerate launch --multi_gpu --num_processes 2`` with ``Accelerator(cpu=True)`` (gloo).
``python dist_failures_worker.py OUT SCENARIO...`` runs each scenario with its own monitor in one
process group and writes ``<OUT>/<scenario>-rank<k>.json``. A rank left waiting in a collective
call ends the run (faulthandler) instead of hanging the test."""

import faulthandler
import json
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

sys.path.insert(0, str(Path(__file__).parent))
from monitor_helpers import PoolSampler, classes, digits, pixels, split, tiny_unet  # noqa: E402

from irs_callbacks import IRSMonitor, MonitorOptions, ReferenceConfig  # noqa: E402
from irs_callbacks.sinks import HistorySink  # noqa: E402

TRAIN, HELD = split()
REFERENCE = ReferenceConfig(extractor=pixels, progress=False)
OPTIONS = MonitorOptions(log_images=False)


def loop(acc, out, monitor, model, steps, save_at=(), connect=None):
    """Steps 1..steps; save_state on the main process only at ``save_at`` (as diffusers' scripts);
    ``connect``: what to tell the monitor after attach."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x, _ = digits()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[TRAIN]), batch_size=16)
    model, opt, loader = acc.prepare(model, opt, loader)
    monitor.attach(acc, loader)
    if connect is not None:
        monitor.connect(**connect)
    stopped_at = None
    for step, (batch,) in enumerate(loader, start=1):
        if step in save_at and acc.is_main_process:
            acc.save_state(str(out / f"checkpoint-{step}"))
        if monitor.step(step):
            stopped_at = step
            break
        if step >= steps:
            break
    return stopped_at


def no_sampler(acc, out):
    """IRSMonitor() infers its sampler at save_state, which runs on the main process only."""
    monitor = IRSMonitor(reference=REFERENCE, num_samples=100, batch_size=50, log_dir=out, options=OPTIONS)
    stopped_at = loop(acc, out, monitor, tiny_unet(), steps=4, save_at=(2,))
    return monitor, stopped_at


def broken_outputs(acc, out):
    """The main process cannot open its outputs (a tracker factory failing)."""
    monitor = IRSMonitor(PoolSampler(HELD, replace=True), every_n_steps=2, reference=REFERENCE, num_samples=100,
                         batch_size=50, log_dir=out, options=OPTIONS)

    def tracker_factory():
        raise OSError("log folder not writable")

    # called on the main process only
    stopped_at = loop(acc, out, monitor, torch.nn.Linear(64, 64), steps=6, connect={"tensorboard": tracker_factory})
    return monitor, stopped_at


def full_disk(acc, out):
    """The history file cannot be appended to (main process only); a collapsed sampler, patience 2."""
    if acc.is_main_process:
        def write(self, result, record):
            raise OSError(28, "No space left on device")

        HistorySink.write = write
    monitor = IRSMonitor(PoolSampler(classes([3], HELD), replace=True), every_n_steps=2, patience=2,
                         reference=REFERENCE, num_samples=100, batch_size=50, log_dir=out, options=OPTIONS)
    stopped_at = loop(acc, out, monitor, torch.nn.Linear(64, 64), steps=8)
    return monitor, stopped_at


def unconnected(acc, out):
    """A monitor never attached to the accelerator, in a run of two processes."""
    monitor = IRSMonitor(PoolSampler(HELD, replace=True), every_n_steps=2, num_samples=100, batch_size=50,
                         log_dir=out, reference=ReferenceConfig(train_data=digits()[0][TRAIN], extractor=pixels,
                                                                progress=False), options=OPTIONS)
    stopped_at = None
    for step in range(1, 5):
        if monitor.step(step):
            stopped_at = step
    return monitor, stopped_at


SCENARIOS = {"no_sampler": no_sampler, "broken_outputs": broken_outputs, "full_disk": full_disk,
             "unconnected": unconnected}


def main(out, scenarios):
    faulthandler.dump_traceback_later(90, exit=True)  # a rank waiting in a collective call
    out = Path(out)
    acc = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=str(out)))
    for name in scenarios:
        folder = out / name
        monitor, stopped_at = SCENARIOS[name](acc, folder)
        acc.wait_for_everyone()
        # one more collective: both ranks are still in step (a mismatch raises or hangs here)
        ranks = acc.gather(torch.tensor([acc.process_index])).tolist()
        history_file = monitor.history_file
        result = {"rank": acc.process_index, "ranks": ranks, "stopped_at": stopped_at,
                  "history": [{k: v for k, v in r.as_dict().items() if k != "timing"} for r in monitor.history],
                  "errors": [step for step, _ in monitor.errors], "due_next": monitor.is_due(100),
                  "history_file": None if history_file is None else str(history_file),
                  "history_file_exists": history_file is not None and history_file.is_file()}
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank{acc.process_index}.json").write_text(json.dumps(result))
        monitor.close()
    acc.end_training()
    faulthandler.cancel_dump_traceback_later()
    # every result is written; about one launch in ten aborted in the interpreter's teardown
    # ("terminate called without an active exception", torch's C++ threads): skip the teardown
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
