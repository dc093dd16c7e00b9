"""IRSMonitor: verdicts on samplers of known diversity, reproducibility, training state, NaN
handling, early stopping, Accelerate integration (attach / checkpoints / resume / pruning)."""

import json
import logging
import random

import numpy as np
import pytest
import torch

from irs_callbacks import IRSMonitor
from irs_callbacks.monitor import EvaluationError, default_budget
from irs_callbacks.samplers import CallableSampler, PipelineSampler, as_sampler, preserved_training_state
from irs_callbacks.stats import SequentialRejectionTest, irs_infinity
from irs_callbacks.tracking import read_history

from monitor_helpers import NaNSampler, PoolSampler, classes, digits, pixels, split, tiny_pipeline, tiny_unet

TRAIN, HELD = split()


def make_monitor(tmp_path, **kw):
    x, _ = digits()
    options = dict(train_data=x[TRAIN], extractor=pixels, num_samples=500, batch_size=50, log_dir=tmp_path,
                   progress=False, log_images=False)
    options.update(kw)
    return IRSMonitor(**options)


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    """One reference bank for the module (training digits, pixel features)."""
    m = make_monitor(tmp_path_factory.mktemp("bank"))
    return m._ensure_reference()


def test_defaults_and_bad_arguments():
    m = IRSMonitor()
    assert (m.every_n_steps, m.target_irs, m.alpha_e, m.patience, m.strict) == (500, 0.8, 0.05, None, False)
    assert default_budget(1797) == 1000 and default_budget(500) == 500 and default_budget(10**6) == 10_000
    for kwargs, word in [({"every_n_steps": 0}, "every_n_steps"), ({"target_irs": 1.5}, "target_irs"),
                         ({"alpha_e": 0}, "alpha_e"), ({"prune": "all"}, "prune"), ({"patience": 0}, "patience"),
                         ({"batch_size": 2.5}, "batch_size"), ({"distance": "l1"}, "distance")]:
        with pytest.raises(ValueError, match=word):
            IRSMonitor(**kwargs)
    with pytest.raises(ValueError, match="sampler"):
        IRSMonitor().evaluate()
    with pytest.raises(TypeError, match="sampler"):
        as_sampler(42)


def test_heldout_real_digits_pass_and_two_classes_are_rejected_early(tmp_path, bank):
    """Acceptance: target 0.8 -- held-out real digits (without replacement) pass; real digits of
    2 of the 10 classes are rejected within 25% of the budget."""
    budget = len(HELD)  # no larger than the held-out set
    m = make_monitor(tmp_path, reference_bank=bank, num_samples=budget, target_irs=0.8)
    real = m.evaluate(PoolSampler(HELD, replace=False), step=1)
    assert real.verdict == "pass" and real.adjusted > 0.8
    two = m.evaluate(PoolSampler(classes([0, 1], HELD), replace=True), step=2)
    assert two.verdict == "reject" and two.stopped_early
    assert two.samples_used <= 0.25 * budget
    # the figures are the library's own statistics on the counts
    # k_min on the adjusted scale, real data taken at the budget's sampling rate
    assert two.k_min == SequentialRejectionTest(bank.n_train, 0.8, budget, real_irs=bank.real_at(budget).estimate).k_min
    assert two.estimate == irs_infinity(two.n_learned, two.samples_used, bank.n_train)
    assert two.real == bank.real_at(two.samples_used) and two.real.n_samples < bank.real.n_samples
    assert two.adjusted == pytest.approx(two.estimate.estimate / bank.real_at(two.samples_used).estimate)
    assert two.n_learned <= len(classes([0, 1], HELD))
    # curve: one point per batch, samples and N_learned never decrease
    curve = np.array(two.curve)
    assert curve[-1].tolist() == [two.samples_used, two.n_learned] and (np.diff(curve, axis=0) >= 0).all()
    assert int(two.hits.sum()) == two.samples_used


