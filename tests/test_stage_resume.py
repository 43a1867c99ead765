"""Cached stages resume: π_SFT and the reward model, interrupted while they are built into the cache, continue from
the newest checkpoint in the entry's build folder when the same command is rerun, and the entry they complete
equals an uninterrupted build's (weights within 1e-5, each metrics row once). A finished entry holds no
checkpoints/."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, read_jsonl
from dpo_exp import train as train_module
from dpo_exp.cache import BUILDING, CHECKPOINTS, COMPLETE
from dpo_exp.models import sampling
from test_resume import interrupt, run_cli, untimed

# The reward model trains 30 steps here (2 per epoch at debug=smoke), π_SFT 40: both checkpoint several times.
# Pairs are sampled one prompt at a time (96 batches), so that sampling can be interrupted between two.
STAGES = ["loss=reward_model", "sft.save_every=15", "reward_model.save_every=4", "reward_model.epochs=15",
          "task.generation.batch_size=1"]
TOLERANCE = 1e-5  # as the main loop's resume tests


def entry(cache: Path, kind: str) -> Path:
    (folder,) = [p.parent for p in (cache / kind).glob(f"*/{COMPLETE}")]
    return folder


def weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update({f"{file.name}:{k}": v for k, v in load_file(file).items()})
    return tensors


def rows(folder: Path) -> list[dict]:
    return [untimed(r) for r in read_jsonl(folder / "metrics.jsonl")]


def assert_same_entry(got: Path, want: dict) -> None:
    """Weights within TOLERANCE and the same metrics rows (each step once) as the uninterrupted build's."""
    got_weights, got_rows = weights(got), rows(got)
    assert got_weights.keys() == want["weights"].keys()
    worst = max((a.float() - want["weights"][k].float()).abs().max().item() for k, a in got_weights.items())
    assert worst <= TOLERANCE, worst
    steps = [(r["step"], tuple(sorted(r))) for r in got_rows]
    assert steps == [(r["step"], tuple(sorted(r))) for r in want["rows"]]
    assert len(steps) == len(set(steps))  # no row twice
    for row, expected in zip(got_rows, want["rows"]):
        for key, value in row.items():
            assert value == pytest.approx(expected[key], rel=1e-4, abs=1e-6), (row["step"], key)
    assert not (got / CHECKPOINTS).exists()
    assert not list(got.parent.glob(f"*{BUILDING}"))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """π_SFT and the reward model built without interruption (the rest of the cache reused by the tests)."""
    root = tmp_path_factory.mktemp("stage_resume")
    cache = root / "cache"
    done = run_cli(root / "run", cache, STAGES)
    assert done.returncode == 0, done.stderr[-3000:]
    entries = {kind: entry(cache, kind) for kind in ("sft", "reward_model", "pairs")}
    for folder in entries.values():
        assert not (folder / CHECKPOINTS).exists() and not list(folder.parent.glob(f"*{BUILDING}"))
    return cache, {kind: {"weights": weights(f), "rows": rows(f) if kind != "pairs" else [], "folder": f}
                   for kind, f in entries.items()}


def _logged_past(metrics: Path, step: int):
    def past() -> bool:
        if not metrics.exists():
            return False
        for line in metrics.read_text().splitlines():
            try:
                if json.loads(line)["step"] >= step:
                    return True
            except ValueError:  # a line being written
                pass
        return False
    return past


@pytest.mark.slow
def test_a_killed_sft_build_resumes_to_the_uninterrupted_entry(tmp_path, built):
    cache, want = built
    final = want["sft"]["folder"]
    shutil.rmtree(final)  # built again at the same place; the later stages' entries, keyed by it, stay valid
    building = final.with_name(final.name + BUILDING)
    # the row of step 20 is logged after the checkpoint of step 15: the rerun must cut it and log it once
    status, err = interrupt(tmp_path / "run", cache, STAGES, _logged_past(building / "metrics.jsonl", 20),
                            signal.SIGKILL)
    assert status == -signal.SIGKILL, err[-2000:]
    assert not final.exists() and (building / CHECKPOINTS / "step_15").is_dir()
    again = run_cli(tmp_path / "run", cache, STAGES)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "continuing the interrupted build" in again.stdout and "resuming from" in again.stdout
    assert_same_entry(final, want["sft"])


@pytest.mark.slow
def test_a_preempted_reward_model_build_resumes_to_the_uninterrupted_entry(tmp_path, built):
    cache, want = built
    final = want["reward_model"]["folder"]
    shutil.rmtree(final)
    building = final.with_name(final.name + BUILDING)
    status, err = interrupt(tmp_path / "run", cache, STAGES, _logged_past(building / "metrics.jsonl", 10),
                            signal.SIGTERM)
    assert status == train_module.PREEMPTED_EXIT_CODE, err[-2000:]
    assert not final.exists() and list((building / CHECKPOINTS).glob("step_*"))
    again = run_cli(tmp_path / "run", cache, STAGES)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "continuing the interrupted build" in again.stdout and "resuming from" in again.stdout
    assert_same_entry(final, want["reward_model"])


