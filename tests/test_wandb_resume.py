"""A run killed (SIGKILL) after a checkpoint and resumed holds every step once in its W&B history, read from the
offline run's files: the resumed segment rewinds the W&B run to the checkpoint's step (its branch point, which
`wandb sync` applies), so the rows the killed process logged after the checkpoint are replaced by the resumed run's,
never added to."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

from conftest import ROOT, read_jsonl, read_wandb_records

# `python -m dpo_exp.train ARGS` that SIGKILLs itself before the DPO loop's iteration KILL_AT + 1 (0: no kill),
# a moment after its last log so that W&B has written what it got
KILLED = """
import os, runpy, signal, sys, time
from dpo_exp.loop import Loop
real, kill_at = Loop.run_iteration, int(os.environ["KILL_AT"])
def run_iteration(self, bar):
    if self.label == "train" and self.step == kill_at:  # the DPO loop, not the SFT stage
        time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, bar)
Loop.run_iteration = run_iteration
sys.argv = ["dpo_exp.train", *sys.argv[1:]]
runpy.run_module("dpo_exp.train", run_name="__main__", alter_sys=True)
"""
STEPS, SAVE_EVERY, EVAL_EVERY, KILL_AT = 12, 4, 2, 7


def train(run_dir: Path, cache: Path, kill_at: int) -> subprocess.CompletedProcess:
    # its own W&B service: not one an earlier test started in this process (WANDB_SERVICE), which would outlive
    # the killed run and hold its id
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY" and not k.startswith("WANDB_SERVICE")}
    env.update(PYTHONPATH=str(ROOT), KILL_AT=str(kill_at), WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL="0.05")
    return subprocess.run([sys.executable, "-c", KILLED, "debug=smoke", "logger=wandb", "logger.mode=offline",
                           f"trainer.max_steps={STEPS}", f"trainer.save_every={SAVE_EVERY}",
                           f"trainer.eval_every={EVAL_EVERY}", f"paths.cache_dir={cache}", f"hydra.run.dir={run_dir}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def segments(run_dir: Path) -> list[tuple[object, list[dict]]]:
    """The offline W&B run files of the run directory, oldest first: (branch point or None, history rows)."""
    out = []
    for run_file in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        branch, rows = None, []
        for record in read_wandb_records(run_file):
            kind = record.WhichOneof("record_type")
            if kind == "run" and record.run.HasField("branch_point"):
                branch = record.run.branch_point
            elif kind == "history":
                rows.append({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
        out.append((branch, rows))
    return out


def effective_history(run_dir: Path, run_id: str) -> list[dict]:
    """The run's history as W&B keeps it: each segment that starts with a rewind to step b (its branch point)
    drops the rows after step b before appending its own."""
    rows: list[dict] = []
    for branch, own in segments(run_dir):
        if branch is not None:
            assert branch.run == run_id and branch.metric == "_step"
            rows = [r for r in rows if int(r["_step"]) <= branch.value]
        rows += own
    return rows


def steps_of(rows: list[dict], key: str) -> Counter:
    """How often each training step has a row holding `key` (or a key under it: a sample table's columns)."""
    return Counter(int(r["step"]) for r in rows if any(k == key or k.startswith(key + "/") for k in r))


def test_a_run_killed_after_a_checkpoint_holds_every_step_once_in_its_wandb_history(tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    killed = train(run_dir, cache, KILL_AT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (_, first), = segments(run_dir)
    assert {5, 6} <= set(steps_of(first, "train/loss"))  # logged after the checkpoint at step 4, before the kill

    resumed = train(run_dir, cache, 0)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {run_dir / 'checkpoints' / f'step_{SAVE_EVERY}'}" in resumed.stdout
    (_, before), (branch, after) = segments(run_dir)
    assert before == first and branch.value == SAVE_EVERY  # rewound to the checkpoint's step
    assert min(steps_of(after, "train/loss")) == SAVE_EVERY + 1

    rows = effective_history(run_dir, (run_dir / "wandb_run_id").read_text())
    assert [int(r["_step"]) for r in rows] == list(range(STEPS + 1))  # one row per step, W&B step = training step
    evaluated = range(0, STEPS + 1, EVAL_EVERY)
    for key, steps in (("train/loss", range(1, STEPS + 1)), ("eval/rewards/accuracies", evaluated),
                       ("eval/samples", evaluated)):
        assert steps_of(rows, key) == Counter(steps), key
    # the same steps and values as metrics.jsonl (cut back to the checkpoint by the resume, then continued)
    files = {r["step"]: r["train/loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r}
    assert {int(r["step"]): json.loads(r["train/loss"]) for r in rows if "train/loss" in r} == files


def test_a_run_id_still_held_by_a_killed_attempts_wandb_service_is_waited_for(monkeypatch):
    """A SIGKILLed process's W&B service can outlive it for a few seconds and refuse the same run id ("is in use"):
    the resumed run waits for it instead of failing; any other error is raised at once."""
    from dpo_exp import loggers

    class FakeWandb:
        def __init__(self, failures, message):
            self.failures, self.message, self.calls = failures, message, 0

        def init(self, **kwargs):
            self.calls += 1
            if self.calls <= self.failures:
                raise RuntimeError(self.message)
            return "run"

    monkeypatch.setattr(loggers.time, "sleep", lambda s: None)
    sink = loggers.WandbSink.__new__(loggers.WandbSink)
    sink._init, sink.run_id = {}, "abc"
    sink._wandb = FakeWandb(2, "run ID abc is in use")
    assert sink._init_run({}) == "run" and sink._wandb.calls == 3
    sink._wandb = FakeWandb(9, "run ID abc is in use")
    try:
        sink._init_run({}, waits=(1, 1))
    except RuntimeError as err:
        assert "is in use" in str(err) and sink._wandb.calls == 3
    else:
        raise AssertionError("gave up silently")
    sink._wandb = FakeWandb(1, "permission denied")
    try:
        sink._init_run({})
    except RuntimeError:
        assert sink._wandb.calls == 1
    else:
        raise AssertionError("retried an error that is not a held run id")