def test_same_seed_same_result_and_batch_size_does_not_matter(tmp_path, bank):
    sampler = PoolSampler(TRAIN, replace=True)
    a = make_monitor(tmp_path, reference_bank=bank, batch_size=50).evaluate(sampler)
    b = make_monitor(tmp_path, reference_bank=bank, batch_size=50).evaluate(sampler)
    c = make_monitor(tmp_path, reference_bank=bank, batch_size=50, seed=1).evaluate(sampler)
    assert torch.equal(a.hits, b.hits) and not torch.equal(a.hits, c.hits)
    # batch size changes where the looks fall, never which image each sample is
    full = make_monitor(tmp_path, reference_bank=bank, batch_size=500, interim_alpha=0.0).evaluate(sampler)
    small = make_monitor(tmp_path, reference_bank=bank, batch_size=7, interim_alpha=0.0).evaluate(sampler)
    n = min(full.samples_used, small.samples_used)
    assert small.curve[n // 7 - 1][0] == (n // 7) * 7
    idx = torch.arange(full.samples_used)
    assert torch.equal(sampler.sample(idx.tolist(), 0), torch.cat([sampler.sample(idx[i:i + 7].tolist(), 0)
                                                                   for i in range(0, len(idx), 7)]))


def test_fixed_noise_by_default_new_noise_per_step_on_request(tmp_path, bank):
    sampler = PoolSampler(TRAIN, replace=True)
    m = make_monitor(tmp_path, reference_bank=bank)
    assert torch.equal(m.evaluate(sampler, step=100).hits, m.evaluate(sampler, step=200).hits)
    m2 = make_monitor(tmp_path, reference_bank=bank, fixed_noise=False)
    assert not torch.equal(m2.evaluate(sampler, step=100).hits, m2.evaluate(sampler, step=200).hits)


def test_pipeline_sampler_leaves_training_state_alone(tmp_path, bank):
    unet = tiny_unet()
    unet.train()
    pipe = tiny_pipeline(unet=unet)
    m = make_monitor(tmp_path, reference_bank=bank, num_samples=40, batch_size=20, num_inference_steps=2)
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    flags = [mod.training for mod in unet.modules()]
    r1 = m.evaluate(pipe)
    assert [mod.training for mod in unet.modules()] == flags and unet.training
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]
    assert not hasattr(pipe, "_progress_bar_config") or not pipe._progress_bar_config.get("disable")
    # reproducible, and per-sample seeded: the split into batches does not change the images
    assert torch.equal(m.evaluate(pipe).hits, r1.hits)
    s = as_sampler(pipe, num_inference_steps=2)
    assert isinstance(s, PipelineSampler)
    with preserved_training_state(s.modules()), s.context():
        whole = s.sample(range(6), seed=3)
        parts = torch.cat([s.sample(range(0, 2), 3), s.sample(range(2, 6), 3)])
    assert whole.shape == (6, 1, 8, 8) and 0 <= whole.min() and whole.max() <= 1
    torch.testing.assert_close(whole, parts, rtol=1e-4, atol=1e-5)


def test_ema_weights_are_used_for_sampling_and_training_weights_restored():
    from diffusers.training_utils import EMAModel

    unet = tiny_unet()
    ema = EMAModel(unet.parameters(), decay=0.9)
    with torch.no_grad():
        for p in ema.shadow_params:
            p.mul_(0.5)
    pipe = tiny_pipeline(unet=unet)
    before = [p.detach().clone() for p in unet.parameters()]
    plain, with_ema = as_sampler(pipe, num_inference_steps=2), as_sampler(pipe, num_inference_steps=2, ema=ema)
    out = []
    for s in (plain, with_ema):
        with preserved_training_state(s.modules()), s.context():
            out.append(s.sample(range(4), seed=0))
    assert not torch.allclose(out[0], out[1])
    assert all(torch.equal(a, b) for a, b in zip(before, unet.parameters()))
    # the EMA sample equals a sample of a model holding the EMA weights
    twin = tiny_unet()
    ema.copy_to(twin.parameters())
    s = as_sampler(tiny_pipeline(unet=twin), num_inference_steps=2)
    with preserved_training_state(s.modules()), s.context():
        torch.testing.assert_close(s.sample(range(4), seed=0), out[1])


def test_callable_sampler_value_range_and_generator_kinds(tmp_path, bank):
    x, _ = digits()
    pool = x[HELD]

    def fn(batch_size, generator):
        gens = generator if isinstance(generator, list) else [generator] * batch_size
        return torch.stack([pool[int(torch.randint(len(pool), (1,), generator=g))] for g in gens]) * 2 - 1

    m = make_monitor(tmp_path, reference_bank=bank, num_samples=200)
    r_list = m.evaluate(CallableSampler(fn, (-1, 1), per_sample_generators=True))
    r_one = m.evaluate(as_sampler(fn, value_range=(-1, 1)))
    # per-sample generators: exactly the images of the equivalent Sampler subclass
    assert torch.equal(r_list.hits, m.evaluate(PoolSampler(HELD, replace=True)).hits)
    assert r_one.samples_used > 0 and r_one.n_learned > 0
    # wrong declared range ([-1, 1] images declared (0, 1)): an error naming the fix, no result
    with pytest.raises(Exception, match=r"outside value_range=\(0, 1\).*pass value_range=\(-1, 1\)"):
        m.evaluate(CallableSampler(fn, (0, 1), per_sample_generators=True))
    with pytest.raises(ValueError, match="value_range"):
        CallableSampler(fn, (1, 0))
    with pytest.raises(ValueError, match="ema"):
        as_sampler(fn, ema=object())


