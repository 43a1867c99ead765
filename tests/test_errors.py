"""Expected failures print one message (what, where, what to change), exit 2, show no traceback and leave no
run directory behind; HYDRA_FULL_ERROR=1 shows the traceback; an unexpected error keeps it."""
import gzip
import json
import os
import runpy
import subprocess
import sys
import warnings

import pytest

from conftest import ROOT


def failing(capsys, *args, module="dpo_exp.train"):
    """Run `python -m MODULE ARGS` in this process; its exit code and what it printed on stderr."""
    argv = sys.argv
    sys.argv = [module, *args]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=f"'{module}' found in sys.modules", category=RuntimeWarning)
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    finally:
        sys.argv = argv
    return code, capsys.readouterr().err


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def expect_message(capsys, tmp_path, *args, match: str):
    run_dir = tmp_path / "run"
    code, err = failing(capsys, *args, f"hydra.run.dir={run_dir}", "paths.cache_dir=" + str(tmp_path / "cache"))
    assert code == 2, err
    assert "Traceback" not in err and "dpo_exp: error: " in err
    message = err.split("dpo_exp: error: ", 1)[1]
    assert match in message, message
    assert not run_dir.exists()  # nothing half written: Hydra's dump of a run that never started is removed
    return message


PREFERENCE = ["task=preference", "data=pairs", "debug=smoke"]


def test_a_bad_row_names_the_file_line_and_field(capsys, tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"},
                                                  {"prompt": "Q2", "chosen": "", "rejected": "b"}])
    expect_message(capsys, tmp_path, *PREFERENCE, f"data.path={data}", "data.on_invalid=error",
                   match=f"{data}: line 2: field 'chosen': empty text")


def test_a_file_of_another_layout_names_the_file_and_its_columns(capsys, tmp_path):
    data = write_jsonl(tmp_path / "other.jsonl", [{"question": "Q", "answer": "a"}] * 3)
    message = expect_message(capsys, tmp_path, *PREFERENCE, f"data.path={data}", match=str(data))
    assert "question" in message and "answer" in message


@pytest.mark.parametrize("content", [b"", b"\n\n"])
def test_an_empty_file_names_the_file(capsys, tmp_path, content):
    data = tmp_path / "empty.jsonl.gz"
    data.write_bytes(gzip.compress(content))
    expect_message(capsys, tmp_path, *PREFERENCE, f"data.path={data}", match=f"{data}: no rows (the file is empty)")


def test_a_missing_data_file_says_where_it_was_looked_for(capsys, tmp_path):
    expect_message(capsys, tmp_path, *PREFERENCE, f"data.path={tmp_path / 'nope.jsonl'}", match="no such file")


def test_a_config_that_cannot_run_says_what_to_change(capsys, tmp_path):
    expect_message(capsys, tmp_path, "loss.beta=-1", match="loss.beta must be > 0")
    expect_message(capsys, tmp_path, "data=pairs", "data.path=x.jsonl", match="need task=preference")


