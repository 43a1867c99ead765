"""Every component a config can name, registered before the config is composed.

A component registers itself (its name, config schema and checks) when its module is imported
(`dpo_exp.registry`), and Hydra needs the schemas before it composes a config. `load` imports the built-in
modules and then the user's own:

- modules named in the environment variable DPO_EXP_PLUGINS (comma-separated, importable from where the
  command runs or PYTHONPATH): `DPO_EXP_PLUGINS=my_losses python -m dpo_exp.train loss=my_loss`;
- modules an installed package declares under the entry-point group `dpo_exp.plugins` in its pyproject.toml:
  `[project.entry-points."dpo_exp.plugins"] my_losses = "my_package.losses"`.

Their yaml files join conf/ through Hydra's search path (`hydra.searchpath=[file:///path/to/my/conf]`).
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from importlib.metadata import entry_points
from typing import Optional

from dpo_exp.errors import ConfigError

BUILT_IN = ("dpo_exp.algorithms", "dpo_exp.tasks", "dpo_exp.data.formats", "dpo_exp.judging.judges",
            "dpo_exp.judging.api", "dpo_exp.rewards", "dpo_exp.models.templates")
PLUGINS_VARIABLE = "DPO_EXP_PLUGINS"
ENTRY_POINT_GROUP = "dpo_exp.plugins"


def plugin_modules() -> list[str]:
    named = [m.strip() for m in os.environ.get(PLUGINS_VARIABLE, "").split(",") if m.strip()]
    declared = [ep.value.split(":")[0] for ep in entry_points(group=ENTRY_POINT_GROUP)]
    return list(dict.fromkeys(named + declared))


def load() -> None:
    """Import the built-in components and the user's plugins (each once)."""
    for module in BUILT_IN:
        importlib.import_module(module)
    for module in plugin_modules():
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ConfigError(f"plugin module {module!r} (from {PLUGINS_VARIABLE} or the {ENTRY_POINT_GROUP!r} "
                              f"entry points) cannot be imported: {err}") from None
    store_columns_schema()


def store_columns_schema() -> None:
    """data.columns of preference data (conf/data/_preference.yaml lists it): one optional key per field a
    registered layout reads, built once every layout is registered, so a misspelt field fails at composition."""
    from hydra.core.config_store import ConfigStore

    from dpo_exp.data.formats import fields

    columns = dataclasses.make_dataclass(
        "ColumnsConfig", [(name, Optional[str], dataclasses.field(default=None)) for name in sorted(fields())])
    ConfigStore.instance().store(group="data_columns", name="schema", node=columns)


def register_configs() -> None:
    """Everything composition needs: the top-level schemas (training's and judging's), the components'
    schemas, and the run-directory resolver."""
    from dpo_exp.config import register_configs as register_schema
    from dpo_exp.judging.config import register_judging_configs
    from dpo_exp.resolvers import register_resolvers

    register_schema()
    register_judging_configs()
    register_resolvers()
    load()