def test_nan_samples_are_failures_logged_not_fatal(tmp_path, bank, caplog):
    m = make_monitor(tmp_path, reference_bank=bank, num_samples=200, every_n_steps=10)
    with caplog.at_level(logging.WARNING, logger="irs_callbacks.monitor"):
        assert m.step(10, sampler=NaNSampler(TRAIN, every=10)) is False
    rec = m.history[-1]
    assert rec["n_invalid"] == rec["samples_used"] // 10 + (rec["samples_used"] % 10 > 0)
    assert rec["n_invalid"] > 0 and "NaN/Inf" in caplog.text
    assert read_history(m.history_file)[-1]["n_invalid"] == rec["n_invalid"]
    # the estimate uses the valid samples only
    assert rec["estimate"] == irs_infinity(rec["n_learned"], rec["samples_used"] - rec["n_invalid"], bank.n_train).estimate
    strict = make_monitor(tmp_path, reference_bank=bank, num_samples=200, every_n_steps=10, strict=True)
    with pytest.raises(EvaluationError, match="NaN"):
        strict.step(10, sampler=NaNSampler(TRAIN, every=10))


def test_broken_sampler_does_not_stop_training_unless_strict(tmp_path, bank, caplog):
    def broken(batch_size, generator):
        raise RuntimeError("CUDA out of memory (simulated)")

    m = make_monitor(tmp_path, reference_bank=bank, every_n_steps=5)
    with caplog.at_level(logging.WARNING, logger="irs_callbacks.monitor"):
        assert m.step(5, sampler=broken) is False
    assert "out of memory" in caplog.text and m.history == []
    with pytest.raises(EvaluationError, match="out of memory"):
        make_monitor(tmp_path, reference_bank=bank, every_n_steps=5, strict=True).step(5, sampler=broken)


def test_schedule_warmup_and_patience(tmp_path, bank):
    collapsed = PoolSampler(classes([3], HELD), replace=True)
    m = make_monitor(tmp_path, reference_bank=bank, every_n_steps=10, start_step=20, patience=2)
    stops = {step: m.step(step, sampler=collapsed) for step in range(1, 51)}
    assert [r["step"] for r in m.history] == [20, 30]  # nothing before the warm-up; stop after 2
    assert all(r["verdict"] == "reject" for r in m.history)
    assert not any(v for s, v in stops.items() if s < 30) and all(v for s, v in stops.items() if s >= 30)
    # a pass resets the count
    m2 = make_monitor(tmp_path, reference_bank=bank, every_n_steps=10, patience=2)
    m2.step(10, sampler=collapsed)
    m2.step(20, sampler=PoolSampler(HELD, replace=False))
    assert m2.step(30, sampler=collapsed) is False and m2.consecutive_rejections == 1
    # the same step twice (gradient accumulation) evaluates once
    m2.step(30, sampler=collapsed)
    assert [r["step"] for r in m2.history] == [10, 20, 30]


def test_evaluate_without_step_is_not_recorded(tmp_path, bank):
    m = make_monitor(tmp_path, reference_bank=bank, num_samples=100)
    r = m.evaluate(PoolSampler(HELD, replace=False))
    assert r.step is None and m.history == [] and m.history_file is None or not m.history_file.exists()
    assert r.verdict in ("pass", "reject") and r.irs_alpha == r.n_learned / bank.n_train


def test_reference_bank_from_file_and_cache(tmp_path, bank):
    path = bank.save(tmp_path / "bank.safetensors")
    m = make_monitor(tmp_path, reference_bank=str(path), num_samples=100)
    r = m.evaluate(PoolSampler(HELD, replace=False))
    assert r.n_train == bank.n_train and r.real == bank.real_at(100)
    # built from data: features cached under log_dir/reference_cache
    built = make_monitor(tmp_path / "b")
    built._ensure_reference()
    assert list((tmp_path / "b" / "reference_cache").glob("reference-*.safetensors"))


# ---------------------------------------------------------------------------- Accelerate


class ClassSampler(PoolSampler):
    """Held-out digits of the first ``n_classes`` classes, with replacement."""

    def __init__(self):
        super().__init__(HELD, replace=True)
        self.n_classes = 1

    def generate(self, indices, generators):
        self.replace = self.n_classes < 10  # fully trained: every held-out digit, once
        self.pool = classes(range(self.n_classes), HELD) if self.replace else HELD
        return super().generate(indices, generators)


