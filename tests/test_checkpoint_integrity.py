"""Checkpoints that check themselves, and writes that fail readably (issue 28, items 1 and 2).

A damaged newest checkpoint (a shard cut short, deleted, or overwritten with zeros) is skipped for the newest intact
one with one warning line naming the file, and the run resumes to the uninterrupted result; when none is intact, one
readable error says how to start over. A write the machine refuses (no space left: made to fail here where torch,
safetensors or the cache write, no full disk needed) while a checkpoint, a cache entry or the Hugging Face export is
written ends in one `dpo_exp: error:` line and exit status 74, leaves no temporary folder and the previous checkpoint
whole, and the same command rerun resumes and finishes with no metric row twice.
"""
from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from test_errors import failing
from test_resume import assert_same_outcome, outcome

from dpo_exp import checkpoint
from dpo_exp import train as train_module
from dpo_exp.errors import ConfigError, WRITE_EXIT_CODE, refused_write
from dpo_exp.loop import Loop

# checkpoints at steps 4 and 8 (two kept), then final at 12
OVERRIDES = ["trainer.max_steps=12", "trainer.save_every=4", "trainer.eval_every=4"]
SHARD = Path("state") / "__0_0.distcp"
NO_SPACE = OSError(errno.ENOSPC, "No space left on device")


def compose(output_dir: Path, cache: Path, *overrides: str):
    from hydra import compose as compose_config, initialize_config_dir
    from omegaconf import OmegaConf

    from dpo_exp.components import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose_config("config", overrides=["debug=smoke", f"paths.cache_dir={cache}",
                                                  f"paths.output_dir={output_dir}", *OVERRIDES, *overrides])
    OmegaConf.resolve(cfg)
    return cfg


@pytest.fixture(scope="module")
def whole(tmp_path_factory, shared_cache):
    """The uninterrupted run's metrics rows and summary."""
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    train_module.run(compose(run_dir, shared_cache))
    return outcome(run_dir)


def stopped_after_two_checkpoints(monkeypatch, cfg) -> Path:
    """Run until a crash at step 10: checkpoints/step_4 and step_8 are written, final is not. Returns the folder."""
    real = Loop.run_iteration

    def die_at_step_10(self, bar):
        if self.step == 9:
            raise KeyboardInterrupt("killed")
        return real(self, bar)

    monkeypatch.setattr(Loop, "run_iteration", die_at_step_10)
    with pytest.raises(KeyboardInterrupt):
        train_module.run(cfg)
    monkeypatch.setattr(Loop, "run_iteration", real)
    folder = Path(cfg.paths.output_dir) / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step_4", "step_8"]
    return folder


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:1000])


def zero(file: Path) -> None:
    file.write_bytes(bytes(file.stat().st_size))  # same size: only the checksum tells


DAMAGE = {"truncated": (truncate, "is truncated (1000 bytes, "), "deleted": (Path.unlink, "is missing"),
          "zeroed": (zero, "does not match its checksum")}


def lines(text: str, kind: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"dpo_exp: {kind}: ")]


# ---- 1. checkpoints verify themselves --------------------------------------------------------------------------

@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_is_skipped_and_the_run_resumes_from_the_older(
        smoke_cfg, monkeypatch, capsys, whole, damage):
    cfg = smoke_cfg(*OVERRIDES)
    folder = stopped_after_two_checkpoints(monkeypatch, cfg)
    spoil, reason = DAMAGE[damage]
    spoil(folder / "step_8" / SHARD)
    capsys.readouterr()
    assert checkpoint.latest(folder) == folder / "step_4"
    warnings = lines(capsys.readouterr().err, "warning")
    assert len(warnings) == 1 and str(folder / "step_8" / SHARD) in warnings[0] and reason in warnings[0], warnings
    summary = train_module.run(cfg)
    assert summary["resumed_from"].endswith("step_4") and summary["steps"] == 12
    assert_same_outcome(outcome(Path(cfg.paths.output_dir)), whole)  # no step twice, none missing
    assert checkpoint.verify(folder / "final") is None and checkpoint.verify(folder / "step_8") is None  # rewritten


