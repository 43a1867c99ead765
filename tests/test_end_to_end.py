"""Whole runs through the real config and entry point, on the debug=smoke budget
(and the full default experiment, marked slow)."""
import glob
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, read_jsonl, read_wandb_records
from dpo_exp import pipeline, train as train_module
from dpo_exp.errors import ConfigError
from dpo_exp.algorithms import ALGORITHMS

TRAIN_KEYS = {"train/loss", "train/rewards/chosen", "train/rewards/rejected", "train/rewards/margins",
              "train/rewards/accuracies", "train/logps/chosen", "train/logps/rejected", "train/grad_norm",
              "train/learning_rate", "train/pairs_per_second"}
EVAL_KEYS = {"eval/loss", "eval/rewards/chosen", "eval/rewards/rejected", "eval/rewards/margins",
             "eval/rewards/accuracies", "eval/logps/chosen", "eval/logps/rejected", "eval/kl", "eval/kl_stderr",
             "eval/gold_reward", "eval/gold_reward_ref", "eval/log_ratio_accuracy", "eval/truncated_fraction",
             "eval/truncated_fraction_ref"}
TIMING_KEYS = {"train/pairs_per_second", "train/tokens_per_second", "train/seconds", "eval/seconds", "wall_seconds",
               "cost/train_seconds"}


def logged_keys(run_dir: Path) -> set:
    return {k for row in read_jsonl(run_dir / "metrics.jsonl") for k in row}


def test_smoke_run_writes_metrics_summary_samples_and_a_loadable_checkpoint(smoke_cfg):
    from transformers import AutoModelForCausalLM

    cfg = smoke_cfg("trainer.count_flops=true")
    summary = train_module.run(cfg)
    run_dir = Path(cfg.paths.output_dir)
    assert TRAIN_KEYS | EVAL_KEYS <= logged_keys(run_dir)
    flops = [row["cost/train_flops"] for row in read_jsonl(run_dir / "metrics.jsonl") if "cost/train_flops" in row]
    assert flops[0] == 0 and all(b > a for a, b in zip(flops, flops[1:]))  # counted, growing with each step
    assert all("step" in row for row in read_jsonl(run_dir / "metrics.jsonl"))
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert EVAL_KEYS <= set(on_disk) and on_disk["steps"] == 4 == summary["steps"]
    samples = read_jsonl(run_dir / "samples.jsonl")
    assert samples and {"prompt", "policy", "reference", "step"} <= set(samples[0])
    final = run_dir / "checkpoints" / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    assert sum(p.numel() for p in model.parameters()) > 0
    state = torch.load(final / "trainer_state.pt", weights_only=True)
    assert state["loop"]["step"] == 4 and state["schedulers"]["policy"]["last_epoch"] == 4
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(final / "state", run_dir / "plain.pt")  # every optimizer's state is in the checkpoint
    assert torch.load(run_dir / "plain.pt", weights_only=True)["optim.policy"]["state"]


def test_kl_is_zero_before_training_and_positive_after(smoke_cfg):
    cfg = smoke_cfg("optimizer.lr=1e-2", "optimizer.warmup_steps=0")
    train_module.run(cfg)
    evals = [row for row in read_jsonl(Path(cfg.paths.output_dir) / "metrics.jsonl") if "eval/kl" in row]
    assert evals[0]["step"] == 0 and evals[0]["eval/kl"] == 0.0
    assert evals[-1]["eval/kl"] > 0


def test_the_same_seed_repeats_the_run_exactly(smoke_cfg, tmp_path):
    rows = []
    for name in ("a", "b"):
        cfg = smoke_cfg(f"paths.output_dir={tmp_path / name}")
        train_module.run(cfg)
        rows.append([{k: v for k, v in r.items() if k not in TIMING_KEYS}
                     for r in read_jsonl(tmp_path / name / "metrics.jsonl")])
    assert rows[0] == rows[1]


TRAINED_BY_NAME = sorted(name for name, cls in ALGORITHMS.items() if not getattr(cls, "cached", False))


def _weights(folder):
    from transformers import AutoModelForCausalLM

    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(folder).state_dict().items()}


