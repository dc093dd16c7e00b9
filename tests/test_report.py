"""irs report: the page is written, self-contained, and every figure is a real PNG."""

import base64
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from irs_callbacks.cli import main as irs_main
from irs_callbacks.report import render_report, retrieval_extremes
from irs_callbacks.tracking import load_evaluation, save_evaluation
from irs_callbacks.stats import irs_infinity

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


def test_saved_evaluation_round_trip(run_dir):
    rec, hits = load_evaluation(run_dir / "evaluation.safetensors")
    assert rec["step"] == 400 and hits.shape == (N_TRAIN,) and hits.sum() == BUDGET


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


def test_retrieval_extremes():
    most, never = retrieval_extremes(np.array([0, 3, 1, 0, 3, 0, 2]), top=16)
    assert most.tolist() == [1, 4, 6, 2]  # only retrieved images, most first, ties by index
    assert never.tolist() == [0, 3, 5]
    assert retrieval_extremes(np.array([5, 0, 1]), top=1)[0].tolist() == [0]


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
