"""Worker for tests/test_distributed.py: a toy Accelerate loop with IRSMonitor, run with 1 process
or under ``accelerate launch --num_processes 2 --cpu``. Writes ``<out>/rank<k>.json``."""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

sys.path.insert(0, str(Path(__file__).parent))
from monitor_helpers import PoolSampler, classes, digits, pixels, split  # noqa: E402

from irs_callbacks import IRSMonitor, MonitorOptions, ReferenceConfig  # noqa: E402

TRAIN, HELD = split()
# "model quality" at each evaluation step: classes available (10 = every held-out digit, once)
QUALITY = {4: 2, 8: 10, 12: 1, 16: 1, 20: 10}


class Recording(PoolSampler):
    def __init__(self):
        super().__init__(HELD, replace=True)
        self.n_classes, self.seen = 1, []

    def generate(self, indices, generators):
        self.seen += list(indices)
        self.replace = self.n_classes < 10
        self.pool = classes(range(self.n_classes), HELD) if self.replace else HELD
        return super().generate(indices, generators)


def main(out):
    out = Path(out)
    x, _ = digits()
    acc = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=str(out)))
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[TRAIN]), batch_size=16)
    model, opt, loader = acc.prepare(model, opt, loader)
    sampler = Recording()
    shard = len(sys.argv) < 3 or sys.argv[2] != "replicate"
    monitor = IRSMonitor(sampler, reference=ReferenceConfig(extractor=pixels, progress=False), num_samples=300,
                         batch_size=50, patience=2, pruner="rejected",
                         options=MonitorOptions(log_images=False, shard_bank=shard)).attach(acc, loader)
    step, stopped_at = 0, None
    for (batch,) in loader:
        acc.backward(model(batch.flatten(1)).pow(2).mean())
        opt.step()
        opt.zero_grad()
        step += 1
        sampler.n_classes = QUALITY.get(step, sampler.n_classes)
        if step % 4 == 0:
            acc.save_state(str(out / f"checkpoint-{step}"))
        if monitor.step(step):
            stopped_at = step
            break
        if step >= 20:
            break
    acc.wait_for_everyone()
    monitor.close()
    history = [{k: v for k, v in r.items() if k != "timing"} for r in monitor.history]
    result = {"rank": acc.process_index, "world": acc.num_processes, "history": history, "stopped_at": stopped_at,
              "seen": sampler.seen, "history_file": str(monitor.history_file) if monitor.history_file else None,
              "search": type(monitor.engine.reference.search).__name__}
    (out / f"rank{acc.process_index}.json").write_text(json.dumps(result))
    acc.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