def test_a_checkpoint_from_before_manifests_is_used_with_a_note(smoke_cfg, monkeypatch, capsys):
    cfg = smoke_cfg(*OVERRIDES)
    folder = stopped_after_two_checkpoints(monkeypatch, cfg)
    (folder / "step_8" / checkpoint.MANIFEST).unlink()  # as dpo_exp wrote them before
    capsys.readouterr()
    assert checkpoint.latest(folder) == folder / "step_8"
    notes = lines(capsys.readouterr().err, "note")
    assert len(notes) == 1 and "no manifest.json" in notes[0] and "unchecked" in notes[0]
    assert train_module.run(cfg)["resumed_from"].endswith("step_8")


def test_an_unreadable_checkpoint_from_before_manifests_is_a_readable_error(smoke_cfg, monkeypatch):
    cfg = smoke_cfg(*OVERRIDES)
    folder = stopped_after_two_checkpoints(monkeypatch, cfg)
    (folder / "step_8" / checkpoint.MANIFEST).unlink()
    truncate(folder / "step_8" / SHARD)  # nothing says so until it is read
    with pytest.raises(ConfigError, match=r"step_8 cannot be read \(EOFError\).*Move it out of"):
        train_module.run(cfg)


def test_no_intact_checkpoint_is_one_readable_error_saying_how_to_start_over(smoke_cfg, monkeypatch, capsys,
                                                                             shared_cache):
    cfg = smoke_cfg(*OVERRIDES)
    folder = stopped_after_two_checkpoints(monkeypatch, cfg)
    truncate(folder / "step_8" / SHARD)
    zero(folder / "step_4" / "trainer_state.pt")
    with pytest.raises(ConfigError, match=r"no intact checkpoint in .*step_8.* is truncated.*step_4/trainer_state.pt "
                                          r"does not match its checksum.*run_name="):
        checkpoint.latest(folder)
    code, err = failing(capsys, "debug=smoke", *OVERRIDES, f"paths.cache_dir={shared_cache}",
                        f"hydra.run.dir={cfg.paths.output_dir}")
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert len(lines(err, "error")) == 1 and "no intact checkpoint" in err and not lines(err, "warning")
    assert (folder / "step_4").exists() and (folder / "step_8").exists()  # nothing of the run is deleted


def test_every_checkpoint_file_is_in_the_manifest_with_its_size_and_checksum(smoke_cfg):
    cfg = smoke_cfg("trainer.max_steps=4", "trainer.save_every=2")
    train_module.run(cfg)
    final = Path(cfg.paths.output_dir) / "checkpoints" / "final"
    manifest = json.loads((final / checkpoint.MANIFEST).read_text())
    on_disk = {f.relative_to(final).as_posix() for f in final.rglob("*") if f.is_file()} - {checkpoint.MANIFEST}
    assert set(manifest["files"]) == on_disk and {"model.safetensors", SHARD.as_posix(), "rng/rank_0.pt"} <= on_disk
    assert manifest["step"] == 4 and manifest["world_size"] == 1 and manifest["checksum"] == "crc32"
    entry = manifest["files"]["model.safetensors"]
    assert entry["size"] == (final / "model.safetensors").stat().st_size
    assert entry["crc32"] == checkpoint.checksum(final / "model.safetensors")


# ---- 2. write failures are readable and harmless ---------------------------------------------------------------

def test_the_wrapped_forms_of_a_refused_write_are_recognised():
    def wrapped_by_torch_save():  # torch.save into a file: a RuntimeError raised while the OSError is handled
        try:
            raise NO_SPACE
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    class CheckpointException(BaseException):  # torch.distributed.checkpoint's: each rank's (exception, traceback)
        failures = {1: (OSError(errno.EDQUOT, "Disk quota exceeded"), None)}

    from safetensors import SafetensorError

    with pytest.raises(RuntimeError) as torch_save:
        wrapped_by_torch_save()
    assert refused_write(torch_save.value).errno == errno.ENOSPC
    assert refused_write(CheckpointException()).errno == errno.EDQUOT
    rust = SafetensorError("Error while serializing: I/O error: Read-only file system (os error 30)")
    assert refused_write(rust).errno == errno.EROFS
    for other in (KeyboardInterrupt(), OSError(errno.ENOENT, "No such file"), ValueError("os error 5")):
        assert refused_write(other) is None


