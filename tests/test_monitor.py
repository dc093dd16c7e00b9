"""IRSMonitor and its parts: verdicts on samplers of known diversity, reproducibility, training
state, NaN handling, early stopping, failures, logging, the engine on its own."""

import inspect
import logging
import random

import numpy as np
import pytest
import torch

from irs_callbacks import IRSMonitor
from irs_callbacks.evaluation import EvaluationEngine, EvaluationError, EvaluationSettings, default_budget
from irs_callbacks.history import read_history
from irs_callbacks.monitor import MonitorOptions, ReferenceConfig
from irs_callbacks.reference_setup import prepare_reference
from irs_callbacks.samplers import CallableSampler, PipelineSampler, as_sampler, preserved_training_state
from irs_callbacks.stats import SequentialRejectionTest, irs_infinity
from irs_callbacks.stopping import EarlyStopping
from irs_callbacks.tracking import TensorBoardLogger

from monitor_helpers import (NaNSampler, PoolSampler, classes, digits, make_monitor, pixels, split, tiny_pipeline,
                             tiny_unet)

TRAIN, HELD = split()


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    """One reference bank for the module (training digits, pixel features)."""
    return make_monitor(tmp_path_factory.mktemp("bank")).prepare()


def test_defaults_and_bad_arguments():
    m = IRSMonitor()
    assert (m.every_n_steps, m.settings.target_irs, m.settings.alpha_e, m.stopping.patience, m.strict) == \
        (None, 0.8, 0.05, None, False)
    assert default_budget(1797) == 1000 and default_budget(500) == 500 and default_budget(10**6) == 10_000
    for kwargs, word in [({"every_n_steps": 0}, "every_n_steps"), ({"target_irs": 1.5}, "target_irs"),
                         ({"alpha_e": 0}, "alpha_e"), ({"pruner": "all"}, "pruner"), ({"patience": 0}, "patience"),
                         ({"batch_size": 2.5}, "batch_size")]:
        with pytest.raises(ValueError, match=word):
            IRSMonitor(**kwargs)
    with pytest.raises(ValueError, match="distance"):
        ReferenceConfig(distance="l1")
    with pytest.raises(ValueError, match="sampler"):
        IRSMonitor().evaluate()
    with pytest.raises(TypeError, match="sampler"):
        as_sampler(42)
    # one validation rule everywhere: numpy float32 probabilities and tensor steps are fine
    assert IRSMonitor(alpha_e=np.float32(0.05)).settings.alpha_e == pytest.approx(0.05)


def test_signature_is_small_and_groups_rare_options():
    """At most 14 parameters; sampler and pruner are configured objects, rare options grouped."""
    parameters = list(inspect.signature(IRSMonitor.__init__).parameters)[1:]
    assert len(parameters) <= 14, parameters
    for re_exported in ("num_inference_steps", "ema", "top_k", "dry_run", "output_dir", "extractor"):
        assert re_exported not in parameters


def test_heldout_real_digits_pass_and_two_classes_are_rejected_early(tmp_path, bank):
    """Acceptance: target 0.8 -- held-out real digits (without replacement) pass; real digits of
    2 of the 10 classes are rejected within 25% of the budget."""
    budget = len(HELD)  # no larger than the held-out set
    m = make_monitor(tmp_path, bank=bank, num_samples=budget, target_irs=0.8)
    real = m.evaluate(PoolSampler(HELD, replace=False), step=1)
    assert real.verdict == "pass" and real.adjusted > 0.8
    two = m.evaluate(PoolSampler(classes([0, 1], HELD), replace=True), step=2)
    assert two.verdict == "reject" and two.stopped_early
    assert two.samples_used <= 0.25 * budget
    # the figures are the library's own statistics on the counts
    assert two.k_min == SequentialRejectionTest(bank.n_train, 0.8, budget, real_irs=bank.real_at(budget).estimate).k_min
    assert two.estimate == irs_infinity(two.n_learned, two.samples_used, bank.n_train)
    assert two.real == bank.real_at(two.samples_used) and two.real.n_samples < bank.real.n_samples
    assert two.adjusted == pytest.approx(two.estimate.estimate / bank.real_at(two.samples_used).estimate)
    assert two.n_learned <= len(classes([0, 1], HELD))
    curve = np.array(two.curve)  # one point per batch, samples and N_learned never decrease
    assert curve[-1].tolist() == [two.samples_used, two.n_learned] and (np.diff(curve, axis=0) >= 0).all()
    assert int(two.hits.sum()) == two.samples_used


