"""Where the config tree is, for `python -m dpo_exp.train` and `python -m dpo_exp.judge`.

conf/ lives at the repository's top level. A checkout (installed editable or not) reads it there; a non-editable
install (`pip install .`, a wheel) ships the same yaml files as package data under dpo_exp/conf/ (pyproject.toml
maps the package `dpo_exp.conf` onto conf/). Hydra takes the folder as an absolute path: `pkg://dpo_exp.conf`
would need an `__init__.py` in conf/, which a folder of yaml files should not have to carry.
"""
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def conf_dir() -> Path:
    """The installed copy next to the package (a wheel), else the checkout's top-level conf/."""
    packaged = _PACKAGE / "conf"
    return packaged if packaged.is_dir() else _PACKAGE.parent / "conf"


CONF_DIR = conf_dir()