@pytest.mark.slow
def test_a_killed_two_process_sft_build_resumes_to_the_uninterrupted_entry(tmp_path, built):
    """torchrun: every rank trains π_SFT in rank 0's build folder (`_build_together`); the whole job is killed at once
    and the same command continues from the newest checkpoint."""
    from test_distributed import command, kill_tree

    cache, want = built
    final = want["sft"]["folder"]
    shutil.rmtree(final)
    building = final.with_name(final.name + BUILDING)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command(2, tmp_path / "run", cache, STAGES), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)
    logged = _logged_past(building / "metrics.jsonl", 20)
    deadline = time.time() + 600
    while not logged() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    kill_tree(proc.pid)  # the whole job dies at once, as when a node is lost
    proc.communicate(timeout=60)
    assert not final.exists() and (building / CHECKPOINTS / "step_15").is_dir()
    again = subprocess.run(command(2, tmp_path / "run", cache, STAGES), cwd=ROOT, capture_output=True, text=True,
                           timeout=600, env=env)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "continuing the interrupted build" in again.stdout and "resuming from" in again.stdout
    got = weights(final)
    worst = max((a.float() - want["sft"]["weights"][k].float()).abs().max().item() for k, a in got.items())
    assert got.keys() == want["sft"]["weights"].keys() and worst <= TOLERANCE, worst
    steps = [r["step"] for r in rows(final)]
    assert steps == [r["step"] for r in want["sft"]["rows"]]  # each step once
    assert not (final / CHECKPOINTS).exists() and not building.exists()


@pytest.mark.slow
def test_a_killed_pair_sampling_build_keeps_its_finished_batches_and_ends_as_uninterrupted(tmp_path, built):
    cache, want = built
    final = want["pairs"]["folder"]
    expected = {name: (final / name).read_text() for name in ("train.jsonl", "eval.jsonl", "skipped.json")}
    shutil.rmtree(final)
    building = final.with_name(final.name + BUILDING)
    status, err = interrupt(tmp_path / "run", cache, STAGES, (building / "samples_0.pt").exists, signal.SIGKILL)
    assert status == -signal.SIGKILL, err[-2000:]
    assert not final.exists() and list(building.glob("samples_*.pt"))
    again = run_cli(tmp_path / "run", cache, STAGES)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "continuing the interrupted build" in again.stdout
    assert {name: (final / name).read_text() for name in expected} == expected
    assert not list(final.glob("samples_*")) and not building.exists()


def test_sampling_interrupted_between_batches_continues_to_the_uninterrupted_samples(chat_tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=32, eos_token_id=2,
                                         pad_token_id=1))
    prompts = [[6, 7 - i % 2, 6] for i in range(10)]

    def draw(folder=None) -> list:
        torch.manual_seed(1)
        with (sampling.keeping(folder) if folder else contextlib.nullcontext()):
            return sampling.sample(model, chat_tokenizer, prompts, 5, temperature=1.0, batch_size=3).response_ids

    whole = draw()
    generate, calls = model.generate, SimpleNamespace(n=0)

    def interrupted(*args, **kwargs):
        calls.n += 1
        if calls.n == 3:
            raise KeyboardInterrupt  # as a kill between the second batch and the third
        return generate(*args, **kwargs)

    model.generate = interrupted
    with pytest.raises(KeyboardInterrupt):
        draw(tmp_path)
    model.generate = generate
    assert len(torch.load(tmp_path / "samples_0.pt", weights_only=True)["responses"]) == 6
    assert draw(tmp_path) == whole


def test_a_reference_table_interrupted_while_computed_continues_after_its_finished_chunks(tmp_path, monkeypatch):
    """Reference.logps_of_pairs(keep=...) keeps each finished chunk; a rerun loads them, computes only the rest
    (loading π_ref once), and gives the uninterrupted table exactly."""
    from dpo_exp import reference as reference_module
    from dpo_exp.data import TokenizedPair
    from dpo_exp.models import freeze
    from test_ppo import tiny_llama

    monkeypatch.setattr(reference_module, "KEPT_CHUNK_BATCHES", 1)  # 2 pairs per chunk: 3 chunks
    pairs = [TokenizedPair(i, [1, 3 + i], [4 + i, 2], [5 + i, 6, 2]) for i in range(6)]
    loads = []

    def load():
        loads.append(1)
        return freeze(tiny_llama(seed=0))

    whole = reference_module.Reference(load, resident=False).logps_of_pairs(pairs, 0, batch_size=2)
    keep = tmp_path / "checkpoints"
    reference = reference_module.Reference(load, resident=False)
    real = reference_module.Reference.logps_of_pairs
    calls = []

    def interrupted(self, chunk, pad_id, batch_size, keep=None):
        if keep is None:
            calls.append(len(chunk))
            if len(calls) == 2:
                raise KeyboardInterrupt  # killed while computing the second chunk
        return real(self, chunk, pad_id, batch_size, keep)

    monkeypatch.setattr(reference_module.Reference, "logps_of_pairs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        reference.logps_of_pairs(pairs, 0, batch_size=2, keep=keep)
    assert sorted(p.name for p in keep.iterdir()) == ["reference_chunk_0.pt"]
    monkeypatch.setattr(reference_module.Reference, "logps_of_pairs", real)
    loads.clear()
    again = reference.logps_of_pairs(pairs, 0, batch_size=2, keep=keep)
    assert torch.equal(again[0], whole[0]) and torch.equal(again[1], whole[1])
    assert len(loads) == 1  # π_ref loaded once for the two chunks left, not per chunk
    loads.clear()
    assert torch.equal(reference.logps_of_pairs(pairs, 0, batch_size=2, keep=keep)[0], whole[0]) and not loads
