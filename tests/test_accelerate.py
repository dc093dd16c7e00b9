"""IRSMonitor in Accelerate loops: checkpoints tied to steps at save time, state as JSON in each
checkpoint, resume in any registration order and without the monitor, automatic naming,
interrupted saves, re-runs, the sampler inferred from the prepared model."""

import json
import logging

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from irs_callbacks import IRSMonitor, latest_checkpoint
from irs_callbacks.checkpoints import STATE_FILE, read_checkpoint_state
from irs_callbacks.history import read_history
from irs_callbacks.monitor import MonitorOptions, ReferenceConfig
from irs_callbacks.pruning import LEDGER_NAME, CheckpointPruner

from monitor_helpers import PoolSampler, classes, digits, pixels, split, tiny_unet

TRAIN, HELD = split()


class ClassSampler(PoolSampler):
    """Held-out digits of the first ``n_classes`` classes, with replacement (all ten: every
    held-out digit once); records whether it was ever called inside save_state."""

    inside_save = False

    def __init__(self):
        super().__init__(HELD, replace=True)
        self.n_classes, self.called_inside_save = 1, False

    def generate(self, indices, generators):
        self.called_inside_save |= ClassSampler.inside_save
        self.replace = self.n_classes < 10
        self.pool = classes(range(self.n_classes), HELD) if self.replace else HELD
        return super().generate(indices, generators)


class Counter:
    """A stateful object registered for checkpointing (like an EMA)."""

    def __init__(self):
        self.count = 0

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


def monitor_for(pruner=None, **kwargs):
    return IRSMonitor(ClassSampler(), reference=ReferenceConfig(extractor=pixels, progress=False), num_samples=300,
                      batch_size=60, pruner=pruner, options=MonitorOptions(log_images=False), **kwargs)


