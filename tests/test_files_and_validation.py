"""irs_callbacks.files (paths, atomic writes) and irs_callbacks.validation (argument checks)."""

import os
import stat

import numpy as np
import pytest
import torch

from irs_callbacks.files import expand_path, write_atomic, write_json_atomic, write_text_atomic
from irs_callbacks.validation import check_choice, check_fraction, check_int, check_probability, check_value_range


def test_expand_path_expands_home_and_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("IRS_TEST_ROOT", "/data/run")
    assert expand_path("~/.cache/irs") == tmp_path / ".cache" / "irs"
    assert expand_path("$IRS_TEST_ROOT/logs") == expand_path("/data/run/logs")
    with pytest.raises(TypeError, match="cache_dir must be a path"):
        expand_path(3, "cache_dir")


def test_atomic_write_follows_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        path = write_text_atomic(tmp_path / "a" / "b.txt", "hello")
    finally:
        os.umask(previous)
    assert path.read_text() == "hello"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert os.listdir(tmp_path / "a") == ["b.txt"]  # no temporary file left behind


def test_failed_atomic_write_leaves_the_old_file(tmp_path):
    path = write_json_atomic(tmp_path / "ledger.json", {"version": 1})

    def half_written(tmp):
        tmp.write_text('{"vers')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, half_written)
    assert path.read_text() == '{\n "version": 1\n}'
    assert os.listdir(tmp_path) == ["ledger.json"]


@pytest.mark.parametrize("value", [5, np.int64(5), 5.0, torch.tensor(5)])
def test_check_int_accepts_integral_values_of_any_type(value):
    assert check_int(value, "step") == 5 and type(check_int(value, "step")) is int


@pytest.mark.parametrize("value", [True, 2.5, "5", None, torch.tensor(2.5), -1])
def test_check_int_refuses_with_the_argument_name(value):
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        check_int(value, "step")


def test_probabilities_fractions_choices_and_ranges():
    assert check_probability(np.float32(0.05), "alpha_e") == pytest.approx(0.05)
    for bad in (0, 1, True, float("nan"), "0.05"):
        with pytest.raises(ValueError, match="alpha_e must be a number in the open interval"):
            check_probability(bad, "alpha_e")
    assert check_fraction(1, "target_irs") == 1.0
    with pytest.raises(ValueError, match=r"target_irs must be a number in \(0, 1\]"):
        check_fraction(1.5, "target_irs")
    assert check_choice("cosine", "distance", ("euclidean", "cosine")) == "cosine"
    with pytest.raises(ValueError, match="distance must be one of 'euclidean', 'cosine', got 'l1'"):
        check_choice("l1", "distance", ("euclidean", "cosine"))
    assert check_value_range([-1, 1]) == (-1.0, 1.0)
    with pytest.raises(ValueError, match="value_range must be finite with low < high"):
        check_value_range((1, 0))


def test_reading_the_umask_from_several_threads_never_changes_it():
    """write_atomic runs on the background sink thread and the training loop's thread at once: its
    reading of the umask must never set it (to 0), even for a moment. The reading alone, in tight
    loops, so that the threads do collide (file writes release the GIL too rarely to show it)."""
    import sys
    import threading

    from irs_callbacks import files

    previous, interval = os.umask(0o027), sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    seen = []

    def read():
        seen.extend({files._umask() for _ in range(20000)})

    try:
        threads = [threading.Thread(target=read) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
        now = os.umask(previous)
    assert now == 0o027  # not left at 0
    assert set(seen) == {0o027}  # and never read as 0


def test_without_proc_the_umask_is_read_once_and_kept(monkeypatch):
    from irs_callbacks import files

    def no_proc(*args, **kwargs):
        raise OSError("no /proc here")

    monkeypatch.setattr(files, "open", no_proc, raising=False)
    monkeypatch.setattr(files, "_umask_at_start", None)
    previous = os.umask(0o027)
    try:
        assert files._umask() == 0o027 and files._umask() == 0o027
        assert os.umask(0o027) == 0o027  # restored
    finally:
        os.umask(previous)
