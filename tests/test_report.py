"""irs report: the page is written, self-contained, every figure is a real PNG; saved evaluations
carry the training-image galleries, so a run folder is all the report needs."""

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from irs_callbacks.cli import main as irs_main
from irs_callbacks.report import find_run_files, render_report
from irs_callbacks.stats import irs_infinity
from irs_callbacks.tracking import (LAST_EVALUATION_NAME, Gallery, load_evaluation, most_retrieved,
                                    never_retrieved_sample, save_evaluation, select_galleries)

N_TRAIN, BUDGET = 60, 40


def record(step, hits_rng):
    drawn = hits_rng.integers(0, N_TRAIN // (1 + step // 100), size=BUDGET)
    curve = [[m, len(set(drawn[:m].tolist()))] for m in range(10, BUDGET + 1, 10)]
    k = curve[-1][1]
    est = irs_infinity(k, BUDGET, N_TRAIN)
    return {
        "step": step, "verdict": "pass" if k > 20 else "reject", "rule": "final", "stopped_early": False,
        "budget": BUDGET, "samples_used": BUDGET, "n_learned": k, "n_invalid": 0, "n_train": N_TRAIN,
        "k_min": 20, "target_irs": 0.8, "alpha_e": 0.05, "irs_alpha": k / N_TRAIN, "estimate": est.estimate,
        "lower": est.lower, "upper": est.upper, "adjusted": est.estimate / 0.9, "adjusted_lower": est.lower / 0.9,
        "adjusted_upper": est.upper / 0.9, "real_irs": 0.9, "seed": 0, "timing": {}, "curve": curve,
        "target_s": 0.8 * 0.9 * N_TRAIN, "score": est.estimate / 0.9,
    }, drawn


@pytest.fixture()
def run_dir(tmp_path):
    rng = np.random.default_rng(0)
    records, drawn = zip(*(record(step, rng) for step in (100, 200, 300, 400)))
    (tmp_path / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    hits = np.bincount(drawn[-1], minlength=N_TRAIN)
    save_evaluation(tmp_path / "evaluation.safetensors", records[-1], hits)
    images = (rng.random((N_TRAIN, 8, 8)) * 255).astype(np.uint8)
    np.save(tmp_path / "train.npy", images)
    return tmp_path


def embedded_pngs(page: str) -> list[Image.Image]:
    images = []
    for data in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page):
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        image.load()
        assert image.format == "PNG" and min(image.size) > 50
        images.append(image)
    return images


@pytest.fixture()
def run_folder(tmp_path):
    """A run as the README's example leaves it: RUN/logs/irs_history.jsonl and the saved evaluation
    with its galleries (the training images live nowhere else)."""
    rng = np.random.default_rng(1)
    records, drawn = zip(*(record(step, rng) for step in (100, 200, 300)))
    logs = tmp_path / "run" / "logs"
    logs.mkdir(parents=True)
    (logs / "irs_history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    hits = np.bincount(drawn[-1], minlength=N_TRAIN)
    train = (rng.random((N_TRAIN, 1, 8, 8)) * 255).astype(np.uint8)
    galleries = select_galleries(hits, lambda rows: train[rows], count=16, seed=0)
    save_evaluation(logs / LAST_EVALUATION_NAME, records[-1], hits, galleries=galleries)
    return tmp_path / "run", hits, train


def test_saved_evaluation_round_trip(run_dir):
    saved = load_evaluation(run_dir / "evaluation.safetensors")
    assert saved.record["step"] == 400 and saved.hits.shape == (N_TRAIN,) and saved.hits.sum() == BUDGET
    assert saved.hits.dtype == np.int64 and saved.galleries == {}  # written without galleries


def test_galleries_round_trip_exactly(tmp_path):
    rng = np.random.default_rng(0)
    grey = (rng.random((5, 1, 6, 7)) * 255).astype(np.uint8)
    rgb = rng.random((3, 3, 4, 4)).astype(np.float32)  # float in [0, 1] -> uint8 by Gallery.of
    galleries = {"never_retrieved": Gallery(np.array([9, 2, 4, 7, 0]), grey, "five, random"),
                 "most_retrieved": Gallery.of([1, 3, 5], rgb, "three, most"),
                 "wide": Gallery.of([8], np.full((1, 2, 2), 65535, np.uint16), "16-bit")}
    path = save_evaluation(tmp_path / "e.safetensors", {"step": 1, "n_train": 10}, np.arange(10), galleries=galleries)
    saved = load_evaluation(path)
    assert set(saved.galleries) == set(galleries)
    for name, gallery in galleries.items():
        back = saved.galleries[name]
        assert back.caption == gallery.caption and back.rows.dtype == np.int64 and back.images.dtype == np.uint8
        assert np.array_equal(back.rows, gallery.rows) and np.array_equal(back.images, gallery.images)
    assert np.array_equal(saved.galleries["most_retrieved"].images, np.round(rgb * 255).astype(np.uint8))
    assert saved.galleries["wide"].images.tolist() == [[[[255, 255], [255, 255]]]]
    with pytest.raises(ValueError, match="uint8"):
        Gallery(np.array([1]), np.zeros((1, 1, 2, 2), np.float32), "x")
    with pytest.raises(ValueError, match="k = 2"):
        Gallery(np.array([1, 2]), np.zeros((1, 1, 2, 2), np.uint8), "x")
    with pytest.raises(ValueError, match="gallery names"):
        save_evaluation(tmp_path / "f.safetensors", {}, np.arange(3), galleries={"Bad Name": galleries["wide"]})


def test_most_retrieved_and_never_retrieved_sample():
    hits = np.array([0, 3, 1, 0, 3, 0, 2])
    assert most_retrieved(hits).tolist() == [1, 4, 6, 2]  # only retrieved images, most first, ties by row
    assert most_retrieved(np.array([5, 0, 1]), count=1).tolist() == [0]
    assert most_retrieved(np.zeros(5, dtype=np.int64)).tolist() == []
    rows, total = never_retrieved_sample(hits)
    assert rows.tolist() == [0, 3, 5] and total == 3  # fewer than count: all of them
    hits = np.zeros(1000, dtype=np.int64)
    hits[::3] = 1  # 666 never retrieved
    rows, total = never_retrieved_sample(hits, count=16, seed=4)
    assert total == 666 and len(rows) == 16 == len(set(rows.tolist())) and (hits[rows] == 0).all()
    assert rows.tolist() == sorted(rows.tolist())
    assert np.array_equal(never_retrieved_sample(hits, 16, seed=4)[0], rows)  # seeded
    assert not np.array_equal(never_retrieved_sample(hits, 16, seed=5)[0], rows)
    # representative, not the first rows: over many seeds every never-retrieved row is drawn about
    # equally often (16/666 per draw; 2,000 draws -> mean 48 per row), the first rows no more than others
    counts = np.zeros(1000)
    for seed in range(2000):
        counts[never_retrieved_sample(hits, 16, seed)[0]] += 1
    never = counts[hits == 0]
    assert never.sum() == 2000 * 16 and abs(never.mean() - 48.05) < 0.01
    chi2 = ((never - never.mean()) ** 2 / never.mean()).sum()  # ~ chi-square with 665 dof: 665 +- 36
    assert chi2 < 665 + 5 * 36.5 and never[:16].mean() < 48.05 + 4 * 6.9 / 4  # the first rows are not favoured


def test_report_of_a_run_folder_needs_no_train_data(run_folder, capsys):
    run, hits, train = run_folder
    history, evaluation = find_run_files(run)
    assert history == run / "logs" / "irs_history.jsonl" and evaluation == run / "logs" / LAST_EVALUATION_NAME
    out = run / "report.html"
    old = os.umask(0o027)
    try:
        assert irs_main(["report", str(run), "--out", str(out)]) == 0
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o640  # follows the umask, like any file the user writes
    page = out.read_text()
    assert len(embedded_pngs(page)) == 5  # over steps, curve, histogram, most and never retrieved
    never_total = int((hits == 0).sum())
    assert f"16 of the {never_total:,} never retrieved training images" in page
    assert "random sample (seed 0)" in page and "most retrieved training images" in page
    # the galleries are exactly the training images of the recorded rows
    saved = load_evaluation(evaluation)
    rows, total = never_retrieved_sample(hits, 16, 0)
    assert total == never_total and np.array_equal(saved.galleries["never_retrieved"].rows, rows)
    assert np.array_equal(saved.galleries["never_retrieved"].images, train[rows])
    # --train-data still works and draws the same rows from the given images
    np.save(run / "train.npy", train[:, 0])
    again = render_report(run, run / "again.html", train_data=run / "train.npy")
    assert len(embedded_pngs(again.read_text())) == 5


def test_full_report_has_every_figure(run_dir):
    out = render_report(
        run_dir / "history.jsonl", run_dir / "report.html",
        evaluation=run_dir / "evaluation.safetensors", train_data=run_dir / "train.npy",
    )
    page = out.read_text()
    # over steps, curve, hits histogram, most retrieved grid, never retrieved grid
    assert len(embedded_pngs(page)) == 5
    assert page.count("<tr>") == 1 + 4  # header + one row per evaluation
    assert "Never retrieved" in page and "Most retrieved" in page
    assert "http" not in page  # self-contained: nothing fetched


def test_report_from_history_only_via_cli(run_dir, capsys):
    assert irs_main(["report", str(run_dir / "history.jsonl"), "--out", str(run_dir / "r.html"), "--step", "200"]) == 0
    page = (run_dir / "r.html").read_text()
    assert len(embedded_pngs(page)) == 2 and "step 200" in page


def test_report_bad_input(run_dir):
    (run_dir / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no evaluations"):
        render_report(run_dir / "empty.jsonl", run_dir / "x.html")
    with pytest.raises(ValueError, match="step 7"):
        render_report(run_dir / "history.jsonl", run_dir / "x.html", step=7)
    (run_dir / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a saved IRS evaluation"):
        render_report(run_dir / "history.jsonl", run_dir / "x.html", evaluation=run_dir / "bad.safetensors")


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_report_opens_in_headless_browser_without_errors(run_dir):
    out = render_report(
        run_dir / "history.jsonl", run_dir / "report.html",
        evaluation=run_dir / "evaluation.safetensors", train_data=run_dir / "train.npy",
    )
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={run_dir / 'profile'}"]
    shot = run_dir / "shot.png"
    result = subprocess.run(
        ["chromium", *flags, "--enable-logging=stderr", "--v=0", f"--screenshot={shot}", "--window-size=1000,2400",
         out.as_uri()], capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Uncaught" not in result.stderr and "ERR_FILE_NOT_FOUND" not in result.stderr
    assert Image.open(shot).size == (1000, 2400)


def _cli(*args, env=None):
    """Run the real ``irs`` entry point in a subprocess: (exit status, stdout, stderr)."""
    result = subprocess.run([sys.executable, "-m", "irs_callbacks.cli", *map(str, args)], capture_output=True,
                            text=True, timeout=240, env={**os.environ, **(env or {})})
    return result.returncode, result.stdout, result.stderr


def test_report_cli_errors_are_one_line(run_folder, tmp_path):
    run, _, _ = run_folder
    history = run / "logs" / "irs_history.jsonl"
    cut = tmp_path / "cut" / "irs_history.jsonl"
    cut.parent.mkdir()
    cut.write_text(history.read_text()[:-40])  # the run died while writing the last line
    cases = [
        ((tmp_path / "nothing_here",), "does not exist"),
        ((tmp_path,), "no monitor history in"),
        ((cut.parent,), "cut off while written"),
        ((run, "--out", run), "is a folder"),
        ((run, "--out", tmp_path / "page.txt"), "must end in .html"),
        ((run, "--evaluation", tmp_path / "missing.safetensors"), "does not exist"),
    ]
    for args, message in cases:
        code, out, err = _cli("report", *args)
        assert code == 2 and message in err and "Traceback" not in err, (args, err)
        assert len(err.strip().splitlines()) == 1, err
    # a missing optional package (matplotlib): one line naming the extra
    blocker = _write_blocker(tmp_path / "blocker", "matplotlib")
    code, out, err = _cli("report", run, "--out", tmp_path / "r.html",
                          env={"PYTHONPATH": f"{blocker}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert code == 2 and "pip install 'irs-callbacks[report]'" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


def _write_blocker(folder, module):
    """A sitecustomize that makes ``import module`` fail as if it were not installed."""
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name == {module!r} or name.startswith({module!r} + '.'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, _Block())\n")
    return folder


def test_report_value_range_takes_any_range_as_score_does(run_dir, capsys):
    """--value-range is one argparse type for every command: `irs report --value-range 0,255` used to be refused."""
    common = [str(run_dir / "history.jsonl"), "--evaluation", str(run_dir / "evaluation.safetensors")]
    np.save(run_dir / "train255.npy", np.load(run_dir / "train.npy").astype(np.float32))  # floats in 0..255
    assert irs_main(["report", *common, "--train-data", str(run_dir / "train.npy"), "--out", str(run_dir / "a.html")]) == 0
    assert irs_main(["report", *common, "--train-data", str(run_dir / "train255.npy"), "--value-range", "0,255",
                     "--out", str(run_dir / "b.html")]) == 0
    a, b = (embedded_pngs((run_dir / name).read_text()) for name in ("a.html", "b.html"))
    assert len(a) == len(b) == 5 and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    np.save(run_dir / "train_signed.npy", np.load(run_dir / "train.npy") / np.float32(127.5) - 1)  # diffusers' range
    assert irs_main(["report", *common, "--train-data", str(run_dir / "train_signed.npy"), "--value-range", "-1,1",
                     "--out", str(run_dir / "c.html")]) == 0
    assert len(embedded_pngs((run_dir / "c.html").read_text())) == 5
    capsys.readouterr()
    for bad in ("-inf,1", "0,inf", "1,0", "0,nan", "0,1,2", "x"):
        with pytest.raises(SystemExit) as info:
            irs_main(["report", *common, "--value-range", bad])
        err = capsys.readouterr().err
        assert info.value.code == 2 and "--value-range: expected LOW,HIGH with finite LOW < HIGH" in err, err