@pytest.mark.parametrize("loss", TRAINED_BY_NAME)
def test_every_algorithm_trains_by_name_and_lowers_its_loss(smoke_cfg, loss, monkeypatch):
    """Every registered algorithm (every DPO-family loss, SFT, PPO, online DPO) trains through the CLI
    config: its weights move, its training objective falls, and π_ref is held only when declared."""
    resident_flags = []
    real_init = pipeline.Reference.__init__

    def spy(self, load, resident, *args, **kwargs):
        resident_flags.append(resident)
        real_init(self, load, resident, *args, **kwargs)

    monkeypatch.setattr(pipeline.Reference, "__init__", spy)
    cfg = smoke_cfg(f"loss={loss}", "trainer.max_steps=16", "ppo.total_iterations=8", "optimizer.lr=3e-3",
                    "optimizer.warmup_steps=0", "ppo.lr=3e-3", "ppo.reward=gold",
                    "trainer.eval_every=100", "ppo.eval_every=100", "reference.precompute=false",  # resident if needed
                    # PPO: a vocabulary at which the tiny model's reviews fit its SFT length, so it learns to stop
                    # and its rollouts are not all scored as missing an EOS (a constant reward teaches nothing)
                    *(["data.vocab_size=1024", "sft.max_steps=120", "ppo.max_new_tokens=48"] if loss == "ppo" else []))
    summary = train_module.run(cfg)
    run_dir = Path(cfg.paths.output_dir)
    needs = ALGORITHMS[loss].needs(cfg)
    assert resident_flags == [needs.reference]  # no reference held while training when none is needed
    assert "eval/kl" in summary  # still measured the same way: π_ref is loaded for evaluation only
    before, after = _weights(summary["sft_policy"]), _weights(run_dir / "checkpoints" / "final")
    moved = sum((after[k] - before[k]).abs().sum().item() for k in before)
    assert moved > 0
    rows = read_jsonl(run_dir / "metrics.jsonl")
    # the objective each algorithm maximises or minimises, from its own train metrics
    key, sign = {"ppo": ("train/rlhf_reward", -1)}.get(loss, ("train/loss", 1))
    values = [sign * r[key] for r in rows if key in r]
    assert len(values) >= 6 and all(math.isfinite(v) for v in values)
    third = len(values) // 3
    first, last = sum(values[:third]) / third, sum(values[-third:]) / third
    assert last < first, (loss, values)
    # one name, one computation: the implicit reward exists only where the algorithm has one (at its own β)
    implicit_reward = ALGORITHMS[loss].family in ("dpo-family", "online-dpo")
    assert any(k.startswith("eval/rewards/") for k in summary) == implicit_reward, sorted(summary)
    assert ("eval/loss" in summary) == (loss != "ppo")  # PPO has no loss on held-out pairs
    assert {"eval/log_ratio_accuracy", "eval/logps/chosen", "eval/truncated_fraction",
            "eval/truncated_fraction_ref"} <= set(summary)


def test_precomputed_reference_gives_the_same_training(smoke_cfg, tmp_path):
    losses = []
    for name, precompute in (("resident", "false"), ("precomputed", "true")):
        cfg = smoke_cfg(f"reference.precompute={precompute}", f"paths.output_dir={tmp_path / name}")
        train_module.run(cfg)
        losses.append([r["train/loss"] for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "train/loss" in r])
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)


def test_main_returns_the_objective_for_sweepers(smoke_cfg):
    value = train_module.main.__wrapped__(smoke_cfg("objective=eval/kl"))
    assert isinstance(value, float)
    with pytest.raises(ConfigError, match="not in summary.json"):
        train_module._main(smoke_cfg("objective=eval/no_such_metric"))  # main prints it and exits 2 (test_errors)