def run(out, steps, *, crash_at=None, resume=None, pruner=None, monitor=True, counter_after=False, every=4,
        automatic=False, total_limit=None):
    """A toy Accelerate loop (SGD on a linear layer) whose 'model quality' is the number of digit
    classes the sampler draws from: it grows with the step, so verdicts change over time."""
    x, _ = digits()
    config = ProjectConfiguration(project_dir=str(out), automatic_checkpoint_naming=automatic, total_limit=total_limit)
    acc = Accelerator(cpu=True, project_config=config)
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[TRAIN]), batch_size=32, shuffle=True)
    model, opt, loader = acc.prepare(model, opt, loader)
    counter = Counter()
    if not counter_after:
        acc.register_for_checkpointing(counter)
    m = monitor_for(pruner).attach(acc, loader) if monitor else None
    if counter_after:
        acc.register_for_checkpointing(counter)  # e.g. an EMA registered after the monitor
    step = 0
    if resume:
        acc.load_state(str(resume))
        step = counter.count
    while step < steps:
        for (batch,) in loader:
            acc.backward(model(batch.flatten(1)).pow(2).mean())
            opt.step()
            opt.zero_grad()
            step += 1
            counter.count = step
            if m is not None:
                m.sampler.n_classes = min(10, max(1, 2 * (step // 4)))  # the "model" improves as it trains
            if step % every == 0:
                ClassSampler.inside_save = True
                try:
                    acc.save_state(None if automatic else str(out / f"checkpoint-{step}"))
                finally:
                    ClassSampler.inside_save = False
            if m is not None and m.step(step):
                return m
            if step == crash_at or step >= steps:
                return m
    return m


def strip(records):
    return [{k: v for k, v in dict(r).items() if k != "timing"} for r in records]


@pytest.mark.parametrize("resume", ["checkpoint-8", "checkpoint-12"])
def test_resume_equals_uninterrupted_and_evaluations_follow_checkpoints(tmp_path, resume):
    full = run(tmp_path / "full", 20)
    assert [r.step for r in full.history] == [4, 8, 12, 16, 20]  # one evaluation per checkpoint
    assert full.history[0].verdict == "reject" and full.history[-1].verdict == "pass"
    assert not full.sampler.called_inside_save  # never inside save_state's window
    state = read_checkpoint_state(tmp_path / "full" / "checkpoint-12")
    assert state["checkpoint"]["step"] == 12 and state["checkpoint"]["complete"]
    assert [r["step"] for r in state["monitor"]["history"]] == [4, 8, 12]  # the checkpoint holds its own verdict
    # crash at step 14, after the evaluation at 12; resume from an earlier checkpoint
    crashed = run(tmp_path / "resumed", 20, crash_at=14)
    assert [r.step for r in crashed.history] == [4, 8, 12]
    resumed = run(tmp_path / "resumed", 20, resume=tmp_path / "resumed" / resume)
    assert strip(resumed.history) == strip(full.history)
    assert strip(read_history(tmp_path / "resumed" / "irs_history.jsonl")) == strip(full.history)  # nothing twice


def test_pruning_in_a_loop_keeps_protected_and_explains(tmp_path):
    out = tmp_path / "run"
    m = run(out, 20, pruner="rejected")
    m.close()
    ledger = json.loads((out / LEDGER_NAME).read_text())["checkpoints"]
    verdicts = {r.step: r.verdict for r in m.history}
    for name, entry in ledger.items():
        assert entry["verdict"] == verdicts[entry["step"]]
        if entry["status"] == "deleted":
            assert verdicts[entry["step"]] == "reject" and not (out / name).exists()
    assert (out / "checkpoint-20").is_dir()  # newest
    assert (out / f"checkpoint-{m.best.step}").is_dir()
    assert any(e["status"] == "deleted" for e in ledger.values())


def test_registration_order_and_resume_without_the_monitor(tmp_path, caplog):
    """No custom state of the monitor in Accelerate's list: a checkpoint from before the monitor
    loads with a warning whatever was registered after it; one saved with the monitor loads in a
    script that has none."""
    run(tmp_path / "plain", 8, monitor=False)  # an existing run, no monitor yet
    with caplog.at_level(logging.WARNING, logger="irs_callbacks.monitor"):
        m = run(tmp_path / "plain", 16, resume=tmp_path / "plain" / "checkpoint-8", counter_after=True)
    assert "holds no monitor state" in caplog.text
    assert [r.step for r in m.history] == [12, 16]
    assert (tmp_path / "plain" / "checkpoint-16" / STATE_FILE).is_file()
    again = run(tmp_path / "plain", 20, resume=tmp_path / "plain" / "checkpoint-16", monitor=False)
    assert again is None  # resumed and trained to the end without the monitor
    m2 = run(tmp_path / "plain", 20, resume=tmp_path / "plain" / "checkpoint-16", counter_after=True)
    assert [r.step for r in m2.history] == [12, 16, 20]


def test_automatic_naming_and_total_limit(tmp_path, caplog):
    """checkpoints/checkpoint_<i> carry no step: each is tied to the step of its save; folders
    Accelerate's total_limit deletes are marked in the ledger; pruning still works."""
    out = tmp_path / "auto"
    with caplog.at_level(logging.WARNING, logger="irs_callbacks.monitor"):
        m = run(out, 20, automatic=True, total_limit=3, pruner=CheckpointPruner("top_k", top_k=5))
        m.close()
    ledger = json.loads((out / LEDGER_NAME).read_text())["checkpoints"]
    assert {e["step"] for e in ledger.values()} == {4, 8, 12, 16, 20}
    assert ledger["checkpoints/checkpoint_4"]["step"] == 20
    assert [e["status"] for e in ledger.values()].count("missing") == 2  # total_limit=3 of 5
    assert "deleted outside the monitor" in caplog.text
    assert latest_checkpoint(out) == out / "checkpoints" / "checkpoint_4"


def test_an_interrupted_save_is_never_the_newest_nor_a_resume_target(tmp_path):
    out = tmp_path / "run"
    m = run(out, 8)

    class Broken:
        def state_dict(self):
            raise KeyboardInterrupt  # killed while save_state writes

        def load_state_dict(self, state):
            pass

    acc_state = m.registry.newest()
    assert acc_state.step == 8 and latest_checkpoint(out) == out / "checkpoint-8"
    x, _ = digits()
    acc = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=str(out)))
    model = acc.prepare(torch.nn.Linear(4, 4))
    m2 = monitor_for().attach(acc, torch.utils.data.TensorDataset(x[TRAIN]))
    acc.register_for_checkpointing(Broken())
    with pytest.raises(KeyboardInterrupt):
        acc.save_state(str(out / "checkpoint-12"))
    assert read_checkpoint_state(out / "checkpoint-12")["checkpoint"]["complete"] is False
    assert m2.registry.newest() is None and latest_checkpoint(out) == out / "checkpoint-8"
    del model


def test_a_rerun_into_the_same_folder_keeps_its_history_and_checkpoints(tmp_path):
    out = tmp_path / "run"
    first = run(out, 12, pruner="rejected")
    first.close()
    second = run(out, 8, pruner="rejected")
    second.close()
    assert [r.step for r in read_history(out / "irs_history.jsonl")] == [4, 8]  # not [4, 8, 12, 4, 8]
    archived = [p for p in out.glob("irs_history.*.jsonl")]
    assert len(archived) == 1 and [r.step for r in read_history(archived[0])] == [4, 8, 12]
    assert (out / "checkpoint-8").is_dir()  # the second run's newest, although checkpoint-12 is higher


@pytest.mark.parametrize("pruner", [None, "rejected"])
def test_no_arguments_infers_the_sampler_from_the_saved_unet(tmp_path, caplog, pruner):
    """The inferred sampler is announced at INFO; with pruning on, whose deletions rest on that guess,
    as a WARNING that says so."""
    x, _ = digits()
    acc = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=str(tmp_path)))
    unet = tiny_unet()
    opt = torch.optim.SGD(unet.parameters(), lr=0.0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[TRAIN] * 2 - 1), batch_size=32)
    unet, opt, loader = acc.prepare(unet, opt, loader)
    m = IRSMonitor(reference=ReferenceConfig(extractor=pixels, progress=False), num_samples=40, batch_size=20,
                   pruner=pruner, options=MonitorOptions(log_images=False))
    m.attach(acc, loader)
    with caplog.at_level(logging.INFO, logger="irs_callbacks"):
        for step in range(1, 4):
            if step == 2:
                acc.save_state(str(tmp_path / "checkpoint-2"))
            m.step(step)
    assert m.sampler is not None and type(m.sampler.pipeline).__name__ == "DDIMPipeline"
    assert m.sampler.pipeline.unet is acc.unwrap_model(unet)
    assert [r.step for r in m.history] == [2]  # evaluated at the checkpoint, only there
    [record] = [r for r in caplog.records if "sampler = DDIM" in r.getMessage()]
    assert record.levelno == (logging.INFO if pruner is None else logging.WARNING)
    assert ("checkpoints deleted" in record.getMessage()) == (pruner is not None)


