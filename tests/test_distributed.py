"""Data parallelism on FSDP2 under torchrun (gloo, 2 processes on this CPU): a 2-process run takes the same
optimizer steps as 1 process with the same global batch; a 2-process checkpoint resumes in 1 process; every
algorithm and both cached training stages run sharded. The sharing rules themselves (equal shares, stand-in
micro-batches) are checked in-process with a faked world."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, read_jsonl

sys.path.insert(0, str(ROOT / "scripts"))
from chaos import kill_tree  # noqa: E402  (SIGKILL a process tree at once, as when a node is lost)

from dpo_exp import distributed
from dpo_exp.loop import Loop, LoopSettings

TOL = 1e-5
# 12 training pairs, 4 per step: 3.25 epochs are 10 steps whose last holds 3 pairs, so with 2 ranks and 2
# micro-batches one rank runs a stand-in micro-batch; evaluation at 5 and 10 over 6 held-out pairs, 2 per batch.
DPO = ["trainer.batch_size=4", "trainer.grad_accumulation_steps=2", "trainer.max_steps=null", "trainer.epochs=3.25",
       "trainer.eval_every=5", "trainer.eval_batch_size=2", "trainer.save_every=5", "trainer.keep_checkpoints=0"]
# evaluation numbers that come from the models' log-probs of fixed pairs (sampled ones differ: each rank draws
# its own noise)
PAIR_METRICS = ("eval/loss", "eval/logps/chosen", "eval/logps/rejected", "eval/rewards/margins",
                "eval/rewards/chosen", "eval/rewards/rejected")


def command(processes: int, run_dir: Path, cache: Path, overrides: list[str]) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    return [*launcher, "-m", "dpo_exp.train", "debug=smoke", f"paths.cache_dir={cache}", f"hydra.run.dir={run_dir}",
            *overrides]


def run(processes: int, run_dir: Path, cache: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command(processes, run_dir, cache, overrides), cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done


def train_rows(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r}


def eval_rows(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_jsonl(run_dir / "metrics.jsonl") if "eval/loss" in r}


def assert_same_steps(a: Path, b: Path, first: int = 1) -> None:
    """The loss, gradient norm and held-out pair metrics of every step agree within TOL."""
    ta, tb = train_rows(a), train_rows(b)
    assert sorted(ta) == sorted(tb) == list(range(1, 11))
    for step in range(first, 11):
        for key in ("train/loss", "train/grad_norm", "train/rewards/margins", "train/logps/chosen"):
            assert math.isclose(ta[step][key], tb[step][key], rel_tol=TOL, abs_tol=TOL), (step, key, ta[step][key],
                                                                                            tb[step][key])
    ea, eb = eval_rows(a), eval_rows(b)
    for step in (s for s in (5, 10) if s >= first):
        for key in PAIR_METRICS:
            assert math.isclose(ea[step][key], eb[step][key], rel_tol=TOL, abs_tol=TOL), (step, key)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "final").state_dict()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("dist_cache")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, cache):
    """The reference: DPO in one process (it also builds π_SFT and the pairs every other run here reuses)."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    run(1, run_dir, cache, DPO)
    return run_dir


# ---- the sharing rules, in-process with a faked world ---------------------------------------------------------

def fake_world(monkeypatch, rank: int, world: int) -> None:
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    monkeypatch.setattr(distributed, "rank", lambda: rank)


@pytest.mark.parametrize("n", [1, 5, 8])
def test_shares_are_equal_on_every_rank_and_cover_each_row_once(monkeypatch, n):
    world = 3
    seen = []
    for r in range(world):
        fake_world(monkeypatch, r, world)
        rows, real = distributed.share(n)
        assert len(rows) == math.ceil(n / world)  # as many forward passes on every rank
        seen += [row for row, keep in zip(rows, real) if keep]
        batches = distributed.shared_batches(n, batch_size=2)
        assert len(batches) == math.ceil(math.ceil(n / world) / 2)
        assert all(rows_ if keep else rows_ == [0] for rows_, keep in batches)
    assert seen == list(range(n))


def test_each_rank_takes_its_slice_of_a_step_with_stand_ins_where_it_has_no_rows(monkeypatch):
    class Step:
        def __len__(self):
            return 3

        def select(self, rows):
            return list(rows)

    loop = SimpleNamespace(settings=LoopSettings(grad_accumulation_steps=2))
    fake_world(monkeypatch, 0, 2)
    assert Loop.micro_batches(loop, Step()) == [([0], True), ([1], True)]
    fake_world(monkeypatch, 1, 2)
    assert Loop.micro_batches(loop, Step()) == [([2], True), ([0], False)]  # same count, the second adds nothing
    fake_world(monkeypatch, 0, 1)
    assert [m for m, _ in Loop.micro_batches(loop, Step())] == [[0, 1], [2]]


