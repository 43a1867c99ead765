"""A loss, a judge, a file layout and a task added from outside the package (tests/extension/: one module, and
one yaml per component a config group selects) run through the command line like the built-in ones."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

EXTENSION = ROOT / "tests" / "extension"


def cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DPO_EXP_PLUGINS": "my_components",
           "PYTHONPATH": os.pathsep.join([str(EXTENSION), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", module, f"hydra.searchpath=[file://{EXTENSION / 'conf'}]", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def qa_file(path: Path, rows: int = 96) -> Path:
    topics = ["rivers", "maps", "bread", "tides", "glass", "owls", "trains", "salt"]
    with open(path, "w") as f:
        for i in range(rows):
            topic = topics[i % len(topics)]
            f.write(json.dumps({"question": f"What is worth knowing about {topic} number {i}?",
                                "good": f" {topic.capitalize()} are well studied, and case {i} is a clear one.",
                                "bad": f" I do not know anything about {topic}."}) + "\n")
    return path


@pytest.mark.slow
def test_a_loss_a_judge_a_layout_and_a_task_from_outside_the_package_run_through_the_cli(tmp_path):
    data = qa_file(tmp_path / "qa.jsonl")
    run = tmp_path / "run"
    common = ["debug=smoke", "task=swapped", "data=pairs", "data.format=qa", f"data.path={data}",
              f"paths.cache_dir={tmp_path / 'cache'}"]
    trained = cli("dpo_exp.train", *common, "loss=unlikelihood", f"hydra.run.dir={run}", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["algorithm/name"] == "unlikelihood" and summary["status"] == "complete"
    assert summary["data/skipped/swapped"] > 0  # the task's own step ran
    recorded = (run / ".hydra" / "config.yaml").read_text()
    assert "alpha: 0.5" in recorded and "swap_every: 2" in recorded and "format: qa" in recorded

    judged = cli("dpo_exp.judge", "judge=length", f"runs=[{run}]", f"cache_dir={tmp_path / 'cache'}",
                 f"hydra.run.dir={tmp_path / 'judging'}", "wandb=false", cwd=tmp_path)
    assert judged.returncode == 0, judged.stderr[-3000:]
    entries = json.loads((run / "winrates.json").read_text())
    entries = entries if isinstance(entries, list) else list(entries.values())
    assert any("length" in json.dumps(entry) for entry in entries)

    # their schemas and checks are the built-ins' kind: a misspelt key fails at composition, a bad value in validate
    typo = cli("dpo_exp.train", *common, "loss=unlikelihood", "loss.alhpa=1", cwd=tmp_path)
    assert typo.returncode != 0 and "Key 'alhpa' not in 'UnlikelihoodConfig'" in typo.stderr
    bad = cli("dpo_exp.train", *common, "loss=unlikelihood", "task.swap_every=0", cwd=tmp_path)
    assert bad.returncode == 2 and "task.swap_every must be >= 1 (got 0)" in bad.stderr
    unknown = cli("dpo_exp.judge", "judge=length", "judge.prefer=longest", f"runs=[{run}]", "wandb=false",
                  f"hydra.run.dir={tmp_path / 'judging2'}", cwd=tmp_path)
    assert unknown.returncode == 2 and "judge.prefer=longest: shorter or longer" in unknown.stderr
