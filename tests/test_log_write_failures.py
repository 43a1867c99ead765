"""A write the machine refuses (no space left) to metrics.jsonl, samples.jsonl or summary.json stops the run with one
readable line naming the file and what is intact, exit 74, no traceback and no half-written row; rerunning the
same command resumes from the newest checkpoint and ends with every step once."""
from __future__ import annotations

import errno
import json
import os
import runpy
import sys
import warnings

import pytest

from conftest import read_jsonl

from dpo_exp import loggers
from dpo_exp.errors import WRITE_EXIT_CODE, WriteFailed
from dpo_exp.loggers import FileSink

NO_SPACE = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def refuse_after_half(real, refused):
    """write_all that writes half of what `refused(handle, data)` picks, then fails as a full disk does."""
    def write_all(handle, data):
        if refused(handle, data):
            handle.write(data[:len(data) // 2])
            raise NO_SPACE
        real(handle, data)
    return write_all


def test_a_refused_row_is_cut_off_again_and_named(tmp_path, monkeypatch):
    sink = FileSink(tmp_path)
    sink.log({"train/loss": 1.0}, 1)
    sink.table("eval/samples", ["prompt", "policy"], [["p", "a"]], 1)
    monkeypatch.setattr(loggers, "write_all", refuse_after_half(loggers.write_all, lambda handle, data: True))
    for write in (lambda: sink.log({"train/loss": 0.5}, 2),
                  lambda: sink.table("eval/samples", ["prompt", "policy"], [["p", "b"], ["q", "c"]], 2)):
        with pytest.raises(WriteFailed) as failed:
            write()
        assert "No space left on device" in str(failed.value) and "Intact: no checkpoint yet" in str(failed.value)
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "train/loss": 1.0}]  # whole rows only
    assert [r["step"] for r in read_jsonl(tmp_path / "samples.jsonl")] == [1]
    sink.finish()  # nothing left in a buffer to fail again


def test_a_refused_summary_keeps_the_last_one_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    sink = FileSink(tmp_path)
    sink.summary({"steps": 4})
    (tmp_path / "checkpoints" / "step_4").mkdir(parents=True)
    monkeypatch.setattr(loggers, "write_all", refuse_after_half(loggers.write_all, lambda handle, data: True))
    with pytest.raises(WriteFailed, match=f"could not write {tmp_path / 'summary.json'}: No space left on device. "
                                          f"Intact: the checkpoints in {tmp_path / 'checkpoints'}"):
        sink.summary({"steps": 6})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"steps": 4}
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["checkpoints", "metrics.jsonl", "samples.jsonl", "summary.json"]  # no summary.json.tmp


def train(capsys, *args) -> tuple[int, str, str]:
    """`python -m dpo_exp.train ARGS` in this process (so a test can make writes fail): status, stdout, stderr."""
    argv = sys.argv
    sys.argv = ["dpo_exp.train", *args]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="'dpo_exp.train' found in sys.modules", category=RuntimeWarning)
            runpy.run_module("dpo_exp.train", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    finally:
        sys.argv = argv
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_full_disk_while_logging_stops_the_run_readably_and_the_rerun_resumes(capsys, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    args = ["debug=smoke", "trainer.max_steps=6", "trainer.save_every=2", f"paths.cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={run_dir}"]

    def metrics_of_step_5(handle, data):
        return handle.name.endswith("metrics.jsonl") and json.loads(data)["step"] == 5

    real = loggers.write_all
    monkeypatch.setattr(loggers, "write_all", refuse_after_half(real, metrics_of_step_5))
    code, _, err = train(capsys, *args)
    assert code == WRITE_EXIT_CODE == 74, err[-3000:]
    assert "Traceback" not in err
    assert (f"dpo_exp: error: could not write {run_dir / 'metrics.jsonl'}: No space left on device. Intact: the "
            f"checkpoints in {run_dir / 'checkpoints'}") in err
    assert "rerun the same command: it resumes" in err
    assert max(r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")) == 4  # whole rows, up to the failure

    monkeypatch.setattr(loggers, "write_all", real)
    code, out, err = train(capsys, *args)
    assert code == 0, err[-3000:]
    assert f"resuming from {run_dir / 'checkpoints' / 'step_4'}" in out
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
    assert steps == list(range(1, 7))
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 6