# ---- torchrun, 2 processes on gloo ------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_processes_take_the_single_process_steps(tmp_path, cache, one_process):
    """...with prompts shared, pairs packed and log-probs through the LM head in 8-token chunks on the two ranks
    (one process: prompts shared, the default, not packed, the whole head at once), so packing and the chunked
    head (the tied head's weight as FSDP2 gathers it, its gradient reduced) are checked sharded too."""
    two = tmp_path / "two"
    run(2, two, cache, DPO + ["trainer.share_prompt=true", "trainer.pack=true", "trainer.logits_chunk_tokens=8"])
    assert_same_steps(one_process, two)
    config = json.loads((two / "checkpoints" / "final" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]  # not FSDP's renamed class
    a, b = final_weights(one_process), final_weights(two)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=TOL) for k in a)
    assert sorted(p.name for p in (two / "checkpoints" / "final" / "rng").iterdir()) == ["rank_0.pt", "rank_1.pt"]
    summary = json.loads((two / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["steps"] == 10


@pytest.mark.slow
def test_a_two_process_run_killed_after_a_checkpoint_resumes_in_one_process(tmp_path, cache, one_process):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(command(2, run_dir, cache, DPO), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    saved = run_dir / "checkpoints" / "step_5"
    deadline = time.time() + 600
    while not saved.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    kill_tree(proc.pid)  # the whole job dies at once, as when a node is lost
    proc.communicate(timeout=60)
    assert saved.exists() and not (run_dir / "summary.json").exists()
    again = run(1, run_dir, cache, DPO)
    assert "resuming from" in again.stdout
    assert_same_steps(one_process, run_dir, first=6)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"].endswith(("step_5", "step_10")) and summary["steps"] == 10


@pytest.mark.slow
def test_a_two_process_checkpoint_missing_a_rank_shard_is_skipped_or_refused(tmp_path, cache, capsys):
    """Each rank lists its own shard and generators in the manifest. With rank 1's shard gone from the newest
    checkpoint, the older one is used (and resumed in one process); with it gone from every one, none is."""
    import shutil

    from dpo_exp import checkpoint
    from dpo_exp.errors import ConfigError

    overrides = ["trainer.max_steps=4", "trainer.save_every=2", "trainer.eval_every=2"]  # step_2, then final
    run_dir, shard = tmp_path / "run", Path("state") / "__1_0.distcp"
    run(2, run_dir, cache, overrides)
    folder = run_dir / "checkpoints"
    manifest = json.loads((folder / "final" / checkpoint.MANIFEST).read_text())
    owners = {name: entry["rank"] for name, entry in manifest["files"].items()}
    assert manifest["world_size"] == 2 and owners[shard.as_posix()] == owners["rng/rank_1.pt"] == 1
    assert owners["state/__0_0.distcp"] == 0

    alone = tmp_path / "alone" / "checkpoints"  # the older checkpoint by itself, its shard gone too
    shutil.copytree(folder / "step_2", alone / "step_2")
    (alone / "step_2" / shard).unlink()
    with pytest.raises(ConfigError, match=r"no intact .*__1_0.distcp is missing \(written by rank 1 of 2\)"):
        checkpoint.latest(alone)

    (folder / "final" / shard).unlink()
    capsys.readouterr()
    assert checkpoint.latest(folder) == folder / "step_2"
    [warning] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dpo_exp: warning:")]
    assert f"{folder / 'final' / shard} is missing (written by rank 1 of 2)" in warning
    again = run(1, run_dir, cache, overrides)
    assert "resuming from" in again.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step_2") and summary["steps"] == 4
    assert checkpoint.verify(folder / "final") is None


# Started in every process of the run below (a sitecustomize module on PYTHONPATH): rank 1 alone finds the disk full
# as it writes its generators into checkpoints/step_4, a write that is its own (no collective hands the error on).
RANK_1_DISK_FULL = """
import errno, os
if os.environ.get("RANK") == "1":
    import torch
    real = torch.save
    def save(obj, f, *args, **kwargs):
        if ".tmp_step_4/rng" in str(getattr(f, "name", f)):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *args, **kwargs)
    torch.save = save
"""


@pytest.mark.slow
def test_a_checkpoint_write_refused_on_one_rank_stops_every_rank_readably(tmp_path, cache):
    overrides = ["trainer.max_steps=6", "trainer.save_every=2", "trainer.eval_every=2"]
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(RANK_1_DISK_FULL)
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(tmp_path / "inject"), str(ROOT)])}
    failed = subprocess.run(command(2, run_dir, cache, overrides), cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env=env)
    assert failed.returncode != 0
    folder = run_dir / "checkpoints"
    said = (f"dpo_exp: error: could not write {folder / 'step_4'}: No space left on device. "
            f"Intact: {folder / 'step_2'} (step 2)")
    assert failed.stderr.count(said) == 2, failed.stderr[-4000:]  # both ranks stopped, neither waits at a barrier
    assert "Traceback" not in failed.stderr.split("dpo_exp: error:")[0], failed.stderr[-4000:]
    assert [p.name for p in folder.iterdir()] == ["step_2"]  # the temporary folder is gone
    again = run(2, run_dir, cache, overrides)
    assert "resuming from" in again.stdout
    rows = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
    assert rows == [1, 2, 3, 4, 5, 6]  # none twice