def test_a_pruning_problem_never_stops_the_evaluations(tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    (out / LEDGER_NAME).write_text("{cut off")  # unreadable ledger
    with caplog.at_level(logging.WARNING, logger="irs_callbacks.monitor"):
        m = run(out, 12, pruner="rejected")
        m.close()
    assert [r.step for r in m.history] == [4, 8, 12]  # every evaluation recorded
    errors = [r.message for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "pruning is off" in errors[0] and "no checkpoint will be deleted" in errors[0]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-4", "checkpoint-8"]


def test_unjudged_checkpoints_are_reported_once(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="irs_callbacks.monitor"):
        m = run(tmp_path / "run", 12, pruner="rejected", every=2)  # checkpoints every 2 steps ...
    assert [r.step for r in m.history] == [2, 4, 6, 8, 10, 12]  # ... evaluations follow them
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="irs_callbacks.monitor"):
        m = monitor_for("rejected", every_n_steps=4)
        x, _ = digits()
        acc = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=str(tmp_path / "b")))
        model = acc.prepare(torch.nn.Linear(4, 4))
        m.attach(acc, torch.utils.data.TensorDataset(x[TRAIN]))
        for step in range(1, 9):
            if step % 2 == 0:
                acc.save_state(str(tmp_path / "b" / f"checkpoint-{step}"))
            m.step(step)
        del model
    unjudged = [r for r in caplog.records if "no evaluation at its step" in r.message]
    assert len(unjudged) == 1 and "checkpoint-2" in unjudged[0].message


