"""hydra/launcher=slurm's code path on this machine: hydra-submitit-launcher with submitit's local executor
(hydra/launcher=slurm_local) starts every job of a sweep as 2 tasks that join one gloo process group, as
SLURM tasks would; USR2 (what submitit asks SLURM to send before the time limit) makes the run checkpoint and
submitit requeue it, and the requeued job resumes and finishes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, read_jsonl

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[slurm]'")


def sweep_command(sweep: Path, cache: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "dpo_exp.train", "-m", "hydra/launcher=slurm_local", "debug=smoke",
            f"paths.cache_dir={cache}", f"hydra.sweep.dir={sweep}", *overrides]


def job_dirs(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))


@pytest.mark.slow
def test_a_two_job_sweep_runs_each_job_as_one_two_process_job(tmp_path):
    sweep = tmp_path / "sweep"
    done = subprocess.run(sweep_command(sweep, tmp_path / "cache", "loss.beta=0.1,0.5"), cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    jobs = job_dirs(sweep)
    assert [p.name for p in jobs] == ["0_loss.beta=0.1", "1_loss.beta=0.5"]
    for job, beta in zip(jobs, (0.1, 0.5)):
        summary = json.loads((job / "summary.json").read_text())
        assert summary["status"] == "complete" and summary["steps"] == 4
        final = job / "checkpoints" / "final"
        assert json.loads((final / "run_config.json").read_text())["loss"]["beta"] == beta
        assert sorted(p.name for p in (final / "rng").iterdir()) == ["rank_0.pt", "rank_1.pt"]  # one 2-rank job
    logs = sorted((sweep / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 4  # 2 jobs x 2 tasks; only rank 0 prints the summary
    assert sum("dpo_exp summary" in log.read_text() for log in logs) == 2


def submitit_tasks(sweep: Path) -> list[int]:
    """Pids of the task processes submitit started for this sweep (not its controller, which USR2 would kill)."""
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            env = environ.read_bytes()
        except OSError:
            continue
        if b"SUBMITIT_LOCAL_GLOBALID=" in env and str(sweep).encode() in env:
            pids.append(int(environ.parent.name))
    return pids


@pytest.mark.slow
def test_usr2_before_the_time_limit_checkpoints_requeues_and_the_job_resumes_to_the_end(tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen(sweep_command(sweep, tmp_path / "cache", "trainer.max_steps=200", "trainer.eval_every=100",
                                          "loss.beta=0.1"),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "DPO_EXP_TEST_SWEEP": str(sweep)})  # marks the tasks' environment
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:  # until the first train metrics: mid-run
        metrics = list(sweep.glob("0_*/metrics.jsonl"))
        if metrics and "train/loss" in metrics[0].read_text():
            break
        time.sleep(0.05)
    tasks = submitit_tasks(sweep)
    assert len(tasks) == 2
    for pid in tasks:
        os.kill(pid, signal.SIGUSR2)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    job = job_dirs(sweep)[0]
    summary = json.loads((job / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["steps"] == 200
    assert Path(summary["resumed_from"]).name.startswith("step_")  # the requeued job continued the checkpoint
    logs = "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_log.out"))
    assert "SIGUSR2 received: stopped after step" in logs and "Requeued job" in logs
    steps = [r["step"] for r in read_jsonl(job / "metrics.jsonl") if "train/loss" in r]
    assert steps == list(range(1, 201))  # every step once
