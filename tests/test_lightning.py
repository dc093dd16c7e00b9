"""IRSCallback in a tiny Lightning fit: metric for ModelCheckpoint, logger output, should_stop."""

import importlib
import sys

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from irs_callbacks.lightning import IRSCallback  # noqa: E402
from irs_callbacks.monitor import MonitorOptions, ReferenceConfig  # noqa: E402

from monitor_helpers import PoolSampler, classes, digits, pixels, split  # noqa: E402

TRAIN, HELD = split()
PIXELS = ReferenceConfig(extractor=pixels, progress=False)


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(64, 64)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.layer(x.flatten(1)).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def improving_sampler(module):
    """'Model quality' grows with the step: 2, 4, 6, 8 classes, then every held-out digit."""
    n = 2 * (module.trainer.global_step // 2)
    return PoolSampler(HELD, replace=False) if n >= 10 else PoolSampler(classes(range(n), HELD), replace=True)


def fit(tmp_path, callback, max_steps):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    x, _ = digits()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[TRAIN]), batch_size=32, shuffle=True)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="irs/adjusted", mode="max", save_top_k=1,
                           every_n_train_steps=2)
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=TensorBoardLogger(tmp_path, name="tb"),
                         callbacks=[callback, ckpt], enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=True, num_sanity_val_steps=0, log_every_n_steps=1)
    trainer.fit(Tiny(), loader)
    return trainer, ckpt


def test_callback_feeds_model_checkpoint_and_logger(tmp_path):
    cb = IRSCallback(sampler_factory=improving_sampler, reference=PIXELS, every_n_steps=2, num_samples=300,
                     batch_size=100)
    trainer, ckpt = fit(tmp_path, cb, max_steps=10)
    history = cb.monitor.history
    assert [r["step"] for r in history] == [2, 4, 6, 8, 10]
    assert len(cb.monitor.reference.train_data) == len(TRAIN)  # found in the trainer
    assert history[0]["verdict"] == "reject" and history[-1]["verdict"] == "pass"
    assert float(trainer.callback_metrics["irs/adjusted"]) == pytest.approx(history[-1]["adjusted"], rel=1e-6)
    best = max(history, key=lambda r: r["adjusted"])
    assert float(ckpt.best_model_score) == pytest.approx(best["adjusted"], rel=1e-6)
    assert f"step={best['step']}" in ckpt.best_model_path
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(trainer.logger.log_dir), size_guidance={"scalars": 0, "histograms": 0})
    ea.Reload()
    assert {"irs/adjusted", "irs/estimate", "irs/k_min", "irs/verdict"} <= set(ea.Tags()["scalars"])
    assert [e.step for e in ea.Scalars("irs/n_learned")] == [2, 4, 6, 8, 10]
    assert "irs/hits" in ea.Tags()["histograms"]
    # history file in the logger's directory; the callback state round-trips
    assert cb.monitor.history_file.parent == type(cb.monitor.history_file)(trainer.log_dir)
    clone = IRSCallback(reference=PIXELS)
    clone.load_state_dict(cb.state_dict())
    assert clone.monitor.history == history


def test_patience_sets_should_stop(tmp_path):
    collapsed = PoolSampler(classes([7], HELD), replace=True)
    cb = IRSCallback(collapsed, reference=PIXELS, every_n_steps=2, num_samples=200, batch_size=100, patience=2,
                     options=MonitorOptions(log_images=False))
    trainer, _ = fit(tmp_path, cb, max_steps=20)
    assert [r["verdict"] for r in cb.monitor.history] == ["reject", "reject"]
    assert trainer.global_step == 4 and trainer.should_stop


def test_arguments_and_missing_lightning_message(monkeypatch):
    with pytest.raises(ValueError, match="either sampler"):
        IRSCallback(lambda b, g: None, sampler_factory=lambda m: None)
    with pytest.raises(TypeError, match="sampler_factory"):
        IRSCallback(sampler_factory=3)
    # Lightning's checkpoints never reach the monitor: a pruner would silently prune nothing
    from irs_callbacks import IRSMonitor

    for kwargs in ({"pruner": "rejected"}, {"monitor": IRSMonitor(pruner="top_k")}):
        with pytest.raises(ValueError, match=r"pruner.*ModelCheckpoint\(monitor=\"irs/adjusted\", .*save_top_k"):
            IRSCallback(**kwargs)
    for name in ("lightning", "lightning.pytorch", "lightning.pytorch.callbacks", "pytorch_lightning",
                 "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, name, None)  # import of any of them raises ImportError
    monkeypatch.delitem(sys.modules, "irs_callbacks.lightning")
    with pytest.raises(ImportError, match=r"irs-callbacks\[lightning\]"):
        importlib.import_module("irs_callbacks.lightning")
