"""A non-editable install runs the documented commands from any folder: conf/ ships in the wheel as package data
(pyproject.toml maps `dpo_exp.conf` onto the top-level conf/), and a user's own config folder joins through
Hydra's search path without touching the package."""
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

# A user's folder of their own options: a model preset extending the shipped tiny_llama, an experiment preset
# selecting it, and machine-specific settings in the `optional local: default` slot of conf/config.yaml.
USER_CONF = {
    "model/my_model.yaml": "defaults:\n  - tiny_llama\n  - _self_\nname: my_model\narchitecture:\n  hidden_size: 48\n",
    "experiment/my_exp.yaml": ("# @package _global_\ndefaults:\n  - override /model: my_model\n"
                               "experiment_name: my_exp\n"),
    "local/default.yaml": "# @package _global_\nseed: 7\n",
}


def test_every_package_of_dpo_exp_is_listed_in_pyproject():
    """pyproject.toml lists its packages (discovery cannot map conf/ to dpo_exp.conf): a new subpackage must be
    added there, or a wheel would ship without it."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "dpo_exp").rglob("__init__.py")}
    assert on_disk <= listed, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(on_disk - listed)}"


def run(args, cwd, env, timeout=300) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, args))} exited with {done.returncode}:\n{done.stderr[-4000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A wheel built from a copy of the source (building in place would leave build/ in the checkout), installed
    into a fresh venv whose torch, transformers and hydra come from this interpreter's site-packages.
    Returns (the venv's python, the wheel's file names, an environment for running it)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for folder in ("dpo_exp", "conf"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    (src / "conf" / "local" / "default.yaml").write_text("seed: 1\n")  # a machine's own settings: must not ship
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", tmp / "dist", src], cwd=tmp, env=os.environ)
    wheel, = (tmp / "dist").glob("dpo_exp-*.whl")

    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], cwd=tmp, env=os.environ)
    python = venv / "bin" / "python"
    # pip from the system site-packages installs into the venv; --ignore-installed leaves the editable install
    # of the checkout (if any) alone instead of uninstalling it
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", wheel],
        cwd=tmp, env=os.environ)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return python, zipfile.ZipFile(wheel).namelist(), env


@pytest.mark.slow
def test_the_wheel_ships_every_config_but_local_settings(installed):
    _, names, _ = installed
    shipped = {n.removeprefix("dpo_exp/conf/") for n in names if n.startswith("dpo_exp/conf/")}
    tracked = {str(p.relative_to(ROOT / "conf")) for p in (ROOT / "conf").rglob("*.yaml")
               if p.parent.name != "local"}
    assert shipped == tracked  # nested groups (hydra/launcher/) included, conf/local/*.yaml left out
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "dpo_exp").rglob("*.py")}
    assert modules <= set(names)


@pytest.mark.slow
def test_the_installed_package_trains_and_judges_from_any_folder(installed, tmp_path):
    python, _, env = installed
    where = run([python, "-c", "import dpo_exp.conf_path as c; print(c.__file__); print(c.CONF_DIR)"],
                cwd=tmp_path, env=env).stdout.split()
    venv = python.parents[1].resolve()
    assert all(Path(p).resolve().is_relative_to(venv) for p in where), f"not the wheel's dpo_exp: {where}"

    run([python, "-m", "dpo_exp.train", "debug=smoke", "run_name=wheel"], cwd=tmp_path, env=env)
    run_dir = tmp_path / "outputs" / "runs" / "wheel"
    assert (run_dir / "summary.json").is_file() and (run_dir / "metrics.jsonl").is_file()

    run([python, "-m", "dpo_exp.judge", "runs=[outputs/runs/wheel]", "judge=gold"], cwd=tmp_path, env=env)
    assert any(run_dir.rglob("winrates.json"))


@pytest.mark.slow
def test_a_users_config_folder_joins_through_the_search_path(installed, tmp_path):
    python, _, env = installed
    user = tmp_path / "my_conf"
    for name, text in USER_CONF.items():
        (user / name).parent.mkdir(parents=True, exist_ok=True)
        (user / name).write_text(text)
    printed = run([python, "-m", "dpo_exp.train", f"hydra.searchpath=[file://{user}]", "experiment=my_exp",
                   "--cfg", "job"], cwd=tmp_path, env=env).stdout
    cfg = yaml.safe_load(printed)
    assert cfg["model"]["name"] == "my_model" and cfg["experiment_name"] == "my_exp"
    assert cfg["model"]["architecture"]["hidden_size"] == 48  # the user's value over the shipped preset's
    assert cfg["model"]["architecture"]["num_hidden_layers"] == 3  # the rest from tiny_llama, which it extends
    assert cfg["seed"] == 7  # the user's local/default.yaml fills the optional local slot
