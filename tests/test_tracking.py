"""TensorBoard events and the JSON-lines history, read back from disk."""

import json

import numpy as np
import pytest
import torch

from irs_callbacks.history import HISTORY_SCHEMA, EvaluationRecord, HistoryFile, read_history, schema_markdown
from irs_callbacks.stats import expected_irs
from irs_callbacks.tracking import SCALAR_TAGS, TensorBoardLogger, curve_figure, expected_learned, scalars_of

from monitor_helpers import PoolSampler, classes, digits, make_monitor, pixels, split

TRAIN, HELD = split()


def events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    ea.Reload()
    return ea


def run_two_evaluations(monitor):
    monitor.evaluate(PoolSampler(HELD, replace=False), step=10)
    monitor.evaluate(PoolSampler(classes([0, 1], HELD), replace=True), step=20)
    return monitor.history


def test_tensorboard_events_hold_every_tag_with_the_recorded_values(tmp_path):
    m = make_monitor(tmp_path, num_samples=300, batch_size=60, images=True)
    history = run_two_evaluations(m)
    m.close()  # flushes the writer
    ea = events(tmp_path / "irs")
    tags = ea.Tags()
    assert set(SCALAR_TAGS) <= set(tags["scalars"])
    for record in history:
        for tag, value in scalars_of(record).items():
            if tag.startswith("irs/time_"):  # logged before the logging itself was timed
                continue
            logged = {e.step: e.value for e in ea.Scalars(tag)}
            assert logged[record["step"]] == pytest.approx(value, rel=1e-6), tag
    assert ea.Scalars("irs/verdict")[0].value == 1.0 and ea.Scalars("irs/verdict")[1].value == 0.0
    assert "irs/hits" in tags["histograms"]
    hist = ea.Histograms("irs/hits")[1].histogram_value
    assert hist.num == len(TRAIN) and hist.sum == history[1]["samples_used"]  # one count per training image
    assert {"irs/samples", "irs/over_retrieved", "irs/curve"} <= set(tags["images"])
    assert ea.Images("irs/samples")[0].width > 8
    assert any("custom_scalars" in t for t in tags["tensors"])  # the Margin layout


def test_logged_images_decode_to_exactly_what_was_logged(tmp_path):
    """Grids and the curve figure are written as lossless PNG image summaries (float grids are
    quantised to 8 bits by add_image, hence one grey level of tolerance)."""
    import io

    from PIL import Image

    from irs_callbacks.tracking import CurveRenderer, TensorBoardLogger, _grid

    x, _ = digits()
    logger = TensorBoardLogger.from_log_dir(tmp_path)
    record = {"step": 3, "verdict": "reject", "rule": "interim", "samples_used": 40, "budget": 100, "n_learned": 30,
              "n_invalid": 0, "n_train": 200, "k_min": 60, "irs_alpha": 0.15, "target_s": 150.0,
              "curve": [[20, 18], [40, 30]]}
    logger.log(record, hits=np.arange(200) % 3, samples=x[:9], over_retrieved=x[9:13])
    logger.writer.close()
    ea = events(tmp_path)

    def decoded(tag):
        event = ea.Images(tag)[0]
        return event.step, np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))

    def grid_rgb(images):
        return _grid(images).transpose(1, 2, 0) * 255

    step, samples = decoded("irs/samples")
    assert step == 3 and samples.shape == grid_rgb(x[:9]).shape
    assert np.abs(samples - grid_rgb(x[:9])).max() <= 1
    assert np.abs(decoded("irs/over_retrieved")[1] - grid_rgb(x[9:13])).max() <= 1
    assert np.array_equal(decoded("irs/curve")[1], CurveRenderer().render(record))


def test_margin_layout_names_the_bounds_and_the_target():
    from irs_callbacks.tracking import MARGIN_LAYOUT

    assert MARGIN_LAYOUT["IRS"]["Margin"] == ["Margin", [["irs/estimate", "irs/lower", "irs/upper"], ["irs/target"] * 3]]
    assert MARGIN_LAYOUT["IRS"]["Adjusted margin"] == [
        "Margin", [["irs/adjusted", "irs/adjusted_lower", "irs/adjusted_upper"], ["irs/target_adjusted"] * 3]]