def test_offline_wandb_run_holds_the_logged_metrics_and_config(smoke_cfg, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = smoke_cfg("logger=wandb", "logger.mode=offline")
    train_module.run(cfg)
    files = glob.glob(str(Path(cfg.paths.output_dir) / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    records = read_wandb_records(files[0])
    history = {item.key or "/".join(item.nested_key) for r in records if r.WhichOneof("record_type") == "history"
               for item in r.history.item}
    assert TRAIN_KEYS | EVAL_KEYS <= history
    assert any(k.startswith("eval/samples") for k in history)  # the sample table
    config_keys = {item.key for r in records if r.WhichOneof("record_type") == "run" for item in r.run.config.update}
    assert {"loss", "model", "optimizer", "trainer"} <= config_keys
    assert any(r.WhichOneof("record_type") == "exit" for r in records)  # finished, not left open


@pytest.mark.slow
def test_multirun_beta_sweep_trains_sft_once(tmp_path):
    cmd = [sys.executable, "-m", "dpo_exp.train", "-m", "loss.beta=0.1,0.5", "debug=smoke",
           f"paths.root_dir={tmp_path}", "logger=wandb", "logger.mode=offline"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = sorted(glob.glob(str(tmp_path / "outputs" / "multirun" / "*" / "*" / "*" / "summary.json")))
    assert len(summaries) == 2
    assert [json.loads(Path(s).read_text())["steps"] for s in summaries] == [4, 4]
    assert len([p for p in (tmp_path / "outputs" / "cache" / "sft").iterdir() if p.is_dir()]) == 1  # trained once
    groups = set()
    for run_file in glob.glob(str(tmp_path / "outputs" / "multirun" / "*" / "*" / "*" / "wandb" / "*" / "run-*.wandb")):
        groups |= {r.run.run_group for r in read_wandb_records(run_file) if r.WhichOneof("record_type") == "run"}
    assert len(groups) == 1 and groups.pop()  # both jobs in one W&B group


@pytest.mark.slow
def test_default_experiment_raises_gold_reward_over_sft(tmp_path):
    """The README's default run, unchanged: DPO must end clearly above π_SFT on gold reward."""
    proc = subprocess.run([sys.executable, "-m", "dpo_exp.train", f"paths.root_dir={tmp_path}",
                           "trainer.show_progress=false"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(next((tmp_path / "outputs" / "runs").rglob("summary.json")).read_text())
    assert summary["eval/gold_reward"] > summary["eval/gold_reward_ref"] + 0.1
    assert summary["eval/rewards/accuracies"] > 0.6
    assert summary["eval/kl"] > 0


def test_a_given_sft_checkpoint_is_used_instead_of_training(smoke_cfg, tmp_path):
    first = smoke_cfg(f"paths.output_dir={tmp_path / 'first'}")
    train_module.run(first)
    checkpoint = tmp_path / "first" / "checkpoints" / "final"
    cfg = smoke_cfg(f"sft.checkpoint={checkpoint}", f"paths.cache_dir={tmp_path / 'empty_cache'}",
                    f"paths.output_dir={tmp_path / 'second'}")
    summary = train_module.run(cfg)
    assert summary["sft_policy"] == str(checkpoint)
    assert not (tmp_path / "empty_cache" / "sft").exists()  # nothing trained


def test_bf16_autocast_runs_with_float32_log_probs(smoke_cfg, monkeypatch):
    """Under bf16 autocast the matmuls run in bfloat16 but every log-prob comes out float32."""
    from dpo_exp.models import logps as logps_module

    seen = []
    real = logps_module.sequence_logps

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append((torch.is_autocast_enabled("cpu"), out.logps.dtype))
        return out

    for module in ("dpo_exp.algorithms.preference", "dpo_exp.reference", "dpo_exp.evaluation"):
        monkeypatch.setattr(f"{module}.sequence_logps", spy)
    summary = train_module.run(smoke_cfg("trainer.precision=bf16"))
    assert math.isfinite(summary["eval/loss"])
    assert any(autocast for autocast, _ in seen)  # the training forwards ran under autocast
    assert {dtype for _, dtype in seen} == {torch.float32}


PPO_KEYS = {"train/reward", "train/kl", "train/rlhf_reward", "train/kl_coef", "train/policy_loss", "train/value_loss",
            "train/clipfrac", "train/approx_kl", "train/entropy", "train/response_length", "train/eos_fraction",
            "train/rollout_seconds", "train/update_seconds"}


def printed_summary(capsys) -> list[str]:
    out = capsys.readouterr().out
    return out[out.rindex("== dpo_exp summary"):].splitlines()


def test_reward_model_then_ppo_and_online_dpo_reuse_one_cached_reward_model(smoke_cfg, tmp_path, capsys):
    cache = tmp_path / "cache"
    rm = train_module.run(smoke_cfg("loss=reward_model", f"paths.cache_dir={cache}",
                                    f"paths.output_dir={tmp_path / 'rm'}"))
    assert {"eval/accuracy", "eval/loss", "eval/margin"} <= set(rm) and rm["cost/reward_model_flops"] > 0
    lines = printed_summary(capsys)  # the reward model's own numbers, not the policy's n/a
    assert f"held-out preference accuracy (reward model): {rm['eval/accuracy']:.4f}" in lines
    assert f"held-out mean margin r(y_w) - r(y_l): {rm['eval/margin']:.4f}" in lines
    assert not any("n/a" in line or "gold reward" in line or "beta" in line for line in lines)
    entry = next((cache / "reward_model").glob("*/COMPLETE"))
    # its training curves are in the run's own folder too, as the cache entry recorded them
    curves = [r for r in read_jsonl(tmp_path / "rm" / "metrics.jsonl") if "train/loss" in r]
    assert curves and curves == [r for r in read_jsonl(entry.parent / "metrics.jsonl") if "train/loss" in r]
    assert {"train/accuracy", "train/margin"} <= set(curves[-1])
    built_at = entry.stat().st_mtime_ns
    cfg = smoke_cfg("loss=ppo", f"paths.cache_dir={cache}", f"paths.output_dir={tmp_path / 'ppo'}",
                    "trainer.count_flops=true")
    summary = train_module.run(cfg)
    lines = printed_summary(capsys)  # PPO: the gold reward and KL of its samples, no implicit-reward stand-in
    assert f"{ALGORITHMS['ppo'].label(cfg)} (loss=ppo)" in lines[0]
    assert f"gold reward  pi_ref (pi_SFT): {summary['eval/gold_reward_ref']:.4f}   policy: " \
           f"{summary['eval/gold_reward']:.4f}" in lines
    assert any(line.startswith(f"KL(pi||pi_ref): {summary['eval/kl']:.4f} +- ") for line in lines)
    assert not any("n/a" in line or "implicit reward" in line for line in lines)
    online = train_module.run(smoke_cfg("loss=online_dpo", f"paths.cache_dir={cache}",
                                        f"paths.output_dir={tmp_path / 'online'}"))
    assert len(list((cache / "reward_model").glob("*/COMPLETE"))) == 1 and entry.stat().st_mtime_ns == built_at
    assert summary["cost/reward_model_flops"] == online["cost/reward_model_flops"] == rm["cost/reward_model_flops"]
    assert summary["algorithm/stages"] == online["algorithm/stages"] == ["pair_sampling", "reward_model"]
    assert PPO_KEYS <= logged_keys(Path(cfg.paths.output_dir))
    assert {"eval/kl", "eval/gold_reward", "eval/gold_reward_ref", "cost/train_flops"} <= set(summary)
    assert summary["cost/train_flops"] > 0 and summary["cost/reward_model_flops"] > 0


def test_ppo_with_the_gold_reward_needs_no_reward_model(smoke_cfg, tmp_path):
    cfg = smoke_cfg("loss=ppo", "ppo.reward=gold", f"paths.cache_dir={tmp_path / 'cache'}")
    summary = train_module.run(cfg)
    assert not (tmp_path / "cache" / "reward_model").exists()
    assert "cost/reward_model_flops" not in summary and summary["steps"] == 3


@pytest.mark.slow
def test_compare_preset_frontier_and_table(tmp_path):
    """The comparison multirun (5 of its arms, tiny budget), then the frontier PNG and the table."""
    cmd = [sys.executable, "-m", "dpo_exp.train", "experiment=compare_sentiment", "debug=smoke",
           "method=preferred_ft,dpo_b0p1,ppo_kl3,ppo_gt,online_dpo_b0p1", f"paths.root_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = next((tmp_path / "outputs" / "multirun").glob("*/*"))
    png = tmp_path / "frontier.png"
    subprocess.run([sys.executable, "scripts/frontier.py", str(sweep), "-o", str(png)], cwd=ROOT, check=True,
                   timeout=300)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = subprocess.run([sys.executable, "scripts/compare.py", str(sweep)], cwd=ROOT, check=True, timeout=300,
                           capture_output=True, text=True).stdout
    for label in ("Preferred-FT", "DPO β=0.1", "PPO target KL=3", "PPO-GT", "Online DPO β=0.1 (RM)", "ppo / DPO compute",
                  "online-dpo / DPO compute", "cheapest point reaching"):
        assert label in table
    cache = tmp_path / "outputs" / "cache"
    for stage in ("sft", "reward_model"):  # trained once, shared by every arm
        assert len(list((cache / stage).glob("*/COMPLETE"))) == 1


def test_evaluation_temperature_sweep_logs_each_temperature_and_greedy_is_greedy(smoke_cfg):
    """eval.temperatures: a gold reward per temperature and a sample table per temperature at every
    evaluation; T = 0 is greedy decoding, so its samples are the model's argmax continuations."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_exp.data import prompt_token_ids
    from dpo_exp.models import sample

    cfg = smoke_cfg("eval.temperatures=[0,0.7]")
    summary = train_module.run(cfg)
    run_dir = Path(cfg.paths.output_dir)
    evals = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "eval/kl" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert all({"eval/gold_reward/T=0", "eval/gold_reward/T=0.7"} <= set(r) for r in evals)
    samples = read_jsonl(run_dir / "samples.jsonl")
    greedy = [r for r in samples if r["table"] == "eval/samples/T=0"]
    assert len(greedy) == 3 * cfg.eval.num_prompts and {r["temperature"] for r in greedy} == {0}
    assert len([r for r in samples if r["table"] == "eval/samples/T=0.7"]) == 3 * cfg.eval.num_prompts
    # step 0 is π_SFT: its T = 0 rows are π_SFT's greedy continuations of the same prompts
    tokenizer = AutoTokenizer.from_pretrained(summary["sft_policy"])
    sft = AutoModelForCausalLM.from_pretrained(summary["sft_policy"])
    first = [r for r in greedy if r["step"] == 0]
    ids = [prompt_token_ids(tokenizer, r["prompt"]) for r in first]
    expected = sample(sft, tokenizer, ids, cfg.task.generation.max_new_tokens, temperature=0).texts
    assert [r["policy"] for r in first] == expected