def test_a_missing_model_folder_or_unreachable_hub_model_is_named(capsys, tmp_path):
    expect_message(capsys, tmp_path, "model=hf", f"model.name_or_path={tmp_path / 'no_model'}",
                   match=f"model.name_or_path={tmp_path / 'no_model'} is not a folder")
    # a hub name on a machine without a network (HF_HUB_OFFLINE: what it sees, without minutes of retries; the
    # variable is read when huggingface_hub is imported, hence a process of its own)
    hub = subprocess.run([sys.executable, "-m", "dpo_exp.train", "model=hf", "model.name_or_path=nobody/no-such-model",
                          "sft.train=false", f"hydra.run.dir={tmp_path / 'hub'}"], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert hub.returncode == 2 and "Traceback" not in hub.stderr, hub.stderr[-3000:]
    assert "dpo_exp: error: cannot load the tokenizer 'nobody/no-such-model'" in hub.stderr
    assert not (tmp_path / "hub").exists()


def test_an_objective_the_run_did_not_produce_lists_what_it_did(capsys, tmp_path):
    code, err = failing(capsys, "debug=smoke", "objective=eval/no_such_metric", f"hydra.run.dir={tmp_path / 'run'}",
                        f"paths.cache_dir={tmp_path / 'cache'}")
    assert code == 2 and "Traceback" not in err
    assert "objective=eval/no_such_metric is not in summary.json; available:" in err
    assert (tmp_path / "run" / "summary.json").exists()  # the run itself is kept


def test_the_judge_fails_the_same_way(capsys, tmp_path):
    code, err = failing(capsys, f"runs=[{tmp_path / 'not_a_run'}]", f"hydra.run.dir={tmp_path / 'judging'}",
                        module="dpo_exp.judge")
    assert code == 2 and "Traceback" not in err and "is neither a finished run directory" in err
    assert not (tmp_path / "judging").exists()


def test_a_typo_fails_at_composition_without_a_traceback(capsys, tmp_path):
    code, err = failing(capsys, "trainer.batch_sise=8", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 1 and "Traceback" not in err and "batch_sise" in err
    assert not (tmp_path / "run").exists()


def test_the_full_traceback_on_request_and_for_unexpected_errors(capsys, tmp_path, monkeypatch):
    """One real process: the exit status and what a person sees on the terminal."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "dpo_exp.train", "loss.beta=-1", f"hydra.run.dir={tmp_path / 'run'}"]
    quiet = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr and "loss.beta must be > 0" in quiet.stderr
    loud = subprocess.run(command, env={**env, "HYDRA_FULL_ERROR": "1"}, capture_output=True, text=True, cwd=ROOT)
    assert loud.returncode == 1 and "Traceback" in loud.stderr and "ConfigError" in loud.stderr

    # a bug, not a user's mistake (patched where `python -m dpo_exp.train`, run anew, imports it from)
    monkeypatch.setattr("dpo_exp.pipeline.build_task", lambda cfg: 1 / 0)
    code, err = failing(capsys, "debug=smoke", f"hydra.run.dir={tmp_path / 'bug'}")
    assert code == 1 and "ZeroDivisionError" in err and "Traceback" in err


def offline(*args: str, home) -> subprocess.CompletedProcess:
    """`python -m dpo_exp.train ARGS` on a machine without the hub (HF_HUB_OFFLINE, an empty Hugging Face cache)."""
    return subprocess.run([sys.executable, "-m", "dpo_exp.train", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_HOME": str(home)})


def test_a_hub_dataset_that_cannot_be_reached_is_named_with_what_to_do(tmp_path):
    run = offline("experiment=paper_imdb", f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}",
                  home=tmp_path / "hf")
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    message = run.stderr.split("dpo_exp: error: ", 1)[1]
    assert message.startswith("cannot read the hub dataset stanfordnlp/imdb[train]: ")
    assert "HF_HUB_OFFLINE is set" in message and "data.path=FILE" in message and "Hub is reachable" in message
    assert not (tmp_path / "run").exists()


def test_the_slurm_launcher_off_a_cluster_says_where_to_run_instead(tmp_path):
    import shutil

    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[slurm]'")
    if shutil.which("srun"):
        pytest.skip("this machine has SLURM")
    sweep = subprocess.run([sys.executable, "-m", "dpo_exp.train", "-m", "hydra/launcher=slurm", "debug=smoke",
                            f"hydra.sweep.dir={tmp_path / 'sweep'}", f"paths.cache_dir={tmp_path / 'cache'}"],
                           capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert sweep.returncode == 2 and "Traceback" not in sweep.stderr, sweep.stderr[-3000:]
    message = sweep.stderr.split("dpo_exp: error: ", 1)[1]
    assert message.startswith("hydra/launcher=slurm submits SLURM jobs, but this machine has no SLURM (no srun on")
    assert "login node" in message and "hydra/launcher=basic" in message and "hydra/launcher=slurm_local" in message
    assert not (tmp_path / "sweep").exists()  # nothing written: no multirun.yaml of a sweep that never started


SFT_STARTS = "training π_SFT into the cache"


@pytest.mark.parametrize("problem", ["missing train file", "missing eval file", "bad JSON line"])
def test_data_errors_come_before_sft_is_said_to_start(capsys, tmp_path, problem):
    good = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": f"Q{i}", "chosen": "a", "rejected": "b"}
                                                  for i in range(8)])
    broken = tmp_path / "broken.jsonl"
    broken.write_text(good.read_text() + "{not json\n")
    data = {"missing train file": [f"data.path={tmp_path / 'nope.jsonl'}"],
            "missing eval file": [f"data.path={good}", f"data.eval_path={tmp_path / 'nope.jsonl'}"],
            "bad JSON line": [f"data.path={broken}"]}[problem]
    run_dir = tmp_path / "run"
    argv = sys.argv
    sys.argv = ["dpo_exp.train", *PREFERENCE, *data, f"hydra.run.dir={run_dir}",
                f"paths.cache_dir={tmp_path / 'cache'}"]
    try:
        with pytest.raises(SystemExit) as exit_, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="'dpo_exp.train' found in sys.modules", category=RuntimeWarning)
            runpy.run_module("dpo_exp.train", run_name="__main__", alter_sys=True)
    finally:
        sys.argv = argv
    out = capsys.readouterr()
    assert exit_.value.code == 2 and "dpo_exp: error: " in out.err and "Traceback" not in out.err, out.err[-3000:]
    assert ("no such file" if "missing" in problem else "line 9: not valid JSON") in out.err
    assert SFT_STARTS not in out.out + out.err
    assert not run_dir.exists()


def test_a_model_that_cannot_be_loaded_comes_before_sft_is_said_to_start(tmp_path):
    run = offline("model=hf", "model.name_or_path=nobody/no-such-model", f"hydra.run.dir={tmp_path / 'run'}",
                  f"paths.cache_dir={tmp_path / 'cache'}", home=tmp_path / "hf")
    assert run.returncode == 2 and "cannot load the tokenizer 'nobody/no-such-model'" in run.stderr, run.stderr[-3000:]
    assert SFT_STARTS not in run.stdout + run.stderr