def accelerate_run(out, steps, *, crash_at=None, resume=None, prune=None, sampler_factory=None):
    """A toy Accelerate loop (SGD on a linear layer) whose 'model quality' is the number of digit
    classes the sampler can draw from: it grows with the step, so verdicts change over time."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    x, _ = digits()
    acc = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=str(out)))
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[TRAIN]), batch_size=32, shuffle=True)
    model, opt, loader = acc.prepare(model, opt, loader)
    monitor = IRSMonitor(extractor=pixels, num_samples=300, batch_size=60, every_n_steps=4, progress=False,
                         log_images=False, prune=prune)
    sampler = ClassSampler()
    monitor.attach(acc, sampler=sampler)
    assert monitor.train_data is not None and len(monitor.train_data) == len(TRAIN)
    state = {"step": 0}
    if resume:
        acc.load_state(str(out / resume))
        state["step"] = int(resume.split("-")[1])
    while state["step"] < steps:
        for (batch,) in loader:
            loss = model(batch.flatten(1)).pow(2).mean()
            acc.backward(loss)
            opt.step()
            opt.zero_grad()
            state["step"] += 1
            step = state["step"]
            sampler.n_classes = min(10, 2 * (step // 4))  # the "model" improves as it trains
            if step % 4 == 0:
                acc.save_state(str(out / f"checkpoint-{step}"))
            if monitor.step(step):
                return monitor
            if step == crash_at:
                return monitor
            if step >= steps:
                break
    return monitor


def strip(records):
    return [{k: v for k, v in r.items() if k != "timing"} for r in records]


@pytest.mark.parametrize("resume", ["checkpoint-8", "checkpoint-12"])
def test_accelerate_attach_checkpoint_resume_equals_uninterrupted(tmp_path, resume):
    full = accelerate_run(tmp_path / "full", 20)
    assert [r["step"] for r in full.history] == [4, 8, 12, 16, 20]
    assert full.history[0]["verdict"] == "reject" and full.history[-1]["verdict"] == "pass"
    # crash at step 14, after the evaluation at 12 was logged; resume from an earlier checkpoint
    # (checkpoint-12 holds the evaluation at 12: save_state's hook runs it before saving the state)
    crashed = accelerate_run(tmp_path / "resumed", 20, crash_at=14)
    assert [r["step"] for r in crashed.history] == [4, 8, 12]
    resumed = accelerate_run(tmp_path / "resumed", 20, resume=resume)
    assert strip(resumed.history) == strip(full.history)
    on_disk = read_history(tmp_path / "resumed" / "irs_history.jsonl")
    assert strip(on_disk) == strip(full.history)  # nothing counted twice


def test_accelerate_pruning_keeps_protected_and_explains(tmp_path):
    out = tmp_path / "run"
    m = accelerate_run(out, 20, prune="rejected")
    ledger = json.loads((out / "irs_pruning_ledger.json").read_text())["checkpoints"]
    verdicts = {r["step"]: r["verdict"] for r in m.history}
    for name, entry in ledger.items():
        step = int(name.split("-")[1])
        assert entry["verdict"] == verdicts[step]
        if entry["status"] == "deleted":
            assert verdicts[step] == "reject" and not (out / name).exists()
    assert (out / "checkpoint-20").is_dir()  # newest
    best = max(m.history, key=lambda r: r["score"])["step"]
    assert (out / f"checkpoint-{best}").is_dir()
    assert any(e["status"] == "deleted" for e in ledger.values())


def test_resume_from_a_checkpoint_saved_before_the_monitor_was_added(tmp_path, caplog):
    from accelerate import Accelerator

    def prepared():
        acc = Accelerator(cpu=True)
        model = acc.prepare(torch.nn.Linear(4, 4))
        return acc, model

    acc, _ = prepared()
    acc.save_state(str(tmp_path / "checkpoint-4"))  # an existing run, no monitor yet
    acc, _ = prepared()
    x, _ = digits()
    m = IRSMonitor(PoolSampler(HELD, replace=False), train_data=x[TRAIN], extractor=pixels, num_samples=100,
                   every_n_steps=4, log_dir=tmp_path, progress=False, log_images=False).attach(acc)
    with caplog.at_level(logging.WARNING, logger="irs_callbacks.monitor"):
        acc.load_state(str(tmp_path / "checkpoint-4"))
    assert "no monitor state" in caplog.text and m.history == []
    m.step(8)
    acc.save_state(str(tmp_path / "checkpoint-8"))
    assert (tmp_path / "checkpoint-8" / "custom_checkpoint_0.pkl").exists()  # registered again
    fresh = IRSMonitor(extractor=pixels)
    acc2, _ = prepared()
    fresh.attach(acc2)
    acc2.load_state(str(tmp_path / "checkpoint-8"))
    assert [r["step"] for r in fresh.history] == [8]
