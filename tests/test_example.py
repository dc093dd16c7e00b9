"""examples/train_unconditional.py end to end (tiny settings, an image folder): the files it
leaves -- TensorBoard events with every irs/* scalar tag, the history, the ledger, checkpoints."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from irs_callbacks.history import read_history
from irs_callbacks.tracking import SCALAR_TAGS

from monitor_helpers import digits

ROOT = Path(__file__).parents[1]


def test_example_runs_and_leaves_its_logs(tmp_path):
    from PIL import Image

    x, _ = digits()
    data = tmp_path / "images"
    data.mkdir()
    for i in range(120):
        Image.fromarray((x[i, 0].numpy() * 255).astype(np.uint8), mode="L").save(data / f"{i:03d}.png")
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "examples" / "train_unconditional.py"), "--output-dir", str(out),
           "--data-dir", str(data), "--channels", "1", "--resolution", "8", "--block-out-channels", "16", "32",
           "--batch-size", "16", "--train-steps", "20", "--checkpointing-steps", "10", "--num-samples", "60",
           "--eval-batch-size", "30", "--num-inference-steps", "2", "--lr-warmup-steps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    history = read_history(out / "logs" / "irs_history.jsonl")
    assert [r["step"] for r in history] == [10, 20]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out / "logs" / "train_unconditional"), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    expected = set(SCALAR_TAGS) if history[0]["adjusted"] is not None else set(SCALAR_TAGS) - {
        "irs/adjusted", "irs/adjusted_lower", "irs/adjusted_upper"}
    assert expected <= tags and "train/loss" in tags
    assert [e.step for e in ea.Scalars("irs/k_min")] == [10, 20]
    assert {"irs/samples", "irs/curve"} <= set(ea.Tags()["images"])
    ledger = json.loads((out / "irs_pruning_ledger.json").read_text())["checkpoints"]
    assert set(ledger) == {"checkpoint-10", "checkpoint-20"} and all(e["reason"] for e in ledger.values())
    assert (out / "checkpoint-20").is_dir() and (out / "unet" / "config.json").exists()
    assert "IRS step     20" in proc.stdout

    # the monitor keeps the latest evaluation beside the history: `irs report` renders it all
    from irs_callbacks.report import render_report
    from irs_callbacks.tracking import LAST_EVALUATION_NAME, load_evaluation

    saved = load_evaluation(out / "logs" / LAST_EVALUATION_NAME)
    record, hits = saved.record, saved.hits
    assert record["step"] == 20 and len(hits) == 120 and hits.sum() == record["samples_used"] - record["n_invalid"]
    page = render_report(out / "logs" / "irs_history.jsonl", tmp_path / "report.html",
                         evaluation=out / "logs" / LAST_EVALUATION_NAME, train_data=data).read_text()
    assert page.count("data:image/png;base64,") >= 4  # over steps, curve, histogram, at least one grid
