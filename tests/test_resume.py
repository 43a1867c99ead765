"""Interrupted runs: exact resume after SIGKILL, SIGTERM (preemption), a crash while a checkpoint is written;
a resume refused for a different config; divergence stopping a run. Every comparison is against an
uninterrupted run of the same command (CPU, float32, same seed), timing fields aside."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, read_jsonl

from dpo_exp import checkpoint
from dpo_exp import train as train_module
from dpo_exp.errors import ConfigError

DPO = ["trainer.max_steps=40", "trainer.save_every=5", "trainer.eval_every=10"]
PPO = ["loss=ppo", "ppo.reward=gold", "ppo.total_iterations=16", "ppo.eval_every=4", "trainer.save_every=2"]


def untimed(row: dict) -> dict:
    """A metrics row or summary without what depends on the clock (or on where the run restarted)."""
    return {k: v for k, v in row.items() if "second" not in k and k not in ("resumed_from",)}


def command(run_dir: Path, cache: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "dpo_exp.train", "debug=smoke", f"paths.cache_dir={cache}",
            f"hydra.run.dir={run_dir}", *overrides]


# Float32 matmuls whose results do not depend on memory alignment (MKL's strict conditional numerical
# reproducibility): two processes then round every step alike, so "identical" can be tested exactly. Without
# it, separate processes occasionally differ by one float32 ulp (the loss at 1e-7) where MKL picks another
# kernel for differently aligned buffers.
ENV = {**os.environ, "MKL_CBWR": "AUTO,STRICT"}


def run_cli(run_dir: Path, cache: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command(run_dir, cache, overrides), cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=ENV)


def interrupt(run_dir: Path, cache: Path, overrides: list[str], when, sig: int) -> tuple[int, str]:
    """Start the command, send `sig` as soon as `when()` holds, return its status and stderr."""
    proc = subprocess.Popen(command(run_dir, cache, overrides), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 600
    while not when() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


def outcome(run_dir: Path) -> tuple[list[dict], dict]:
    """The metrics rows and summary to compare. The step-0 evaluation is left out: there π = π_ref, its log-ratios
    are 0 up to one float32 ulp that varies between processes (kernels follow memory alignment), so its
    accuracies are a coin toss in any two runs; it is written before any interruption, not by the resume."""
    rows = [untimed(r) for r in read_jsonl(run_dir / "metrics.jsonl") if r["step"] > 0]
    summary = untimed(json.loads((run_dir / "summary.json").read_text()))
    return rows, summary


def assert_same_outcome(got: tuple[list[dict], dict], expected: tuple[list[dict], dict]) -> None:
    """Identical rows (same steps, keys and values) and summary; a failure names the first step and the keys
    that differ, with both values."""
    close = lambda a, b: a == b or (a != a and b != b)  # noqa: E731  (NaN equals NaN here)

    (rows, summary), (want_rows, want_summary) = got, expected
    assert [r["step"] for r in rows] == [r["step"] for r in want_rows]
    for row, want in zip(rows, want_rows):
        assert row.keys() == want.keys(), (row["step"], sorted(set(row) ^ set(want)))
        bad = {k: (row[k], want[k]) for k in row if not close(row[k], want[k])}
        assert not bad, f"step {row['step']}: {bad}"
    assert summary.keys() == want_summary.keys(), sorted(set(summary) ^ set(want_summary))
    bad = {k: (summary[k], want_summary[k]) for k in summary if not close(summary[k], want_summary[k])}
    assert not bad, f"summary: {bad}"


@pytest.fixture(scope="module")
def cli_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("resume_cache")


@pytest.fixture(scope="module")
def uninterrupted_dpo(tmp_path_factory, cli_cache):
    run_dir = tmp_path_factory.mktemp("dpo_whole") / "run"
    done = run_cli(run_dir, cli_cache, DPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return outcome(run_dir)


@pytest.mark.slow
def test_a_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(tmp_path, cli_cache, uninterrupted_dpo):
    run_dir = tmp_path / "run"
    status, err = interrupt(run_dir, cli_cache, DPO, (run_dir / "checkpoints" / "step_10").exists, signal.SIGKILL)
    assert status == -signal.SIGKILL, err[-2000:]
    assert not (run_dir / "summary.json").exists() and not (run_dir / "checkpoints" / "final").exists()
    again = run_cli(run_dir, cli_cache, DPO)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout
    rows, summary = outcome(run_dir)
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # no step twice, none missing
    assert_same_outcome((rows, summary), uninterrupted_dpo)


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_starts_over_with_each_row_once(tmp_path, cli_cache,
                                                                                 uninterrupted_dpo):
    run_dir = tmp_path / "run"
    metrics = run_dir / "metrics.jsonl"

    def training() -> bool:  # train rows are written, no checkpoint yet
        return metrics.exists() and "train/loss" in metrics.read_text()

    status, err = interrupt(run_dir, cli_cache, DPO, training, signal.SIGKILL)
    assert status == -signal.SIGKILL and checkpoint.latest(run_dir / "checkpoints") is None, err[-2000:]
    again = run_cli(run_dir, cli_cache, DPO)
    assert again.returncode == 0, again.stderr[-3000:]
    steps = [r["step"] for r in read_jsonl(metrics)]
    assert steps.count(0) == 1 and sorted(steps) == steps  # the killed attempt's rows are gone, none twice
    assert_same_outcome(outcome(run_dir), uninterrupted_dpo)


@pytest.mark.slow
def test_sigterm_checkpoints_exits_for_requeue_and_the_rerun_matches(tmp_path, cli_cache, uninterrupted_dpo):
    run_dir = tmp_path / "run"
    metrics = run_dir / "metrics.jsonl"

    def training() -> bool:  # the first train metrics are written: mid-run, before the first checkpoint
        return metrics.exists() and "train/loss" in metrics.read_text()

    status, err = interrupt(run_dir, cli_cache, DPO, training, signal.SIGTERM)
    assert status == train_module.PREEMPTED_EXIT_CODE, err[-2000:]
    saved = checkpoint.latest(run_dir / "checkpoints")
    assert saved is not None and saved.name.startswith("step_") and not (run_dir / "summary.json").exists()
    again = run_cli(run_dir, cli_cache, DPO)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_outcome(outcome(run_dir), uninterrupted_dpo)


@pytest.mark.slow
def test_ppo_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(tmp_path, cli_cache):
    whole = run_cli(tmp_path / "whole", cli_cache, PPO)
    assert whole.returncode == 0, whole.stderr[-3000:]
    run_dir = tmp_path / "run"
    status, err = interrupt(run_dir, cli_cache, PPO, (run_dir / "checkpoints" / "step_6").exists, signal.SIGKILL)
    assert status == -signal.SIGKILL, err[-2000:]
    assert not (run_dir / "summary.json").exists()
    again = run_cli(run_dir, cli_cache, PPO)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_outcome(outcome(run_dir), outcome(tmp_path / "whole"))
    assert any("train/kl_coef" in r for r in outcome(run_dir)[0])  # the adaptive controller's state came back


# ---- in-process: checkpoint contents, crashes while saving, refusals ------------------------------------------

def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_usable(smoke_cfg, tmp_path, monkeypatch):
    overrides = ["trainer.max_steps=12", "trainer.save_every=4", "trainer.eval_every=4"]
    whole = smoke_cfg(*overrides, f"paths.output_dir={tmp_path / 'whole'}")
    train_module.run(whole)

    cfg = smoke_cfg(*overrides)
    real_save = checkpoint.dcp.save
    calls = []

    def crash_on_second(state, checkpoint_id):
        calls.append(checkpoint_id)
        if len(calls) == 2:  # part of step_8 is on disk when the process dies
            Path(checkpoint_id).mkdir(parents=True, exist_ok=True)
            (Path(checkpoint_id) / "partial").write_text("half")
            raise KeyboardInterrupt("killed while saving")
        return real_save(state, checkpoint_id=checkpoint_id)

    monkeypatch.setattr(checkpoint.dcp, "save", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        train_module.run(cfg)
    monkeypatch.setattr(checkpoint.dcp, "save", real_save)
    folder = Path(cfg.paths.output_dir) / "checkpoints"
    assert checkpoint.latest(folder).name == "step_4"  # the half-written one is not a checkpoint
    assert (folder / ".tmp_step_8").exists() and not (folder / "step_8").exists()
    summary = train_module.run(cfg)
    assert summary["resumed_from"].endswith("step_4")
    assert_same_outcome(outcome(Path(cfg.paths.output_dir)), outcome(tmp_path / "whole"))


def test_checkpoints_load_without_executing_code_and_only_the_newest_are_kept(smoke_cfg):
    from transformers import AutoModelForCausalLM

    cfg = smoke_cfg("trainer.max_steps=10", "trainer.save_every=2", "trainer.keep_checkpoints=2")
    train_module.run(cfg)
    folder = Path(cfg.paths.output_dir) / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["final", "step_6", "step_8"]
    for path in folder.iterdir():
        state = torch.load(path / checkpoint.STATE_FILE, weights_only=True)
        torch.load(path / "rng" / "rank_0.pt", weights_only=True)
        assert state["loop"]["step"] == checkpoint.checkpoint_step(path)
        assert json.loads((path / checkpoint.CONFIG_FILE).read_text())["loss"]["beta"] == cfg.loss.beta
    assert AutoModelForCausalLM.from_pretrained(folder / "final").num_parameters() > 0


def test_resuming_with_a_different_config_is_refused_naming_the_keys(smoke_cfg):
    train_module.run(smoke_cfg("trainer.max_steps=4", "trainer.save_every=2"))
    # where logs go and how often checkpoints are written may change; what the run computes may not
    again = train_module.run(smoke_cfg("trainer.max_steps=4", "trainer.save_every=3", "trainer.show_progress=true"))
    assert again["resumed_from"].endswith("final") and again["steps"] == 4
    with pytest.raises(ConfigError, match=r"differs from this one in: loss.beta: 0.1 -> 0.5.*trainer.resume=false"):
        train_module.run(smoke_cfg("trainer.max_steps=4", "trainer.save_every=2", "loss.beta=0.5"))
    with pytest.raises(ConfigError, match=r"holds checkpoints of an earlier run and trainer.resume=false"):
        train_module.run(smoke_cfg("trainer.max_steps=4", "trainer.resume=false"))


def test_a_diverging_run_skips_non_finite_steps_then_stops_naming_the_step_and_metric(smoke_cfg):
    cfg = smoke_cfg("trainer.max_steps=30", "trainer.save_every=1", "trainer.max_skipped_steps=3",
                    "optimizer.lr=1e30", "optimizer.warmup_steps=0", "optimizer.max_grad_norm=0")
    with pytest.raises(train_module.RunStopped, match=r"training diverged: 4 optimizer steps skipped .*first at step "
                                                      r"\d+: train/(loss|grad_norm)=(nan|inf)"):
        train_module.run(cfg)
    run_dir = Path(cfg.paths.output_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["diverged"]["skipped_steps"] == 4
    first = summary["diverged"]["first"]["step"]
    assert summary["steps"] < 30 and not (run_dir / "checkpoints" / "final").exists()
    good = checkpoint.latest(run_dir / "checkpoints")
    assert good is not None and checkpoint.checkpoint_step(good) >= first - 1  # the last checkpoint is kept
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(good / "state", run_dir / "plain.pt")
    weights = torch.load(run_dir / "plain.pt", weights_only=True)["model.policy"]
    assert all(torch.isfinite(w).all() for w in weights.values())  # a skipped step never reaches the weights
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert any(r.get("train/skipped_steps", 0) >= 1 for r in rows)


def test_run_directory_names_are_stable_across_restarts(monkeypatch):
    from dpo_exp.resolvers import run_dir_name

    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "TORCHELASTIC_RUN_ID", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert run_dir_name("beta_sweep_a", "imdb") == "beta_sweep_a"
    assert run_dir_name(None, "imdb").endswith("_imdb")  # the start time
    first = run_dir_name(None, "imdb")
    time.sleep(0.002)
    assert run_dir_name(None, "imdb") != first  # to the millisecond: two commands in one second, two folders
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert run_dir_name(None, "imdb") == "slurm-4242_imdb"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4240")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    assert run_dir_name(None, "imdb") == "slurm-4240_2_imdb"
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc123")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run_dir_name(None, "imdb") == "torchrun-abc123_imdb"


def test_a_resumed_run_continues_the_same_wandb_run(smoke_cfg, monkeypatch):
    import glob

    from conftest import read_wandb_records
    from dpo_exp.loop import Loop

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = smoke_cfg("logger=wandb", "logger.mode=offline", "trainer.max_steps=6", "trainer.save_every=2")
    real = Loop.run_iteration

    def die_at_step_3(self, bar):
        if self.step == 3 and self.label == "train":  # the run's own loop, not the SFT stage an empty cache builds
            raise KeyboardInterrupt("killed")
        return real(self, bar)

    monkeypatch.setattr(Loop, "run_iteration", die_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_module.run(cfg)
    monkeypatch.setattr(Loop, "run_iteration", real)
    summary = train_module.run(cfg)
    assert summary["resumed_from"].endswith("step_2") and summary["steps"] == 6
    run_files = sorted(glob.glob(str(Path(cfg.paths.output_dir) / "wandb" / "offline-run-*" / "run-*.wandb")))
    ids = {r.run.run_id for f in run_files for r in read_wandb_records(f) if r.WhichOneof("record_type") == "run"}
    assert len(run_files) == 2 and ids == {(Path(cfg.paths.output_dir) / "wandb_run_id").read_text()}


def test_a_checkpoint_from_before_a_key_existed_resumes_when_the_key_is_null():
    """A newer dpo_exp adds config keys (model.chat_template, trainer.logits_chunk_tokens): a run saved before them
    resumes while they are null (what ran then), and is refused when one is set to something that changes results."""
    from dpo_exp.checkpoint import config_differences

    saved = {"model": {"name": "tiny_llama"}, "loss": {"beta": 0.1}}
    current = {"model": {"name": "tiny_llama", "chat_template": None}, "loss": {"beta": 0.1},
               "trainer": {"logits_chunk_tokens": 512}}
    assert config_differences(saved, current) == []  # the chunk is memory, not results (RESUMABLE_CHANGES)
    current["model"]["chat_template"] = "chatml"
    assert config_differences(saved, current) == ["model.chat_template: '<absent>' -> 'chatml'"]
    current["loss"]["beta"] = 0.5
    assert "loss.beta: 0.1 -> 0.5" in config_differences(saved, current)