def test_margin_charts_carry_the_target_on_their_own_scale(tmp_path):
    """The layout written to the event file has the target as a second series of each margin chart,
    and the target scalars are target_s / N_train (IRS_inf scale) and target_irs (adjusted scale)."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    from irs_callbacks.tracking import TensorBoardLogger

    record = {"step": 7, "verdict": "pass", "rule": "final", "samples_used": 40, "budget": 40, "n_learned": 30,
              "n_invalid": 0, "n_train": 200, "k_min": 20, "irs_alpha": 0.15, "estimate": 0.5, "lower": 0.4,
              "upper": 0.6, "adjusted": 0.8, "adjusted_lower": 0.7, "adjusted_upper": 0.9, "target_irs": 0.75,
              "target_s": 90.0, "real_irs": 0.6, "curve": [[40, 30]]}
    scalars = scalars_of(record)
    assert scalars["irs/target"] == pytest.approx(90 / 200) and scalars["irs/target_adjusted"] == 0.75
    assert "irs/target_adjusted" not in scalars_of({**record, "real_irs": None})  # no adjusted scale
    logger = TensorBoardLogger.from_log_dir(tmp_path, images=False, figure=False)
    logger.log(record)
    logger.writer.close()
    ea = events(tmp_path)
    assert ea.Scalars("irs/target")[0].value == pytest.approx(0.45)
    assert ea.Scalars("irs/target_adjusted")[0].value == pytest.approx(0.75)
    config = ea.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    layout = layout_pb2.Layout.FromString(config)
    charts = {chart.title: [(s.value, s.lower, s.upper) for s in chart.margin.series] for chart in layout.category[0].chart}
    assert charts == {"Margin": [("irs/estimate", "irs/lower", "irs/upper"), ("irs/target",) * 3],
                      "Adjusted margin": [("irs/adjusted", "irs/adjusted_lower", "irs/adjusted_upper"),
                                          ("irs/target_adjusted",) * 3]}


def test_accelerate_tracker_is_used_when_present(tmp_path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from irs_callbacks import IRSMonitor
    from irs_callbacks.monitor import MonitorOptions, ReferenceConfig

    x, _ = digits()
    acc = Accelerator(cpu=True, log_with="tensorboard", project_config=ProjectConfiguration(project_dir=str(tmp_path)))
    acc.init_trackers("run")
    loader = acc.prepare(torch.utils.data.DataLoader(x[TRAIN], batch_size=64))
    m = IRSMonitor(reference=ReferenceConfig(extractor=pixels, progress=False), num_samples=200, batch_size=100,
                   options=MonitorOptions(log_images=False)).attach(acc, loader)
    assert m.reference.train_data is loader
    m.evaluate(PoolSampler(HELD, replace=False), step=5)
    m.close()
    acc.end_training()
    ea = events(tmp_path / "run")
    assert set(SCALAR_TAGS) <= set(ea.Tags()["scalars"])
    assert not (tmp_path / "irs").exists()  # no second writer
    assert read_history(tmp_path / "irs_history.jsonl")[0].step == 5  # history next to the logs


def test_history_file_schema_and_rewrite(tmp_path):
    m = make_monitor(tmp_path, num_samples=300, batch_size=60, tensorboard=False)
    history = run_two_evaluations(m)
    on_disk = read_history(m.history_file)
    assert on_disk == history and all(isinstance(r, EvaluationRecord) for r in on_disk)
    raw = json.loads(m.history_file.read_text().splitlines()[0])
    documented = {line.split()[0] for line in HISTORY_SCHEMA.splitlines()[2:] if line[:2] == "  " and line[2] != " "}
    assert set(raw) == documented  # the schema is generated from the record: every key, nothing else
    assert set(raw["timing"]) == {"sampling", "features", "retrieval", "monitor", "logging", "total"}
    r = on_disk[1]
    assert r.lower <= r.estimate <= r.upper and r["curve"][-1] == [r.samples_used, r.n_learned]
    # load_state_dict rewrites the file to the restored history (no double counting after resume)
    m.load_state_dict({**m.state_dict(), "history": [history[0].as_dict()]})
    assert [e.step for e in read_history(m.history_file)] == [10]
    f = HistoryFile(tmp_path / "h.jsonl")
    f.rewrite([EvaluationRecord.from_dict({**history[0].as_dict(), "estimate": float("nan")})])
    assert f.path.read_text().count('"estimate": null') == 1  # non-finite floats become null (valid JSON)


def test_history_readme_table_is_generated_from_the_record():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert schema_markdown() in readme, "README's history table is stale: paste irs_callbacks.history.schema_markdown()"


def test_cut_off_history_line_is_a_clear_error(tmp_path):
    path = tmp_path / "irs_history.jsonl"
    path.write_text('{"step": 1, "verdict": "pass"')
    with pytest.raises(ValueError, match="line 1 is not an evaluation record"):
        read_history(path)
    with pytest.raises(ValueError, match="does not exist"):
        read_history(tmp_path / "missing.jsonl")


def test_expected_curve_is_eq_2():
    for n_train in (1, 2, 39, 1797):
        n = np.array([0, 1, 15, 1000])
        exact = [n_train * expected_irs(int(k), n_train) for k in n]
        np.testing.assert_allclose(expected_learned(n, n_train), exact, rtol=1e-12)
    # Eq. 2 against a simulation of uniform draws
    rng = np.random.default_rng(0)
    sim = np.mean([len(np.unique(rng.integers(0, 100, 50))) for _ in range(4000)])
    assert sim == pytest.approx(expected_learned(50, 100), rel=0.01)


def test_curve_figure_and_sinks():
    record = {"step": 3, "n_train": 100, "budget": 60, "k_min": 30, "target_s": 80.0, "verdict": "reject",
              "rule": "interim", "curve": [[20, 15], [40, 22]], "irs_alpha": 0.22, "n_learned": 22,
              "samples_used": 40, "n_invalid": 0, "estimate": 0.3, "lower": 0.2, "upper": 0.4, "adjusted": None,
              "timing": {"sampling": 1.0, "features": 0.5, "monitor": 0.1}}
    fig = curve_figure(record)
    labels = [line.get_label() for line in fig.axes[0].lines]
    assert any("ideal" in s for s in labels) and any("k_min" in s for s in labels)
    got = []
    TensorBoardLogger(None, scalar_sinks=[lambda values, step: got.append((step, values))]).log(record)
    assert got[0][0] == 3 and got[0][1]["irs/verdict"] == 0.0 and "irs/adjusted" not in got[0][1]
    assert got[0][1]["irs/time_sampling"] == 1.0


def test_background_work_runs_in_order_off_the_caller_and_survives_failures(caplog):
    import logging
    import threading

    from irs_callbacks.tracking import BackgroundWork

    work, release, seen = BackgroundWork(), threading.Event(), []

    def job(i):
        assert release.wait(10)  # blocks the worker until the caller goes on: submit must not wait
        seen.append((i, threading.current_thread() is threading.main_thread()))

    def broken():
        raise OSError("disk full (simulated)")

    with caplog.at_level(logging.WARNING, logger="irs_callbacks.tracking"):
        for i in range(3):
            work.submit(job, i)
        work.submit(broken)
        work.submit(job, 3)
        assert seen == []  # nothing ran yet: the worker is still waiting for `release`
        release.set()
        work.flush()
    assert seen == [(0, False), (1, False), (2, False), (3, False)]  # in order, none on the caller's thread
    assert "disk full" in caplog.text and work.seconds > 0
    work.close()
    work.submit(job, 4)  # usable again after close (a new worker)
    work.close()
    assert seen[-1] == (4, False)


def test_monitor_logging_failures_warn_unless_strict(tmp_path, caplog):
    import logging

    class FailingWriter:
        def add_custom_scalars(self, layout):
            pass

        def add_scalar(self, *args):
            pass

        def add_histogram(self, *args):
            raise OSError("event file not writable (simulated)")

        def flush(self):
            pass

    def monitor(strict):
        m = make_monitor(tmp_path / str(strict), num_samples=120, batch_size=60, every_n_steps=10, strict=strict)
        return m.connect(tensorboard=TensorBoardLogger(FailingWriter(), images=False, figure=False))

    m = monitor(False)
    with caplog.at_level(logging.WARNING):
        assert m.step(10, sampler=PoolSampler(HELD, replace=False)) is False
        m.close()
    assert "not writable" in caplog.text
    assert [r.step for r in read_history(m.history_file)] == [10]  # the evaluation itself is recorded
    strict = monitor(True)
    strict.step(10, sampler=PoolSampler(HELD, replace=False))  # the display work runs in the background ...
    with pytest.raises(OSError, match="not writable"):
        strict.flush()  # ... and in strict mode its failure is raised from the next call