@pytest.mark.slow
def test_every_algorithm_and_both_cached_stages_train_sharded(tmp_path, cache, one_process):
    fresh = tmp_path / "cache"  # π_SFT and the reward model are trained by both ranks here, written by rank 0
    run(2, tmp_path / "sft", fresh, ["loss=sft"])
    sft_entries = list((fresh / "sft").glob("*/model.safetensors"))
    reference = list((cache / "sft").glob("*/model.safetensors"))
    assert [p.parent.name for p in sft_entries] == [p.parent.name for p in reference]  # the same cache key
    from safetensors.torch import load_file
    a, b = load_file(sft_entries[0]), load_file(reference[0])
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=TOL) for k in a)
    for name, overrides in [("reward_model", ["loss=reward_model"]), ("ppo", ["loss=ppo"]),
                            ("online_dpo", ["loss=online_dpo"])]:
        run(2, tmp_path / name, fresh, overrides)
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["steps"] > 0, name
        finite = [v for k, v in summary.items() if k.startswith("eval/") and isinstance(v, float)]
        assert finite and all(math.isfinite(v) for v in finite), name
    assert (tmp_path / "ppo" / "checkpoints" / "final" / "value" / "score_head.safetensors").exists()
    ppo_rows = read_jsonl(tmp_path / "ppo" / "metrics.jsonl")
    assert [r["step"] for r in ppo_rows if "train/kl_coef" in r] == [1, 2, 3]


@pytest.mark.slow
def test_a_lora_adapter_trains_sharded_to_the_single_process_adapter(tmp_path, cache, one_process):
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    runs = {n: tmp_path / f"lora{n}" for n in (1, 2)}
    for n, run_dir in runs.items():
        run(n, run_dir, cache, ["model.lora.r=4"])
    adapters = [load_file(runs[n] / "checkpoints" / "final" / "adapter_model.safetensors") for n in (1, 2)]
    merged = [load_file(runs[n] / "checkpoints" / "final" / "merged" / "model.safetensors") for n in (1, 2)]
    for a, b in (adapters, merged):
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=TOL) for k in a)
    assert any(v.abs().max() > 0 for k, v in adapters[1].items() if "lora_B" in k)  # the adapter moved


@pytest.mark.slow
def test_two_torchrun_agents_rendezvous_as_two_nodes_of_one_job(tmp_path, cache, one_process):
    import socket

    with socket.socket() as s:  # a free port for the c10d rendezvous
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    nodes = [[sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
              f"--rdzv-endpoint=localhost:{port}", "--rdzv-id=twonodes", "-m", "dpo_exp.train", "debug=smoke",
              f"paths.cache_dir={cache}", f"paths.root_dir={tmp_path}", *DPO] for _ in range(2)]
    agents = [subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}) for argv in nodes]
    outputs = [agent.communicate(timeout=600)[0] for agent in agents]
    assert [a.returncode for a in agents] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    run_dir = tmp_path / "outputs" / "runs" / "torchrun-twonodes_synthetic_reviews_dpo"  # named by the rdzv id
    assert sorted(p.name for p in (run_dir / "checkpoints" / "final" / "rng").iterdir()) == ["rank_0.pt", "rank_1.pt"]
    assert_same_steps(one_process, run_dir)