def cli(run_dir: Path, cache: Path) -> list[str]:
    return ["debug=smoke", *OVERRIDES, f"paths.cache_dir={cache}", f"hydra.run.dir={run_dir}"]


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if ".tmp" in p.name)


@pytest.mark.parametrize("refused, intact", [("step_4", None), ("step_8", "step_4")])
def test_no_space_while_writing_a_checkpoint(tmp_path, monkeypatch, capsys, shared_cache, whole, refused, intact):
    """The disk fills up inside torch.distributed.checkpoint, after part of the shard is written."""
    from torch.distributed.checkpoint import filesystem

    real = filesystem._write_item

    def fills_up(transforms, stream, *args, **kwargs):
        written = real(transforms, stream, *args, **kwargs)
        if f".tmp_{refused}" in str(getattr(stream, "name", "")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return written

    monkeypatch.setattr(filesystem, "_write_item", fills_up)
    run_dir = tmp_path / "run"
    code, err = failing(capsys, *cli(run_dir, shared_cache))
    assert code == WRITE_EXIT_CODE and "Traceback" not in err, err[-3000:]
    [message] = lines(err, "error")
    assert f"could not write {run_dir / 'checkpoints' / refused}: No space left on device" in message
    folder = run_dir / "checkpoints"
    said = f"{folder / intact} (step 4)" if intact else "no checkpoint yet (a rerun starts this run from its beginning)"
    assert f"Intact: {said}" in message and "rerun the same command" in message
    assert leftovers(folder) == [] and not (folder / refused).exists()
    if refused == "step_8":
        assert checkpoint.verify(folder / "step_4") is None and checkpoint.latest(folder) == folder / "step_4"
    monkeypatch.setattr(filesystem, "_write_item", real)
    run_cli(*cli(run_dir, shared_cache))
    if intact:  # resumed: no row twice. (With no checkpoint the rerun starts over and appends to metrics.jsonl.)
        assert_same_outcome(outcome(run_dir), whole)
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 12


def test_no_space_while_exporting_the_final_model(tmp_path, monkeypatch, capsys, shared_cache, whole):
    import transformers.modeling_utils
    from safetensors import SafetensorError

    real = transformers.modeling_utils.safe_save_file

    def fills_up(tensors, filename, *args, **kwargs):
        if ".tmp_final" in str(filename):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", fills_up)
    run_dir = tmp_path / "run"
    code, err = failing(capsys, *cli(run_dir, shared_cache))
    assert code == WRITE_EXIT_CODE and "Traceback" not in err, err[-3000:]
    folder = run_dir / "checkpoints"
    assert f"could not write {folder / 'final'}: No space left on device. Intact: {folder / 'step_8'} (step 8)" in err
    assert leftovers(folder) == [] and sorted(p.name for p in folder.iterdir()) == ["step_4", "step_8"]
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", real)
    run_cli(*cli(run_dir, shared_cache))
    assert_same_outcome(outcome(run_dir), whole)
    assert checkpoint.verify(folder / "final") is None


def test_no_space_while_building_a_cache_entry(tmp_path, monkeypatch, capsys):
    """π_SFT is trained into a fresh cache and the disk fills up as save_pretrained writes its weights."""
    import transformers.modeling_utils
    from safetensors import SafetensorError

    def fills_up(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    real = transformers.modeling_utils.safe_save_file
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", fills_up)
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    code, err = failing(capsys, *cli(run_dir, cache))
    assert code == WRITE_EXIT_CODE and "Traceback" not in err, err[-3000:]
    [message] = lines(err, "error")
    assert f"could not write {cache.resolve() / 'sft'}" in message and "No space left on device" in message
    assert "Intact: every finished cache entry" in message
    assert leftovers(cache) == [] and not any((cache / "sft").glob("*/COMPLETE"))
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", real)
    run_cli(*cli(run_dir, cache))
    assert (run_dir / "summary.json").exists() and len(list((cache / "sft").glob("*/COMPLETE"))) == 1
