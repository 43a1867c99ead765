"""The cache: built once, never seen half-written, safe under concurrent jobs; reference log-probs once per sweep."""
import errno
import json
import multiprocessing as mp
import time
from pathlib import Path

import pytest

from dpo_exp.cache import COMPLETE, cache_key, get_or_build
from dpo_exp.errors import WriteFailed


def _build_slowly(cache_dir: str, log: str, out_q) -> None:
    def build(folder: Path) -> None:
        with open(log, "a") as handle:
            handle.write("built\n")
        time.sleep(1.0)  # long enough for the other job to arrive while this one builds
        (folder / "model.txt").write_text("weights")

    out_q.put(str(get_or_build(cache_dir, "sft", {"seed": 0}, build)))


def test_two_jobs_at_once_build_one_entry(tmp_path):
    log = tmp_path / "log"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    jobs = [ctx.Process(target=_build_slowly, args=(str(tmp_path / "cache"), str(log), queue)) for _ in range(2)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(60)
    paths = {queue.get(timeout=5), queue.get(timeout=5)}
    assert log.read_text() == "built\n"
    assert len(paths) == 1
    folder = Path(paths.pop())
    assert (folder / "model.txt").read_text() == "weights" and (folder / COMPLETE).exists()


def test_a_failed_build_keeps_its_build_folder_for_the_retry_and_the_entry_no_checkpoints(tmp_path):
    def broken(folder: Path) -> None:
        (folder / "checkpoints" / "step_5").mkdir(parents=True)
        (folder / "half.bin").write_text("partial")
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        get_or_build(tmp_path, "sft", {"k": 1}, broken)
    assert not (tmp_path / "sft" / cache_key({"k": 1})).exists()  # never half an entry
    calls = []

    def resumed(folder: Path) -> None:
        calls.append((folder / "half.bin").read_text())  # what the failed build left, to continue from
        (folder / "model.txt").write_text("weights")

    folder = get_or_build(tmp_path, "sft", {"k": 1}, resumed)
    assert calls == ["partial"] and (folder / COMPLETE).exists() and (folder / "model.txt").exists()
    assert not (folder / "checkpoints").exists()  # a finished entry keeps no training checkpoints
    assert [p.name for p in (tmp_path / "sft").iterdir() if p.is_dir()] == [folder.name]  # no build folder left
    get_or_build(tmp_path, "sft", {"k": 1}, lambda f: calls.append(f))
    assert len(calls) == 1  # found, not rebuilt


def test_a_refused_write_removes_the_build_folder(tmp_path):
    def full_disk(folder: Path) -> None:
        (folder / "half.bin").write_text("partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteFailed):
        get_or_build(tmp_path, "sft", {"k": 1}, full_disk)
    assert not [p for p in (tmp_path / "sft").iterdir() if p.is_dir()]


def test_different_settings_get_different_entries(tmp_path):
    a = get_or_build(tmp_path, "sft", {"seed": 0}, lambda f: None)
    b = get_or_build(tmp_path, "sft", {"seed": 1}, lambda f: None)
    assert a != b


def _build_forever(cache_dir: str) -> None:
    def build(folder: Path) -> None:
        (folder / "half.bin").write_text("partial")
        time.sleep(600)

    get_or_build(cache_dir, "sft", {"seed": 0}, build)


def test_a_build_killed_by_a_signal_is_continued_by_the_next_job(tmp_path):
    job = mp.get_context("spawn").Process(target=_build_forever, args=(str(tmp_path),))
    job.start()
    deadline = time.time() + 60
    while not list((tmp_path / "sft").glob("*.building/half.bin")) and time.time() < deadline:
        time.sleep(0.1)
    job.kill()  # SIGKILL: no exception handler runs, the half-built folder stays
    job.join(10)
    assert list((tmp_path / "sft").glob("*.building/half.bin"))
    folder = get_or_build(tmp_path, "sft", {"seed": 0}, lambda f: (f / "model.txt").write_text("weights"))
    assert (folder / "model.txt").read_text() == "weights" and (folder / "half.bin").exists()  # built on what was left
    assert not list((tmp_path / "sft").glob("*.building"))


def test_the_jobs_of_a_beta_sweep_compute_reference_log_probs_once(smoke_cfg, tmp_path, monkeypatch):
    """Four β jobs with precomputed reference log-probs: the first computes the training and held-out tables,
    the other three read them from the cache (and train exactly as if they had computed them)."""
    from dpo_exp import train
    from dpo_exp.reference import Reference

    computed = []
    original = Reference.logps_of_pairs

    def counting(self, pairs, pad_id, batch_size, keep=None):
        if keep is None:  # a computation, not the loop over kept chunks around it
            computed.append(len(pairs))
        return original(self, pairs, pad_id, batch_size, keep)

    monkeypatch.setattr(Reference, "logps_of_pairs", counting)
    results = {}
    for beta in (0.05, 0.1, 0.3, 0.1):
        before = len(computed)
        run = tmp_path / f"beta_{beta}_{len(results)}"
        cfg = smoke_cfg(f"loss.beta={beta}", "reference.precompute=true", "trainer.max_steps=2",
                        f"paths.cache_dir={tmp_path / 'cache'}", f"paths.output_dir={run}")
        train.run(cfg)
        results[run.name] = (len(computed) - before, json.loads((run / "summary.json").read_text()))
    counts = [n for n, _ in results.values()]
    assert counts[0] == 2 and counts[1:] == [0, 0, 0]  # training and held-out pairs, then nothing
    assert len(list((tmp_path / "cache" / "reference_logps").glob("*/logps.pt"))) == 2
    first, again = results["beta_0.1_1"][1], results["beta_0.1_3"][1]
    assert again["eval/loss"] == first["eval/loss"]  # the table read back is the one computed


def test_file_layout_settings_enter_cache_keys_only_when_set(smoke_cfg):
    """data.format and data.columns came after many cache entries were made: unset, they leave the keys (and so
    the π_SFT and pairs a user already has) as they were; set, they make new ones."""
    from dpo_exp.stages import pairs_key, sft_key

    plain = sft_key(smoke_cfg())["data"]
    assert "format" not in plain and "columns" not in plain
    assert "columns" not in pairs_key(smoke_cfg(), "sft")["data"]
    assert sft_key(smoke_cfg("data.columns.prompt=question"))["data"]["columns"] == {"prompt": "question"}