def test_engine_runs_without_monitor_files_or_accelerate(tmp_path, bank):
    """The evaluation engine on its own gives the monitor's result and writes nothing."""
    m = make_monitor(tmp_path / "m", bank=bank, num_samples=300)
    prepared = prepare_reference(ReferenceConfig(bank=bank, extractor=pixels), device="cpu")
    engine = EvaluationEngine(prepared, settings=EvaluationSettings(num_samples=300, batch_size=50))
    sampler = PoolSampler(HELD, replace=True)
    alone = engine.run(sampler)
    assert torch.equal(alone.hits, m.evaluate(sampler).hits)
    # N_learned is the brute-force count of the distinct nearest training images of those very
    # samples; a sampler that can only draw the 597 held-out digits (about half the diversity of the
    # 1200 training digits) is rejected against target 0.8
    n = alone.samples_used
    assert alone.n_learned == brute_force_learned(sampler.sample(list(range(n)), 0))
    assert alone.verdict == "reject" and n < 300
    assert not (tmp_path / "m").exists()  # neither the engine nor an unrecorded evaluation wrote files


def test_same_seed_same_result_and_batch_size_does_not_matter(tmp_path, bank):
    sampler = PoolSampler(TRAIN, replace=True)
    a = make_monitor(tmp_path, bank=bank).evaluate(sampler)
    b = make_monitor(tmp_path, bank=bank).evaluate(sampler)
    c = make_monitor(tmp_path, bank=bank, seed=1).evaluate(sampler)
    assert torch.equal(a.hits, b.hits) and not torch.equal(a.hits, c.hits)
    # batch size changes where the looks fall, never which image each sample is
    small = make_monitor(tmp_path, bank=bank, batch_size=7).evaluate(sampler)
    n = small.samples_used
    assert small.curve[n // 7 - 1][0] == (n // 7) * 7
    idx = torch.arange(n)
    assert torch.equal(sampler.sample(idx.tolist(), 0), torch.cat([sampler.sample(idx[i:i + 7].tolist(), 0)
                                                                   for i in range(0, len(idx), 7)]))


def test_fixed_noise_by_default_new_noise_per_step_on_request(tmp_path, bank):
    sampler = PoolSampler(TRAIN, replace=True)
    m = make_monitor(tmp_path, bank=bank)
    assert torch.equal(m.evaluate(sampler, step=100).hits, m.evaluate(sampler, step=200).hits)
    m2 = make_monitor(tmp_path / "2", bank=bank, fixed_noise=False)
    assert not torch.equal(m2.evaluate(sampler, step=100).hits, m2.evaluate(sampler, step=200).hits)


def next_draws() -> tuple:
    """The next values of torch's, numpy's and Python's global random streams (exact floats)."""
    return tuple(torch.rand(3).tolist()), tuple(np.random.rand(3).tolist()), random.random()


def seed_streams(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def seed_streams_and_peek(seed: int) -> tuple:
    """Seed the three global streams, return their next draws and seed them again: code run next
    must leave the streams where they were (``next_draws() == result``)."""
    seed_streams(seed)
    expected = next_draws()
    seed_streams(seed)
    return expected


def test_pipeline_sampler_leaves_training_state_alone(tmp_path, bank):
    unet = tiny_unet()
    unet.train()
    pipe = tiny_pipeline(unet=unet)
    pipe.set_progress_bar_config(leave=False)
    m = make_monitor(tmp_path, bank=bank, num_samples=40, batch_size=20)
    sampler = PipelineSampler(pipe, num_inference_steps=2)
    expected = seed_streams_and_peek(123)
    flags = [mod.training for mod in unet.modules()]
    r1 = m.evaluate(sampler)
    assert [mod.training for mod in unet.modules()] == flags and unet.training
    assert next_draws() == expected
    # the user's pipeline object is untouched: its own progress-bar settings stay
    assert pipe._progress_bar_config == {"leave": False}
    assert sampler.generator_device == str(pipe.device)  # noise drawn where the model runs: no diffusers warning
    # reproducible, and per-sample seeded: the split into batches does not change the images
    assert torch.equal(m.evaluate(sampler).hits, r1.hits)
    with preserved_training_state(sampler.modules()), sampler.context():
        whole = sampler.sample(range(6), seed=3)
        parts = torch.cat([sampler.sample(range(0, 2), 3), sampler.sample(range(2, 6), 3)])
    assert whole.shape == (6, 1, 8, 8) and 0 <= whole.min() and whole.max() <= 1
    torch.testing.assert_close(whole, parts, rtol=1e-4, atol=1e-5)


def test_an_evaluation_of_a_pipeline_is_quiet(tmp_path, bank, capfd):
    """Five batches through a diffusers pipeline: no progress bar, no Python warning, no diffusers
    warning (issue 12: nothing third-party repeated per batch)."""
    import warnings

    pipe = tiny_pipeline()
    records = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    diffusers_logger = logging.getLogger("diffusers")
    diffusers_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make_monitor(tmp_path, bank=bank, num_samples=50, batch_size=10, tensorboard=False).evaluate(
                PipelineSampler(pipe, num_inference_steps=2))
    finally:
        diffusers_logger.removeHandler(handler)
    assert [str(w.message) for w in caught] == [] and [r.getMessage() for r in records] == []
    assert "%|" not in capfd.readouterr().err  # the pipeline's tqdm bar stayed silent


def test_ema_weights_are_used_for_sampling_and_training_weights_restored():
    from diffusers.training_utils import EMAModel

    unet = tiny_unet()
    ema = EMAModel(unet.parameters(), decay=0.9)
    with torch.no_grad():
        for p in ema.shadow_params:
            p.mul_(0.5)
    pipe = tiny_pipeline(unet=unet)
    before = [p.detach().clone() for p in unet.parameters()]
    plain, with_ema = PipelineSampler(pipe, num_inference_steps=2), PipelineSampler(pipe, num_inference_steps=2, ema=ema)
    out = []
    for s in (plain, with_ema):
        with preserved_training_state(s.modules()), s.context():
            out.append(s.sample(range(4), seed=0))
    assert not torch.allclose(out[0], out[1])
    assert all(torch.equal(a, b) for a, b in zip(before, unet.parameters()))
    twin = tiny_unet()  # the EMA sample equals a sample of a model holding the EMA weights
    ema.copy_to(twin.parameters())
    s = PipelineSampler(tiny_pipeline(unet=twin), num_inference_steps=2)
    with preserved_training_state(s.modules()), s.context():
        torch.testing.assert_close(s.sample(range(4), seed=0), out[1])


def test_callable_sampler_value_range_and_generator_kinds(tmp_path, bank):
    x, _ = digits()
    pool = x[HELD]

    def fn(batch_size, generator):
        gens = generator if isinstance(generator, list) else [generator] * batch_size
        return torch.stack([pool[int(torch.randint(len(pool), (1,), generator=g))] for g in gens]) * 2 - 1

    m = make_monitor(tmp_path, bank=bank, num_samples=200)
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
    m = make_monitor(tmp_path, bank=bank, num_samples=200, every_n_steps=10)
    with caplog.at_level(logging.WARNING, logger="irs_callbacks.monitor"):
        assert m.step(10, sampler=NaNSampler(TRAIN, every=10)) is False
    rec = m.history[-1]
    assert rec.n_invalid == rec.samples_used // 10 + (rec.samples_used % 10 > 0)
    assert rec.n_invalid > 0 and "NaN/Inf" in caplog.text
    assert read_history(m.history_file)[-1].n_invalid == rec.n_invalid
    # the estimate uses the valid samples only
    assert rec.estimate == irs_infinity(rec.n_learned, rec.samples_used - rec.n_invalid, bank.n_train).estimate
    strict = make_monitor(tmp_path / "s", bank=bank, num_samples=200, every_n_steps=10, strict=True)
    with pytest.raises(EvaluationError, match="NaN"):
        strict.step(10, sampler=NaNSampler(TRAIN, every=10))


def test_broken_sampler_does_not_stop_training_unless_strict(tmp_path, bank, caplog):
    def broken(batch_size, generator):
        raise RuntimeError("CUDA out of memory (simulated)")

    m = make_monitor(tmp_path, bank=bank, every_n_steps=5)
    with caplog.at_level(logging.ERROR, logger="irs_callbacks.monitor"):
        assert m.step(5, sampler=broken) is False
    assert "out of memory" in caplog.text and m.history == [] and m.errors[0][0] == 5
    assert m.step(10, sampler=PoolSampler(HELD, replace=False)) is False and [r.step for r in m.history] == [10]
    with pytest.raises(EvaluationError, match="out of memory"):
        make_monitor(tmp_path / "s", bank=bank, every_n_steps=5, strict=True).step(5, sampler=broken)


def test_unreadable_training_data_is_one_error_at_set_up(tmp_path, caplog):
    """A monitor that cannot read its data says so once, as an ERROR, and never evaluates."""

    class Captions(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return {"caption": "a photo", "label": i}

    m = IRSMonitor(PoolSampler(HELD, replace=False), every_n_steps=1, log_dir=tmp_path)
    with caplog.at_level(logging.ERROR, logger="irs_callbacks.monitor"):
        m.connect(train_data=torch.utils.data.DataLoader(Captions()))
        for step in range(1, 6):
            assert m.step(step) is False
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "off for this run" in errors[0].message and "caption" in errors[0].message
    assert m.history == []


def test_schedule_warmup_and_patience(tmp_path, bank):
    collapsed = PoolSampler(classes([3], HELD), replace=True)
    m = make_monitor(tmp_path, bank=bank, every_n_steps=10, start_step=20, patience=2)
    stops = {step: m.step(step, sampler=collapsed) for step in range(1, 51)}
    assert [r.step for r in m.history] == [20, 30]  # nothing before the warm-up; stop after 2
    assert all(r.verdict == "reject" for r in m.history)
    assert not any(v for s, v in stops.items() if s < 30) and all(v for s, v in stops.items() if s >= 30)
    # a pass resets the count
    m2 = make_monitor(tmp_path / "2", bank=bank, every_n_steps=10, patience=2)
    m2.step(10, sampler=collapsed)
    m2.step(20, sampler=PoolSampler(HELD, replace=False))
    assert m2.step(30, sampler=collapsed) is False and m2.consecutive_rejections == 1
    m2.step(torch.tensor(30), sampler=collapsed)  # the same step twice (and as a tensor) evaluates once
    assert [r.step for r in m2.history] == [10, 20, 30]


def test_early_stopping_policy_alone():
    policy = EarlyStopping(patience=2)
    assert [policy.update(s, v) for s, v in [(1, "reject"), (2, "pass"), (3, "reject"), (4, "reject"),
                                             (5, "pass")]] == [False, False, False, True, True]
    assert policy.stopped_at == 4
    clone = EarlyStopping(patience=2)
    clone.load_state_dict(policy.state_dict())
    assert clone.should_stop and clone.consecutive_rejections == 0


def test_evaluate_without_step_is_not_recorded(tmp_path, bank):
    m = make_monitor(tmp_path, bank=bank, num_samples=100)
    r = m.evaluate(PoolSampler(HELD, replace=False))
    assert r.step is None and m.history == [] and not m.history_file.exists()
    # the first 100 held-out digits themselves (no replacement): real data, a pass
    assert r.samples_used == 100 and r.n_learned == brute_force_learned(digits()[0][HELD[:100]])
    assert r.verdict == "pass" and r.irs_alpha == r.n_learned / len(TRAIN)


def brute_force_learned(images) -> int:
    """Distinct nearest training digits (euclidean on the pixels, ties to the lowest index) of
    ``images``: N_learned computed without the library."""
    train = digits()[0][TRAIN].flatten(1).double()
    distances = torch.cdist(images.flatten(1).double(), train)
    return len(set(distances.argmin(dim=1).tolist()))


def test_a_failing_output_never_drops_an_evaluation(tmp_path, bank, caplog):
    """A tracker whose log raises (one ERROR, however often): every evaluation is still in the
    history (memory and file) and counts for patience; strict=True raises."""
    def broken(values, step):
        raise ConnectionError("tracker unreachable")

    m = make_monitor(tmp_path, bank=bank, every_n_steps=10, patience=2, num_samples=100)
    m.connect(tensorboard=TensorBoardLogger(None, scalar_sinks=[broken], images=False, figure=False))
    collapsed = PoolSampler(classes([3], HELD), replace=True)
    with caplog.at_level(logging.ERROR, logger="irs_callbacks.monitor"):
        assert [m.step(step, sampler=collapsed) for step in (10, 20)] == [False, True]
    assert [r.step for r in m.history] == [10, 20] and m.errors == []
    assert [r.step for r in read_history(m.history_file)] == [10, 20]
    assert [r.message.count("tracker unreachable") for r in caplog.records if r.levelno >= logging.ERROR] == [1]
    strict = make_monitor(tmp_path / "s", bank=bank, every_n_steps=10, num_samples=100, strict=True)
    strict.connect(tensorboard=TensorBoardLogger(None, scalar_sinks=[broken], images=False, figure=False))
    with pytest.raises(ConnectionError):
        strict.step(10, sampler=collapsed)


def test_reference_bank_from_file_and_cache(tmp_path, bank):
    path = bank.save(tmp_path / "bank.safetensors")
    m = IRSMonitor(reference=ReferenceConfig(bank=str(path), extractor=pixels),
                   num_samples=100, batch_size=50, log_dir=tmp_path, options=MonitorOptions(log_images=False))
    r = m.evaluate(PoolSampler(HELD, replace=False))
    assert r.n_train == bank.n_train and r.real == bank.real_at(100)
    built = make_monitor(tmp_path / "b")  # built from data: features cached under log_dir/reference_cache
    built.prepare()
    assert list((tmp_path / "b" / "reference_cache").glob("reference-*.safetensors"))


def test_reference_set_up_leaves_the_trainers_random_streams_alone(tmp_path):
    """An uncached bank build reads the data through a DataLoader (which draws a base seed): the
    global streams are exactly as before."""
    expected = seed_streams_and_peek(5)
    make_monitor(tmp_path).prepare()
    assert next_draws() == expected


def test_one_verdict_line_per_evaluation_visible_without_logging_set_up(tmp_path):
    """With logging unconfigured, the library's logger prints one INFO line per evaluation (like
    Lightning's), every figure labelled."""
    import subprocess
    import sys
    from pathlib import Path

    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from monitor_helpers import PoolSampler, make_monitor, split
_, held = split()
m = make_monitor({str(tmp_path)!r}, every_n_steps=5, num_samples=200)
for step in range(1, 11):
    m.step(step, sampler=PoolSampler(held, replace=False))
m.close()
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240,
                          env={"PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1",
                               "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("IRSMonitor step")]
    assert len(lines) == 2 and lines[0].startswith("IRSMonitor step 5: ") and lines[1].startswith("IRSMonitor step 10")
    assert "final threshold" in lines[0] and "real IRS_inf" in lines[0] and "real queries" in lines[0] and "alpha = " in lines[0]


def test_early_pass_is_off_by_default_and_labelled_when_on(tmp_path, bank):
    sampler = PoolSampler(TRAIN, replace=True)  # every training image: far above a target of 0.5
    off = make_monitor(tmp_path / "off", bank=bank, target_irs=0.5, batch_size=25).evaluate(sampler, step=1)
    on = make_monitor(tmp_path / "on", bank=bank, target_irs=0.5, batch_size=25, pass_alpha=0.05).evaluate(sampler, step=1)
    assert (off.verdict, off.rule) == ("pass", "deterministic") and off.n_learned > off.k_final
    assert (on.verdict, on.rule) == ("pass", "early_pass") and on.samples_used < off.samples_used
    test = SequentialRejectionTest(bank.n_train, 0.5, 500, real_irs=bank.real_at(500).estimate, pass_alpha=0.05)
    assert on.n_learned >= test.pass_threshold(on.samples_used)  # the test's own boundary decided
    assert read_history(tmp_path / "on" / "irs_history.jsonl")[0].rule == "early_pass"