def test_samples_outside_their_value_range_give_no_verdict_and_delete_nothing(tmp_path, caplog):
    """A sampler returning floats in 0..255 under the default value_range (0, 1): every evaluation
    is an error naming the fix; no verdict, nothing pruned, training goes on."""

    class Bytes(ClassSampler):
        def generate(self, indices, generators):
            return super().generate(indices, generators) * 255

    x, _ = digits()
    m2 = IRSMonitor(Bytes(), reference=ReferenceConfig(extractor=pixels, progress=False), num_samples=300,
                    batch_size=60, pruner="rejected", options=MonitorOptions(log_images=False))
    acc = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=str(tmp_path / "b")))
    model = acc.prepare(torch.nn.Linear(4, 4))
    m2.attach(acc, torch.utils.data.TensorDataset(x[TRAIN]))
    with caplog.at_level(logging.ERROR, logger="irs_callbacks.monitor"):
        for step in range(1, 13):
            if step % 4 == 0:
                acc.save_state(str(tmp_path / "b" / f"checkpoint-{step}"))
            assert m2.step(step) is False
        m2.close()
    assert m2.history == [] and [step for step, _ in m2.errors] == [4, 8, 12]
    assert "divide by 255" in m2.errors[0][1] or "value_range=(0, 255)" in m2.errors[0][1]
    assert sorted(p.name for p in (tmp_path / "b").glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-4",
                                                                            "checkpoint-8"]
    del model


def test_resuming_from_another_experiments_folder_prunes_only_this_runs_folder(tmp_path):
    """A sweep run started from a parent experiment's checkpoint: the parent's checkpoints (restored
    with the history) are neither judged nor deleted, and the ledger goes beside this run's own."""
    parent, child = tmp_path / "parent", tmp_path / "child"
    run(parent, 8).close()  # its background writes finish before the folder is listed
    before = sorted(p.name for p in parent.iterdir())
    m = run(child, 20, resume=parent / "checkpoint-8", pruner="rejected")
    m.close()
    assert m.history[0].step == 4 and m.history[0].verdict == "reject"  # restored: the parent's step 4 was rejected
    assert sorted(p.name for p in parent.iterdir()) == before  # nothing deleted there, no ledger written there
    ledger = json.loads((child / LEDGER_NAME).read_text())["checkpoints"]
    assert ledger[str(parent / "checkpoint-4")]["status"] == "kept"
    assert "another folder" in ledger[str(parent / "checkpoint-4")]["reason"]
    deleted = [name for name, e in ledger.items() if e["status"] == "deleted"]
    assert deleted and all(not (child / name).exists() and name.startswith("checkpoint-") for name in deleted)


def test_a_failed_evaluation_is_not_retried_when_the_same_step_comes_again(tmp_path, caplog):
    """Gradient accumulation calls step() with the same global step once per micro-batch: a failed
    evaluation is tried once, not once per micro-batch."""
    from monitor_helpers import make_monitor

    calls = []

    def broken(batch_size, generator):
        calls.append(batch_size)
        raise RuntimeError("CUDA out of memory (simulated)")

    m = make_monitor(tmp_path, every_n_steps=4, num_samples=60, batch_size=60, tensorboard=False)
    with caplog.at_level(logging.ERROR, logger="irs_callbacks.monitor"):
        for step in [3, 3, 4, 4, 4, 4, 5]:
            m.step(step, sampler=broken)
    assert len(calls) == 1 and [s for s, _ in m.errors] == [4] and "out of memory" in m.errors[0][1]
    assert sum("evaluation at step 4 failed" in r.message for r in caplog.records) == 1
    m.step(8, sampler=PoolSampler(HELD, replace=False))
    assert [r.step for r in m.history] == [8]  # the next due step is evaluated as usual
    m.close()
