"""Named components: one helper for every kind of thing a config selects by name.

Algorithms (`loss=NAME`), tasks, data layouts, judges, gold rewards and chat templates each keep a
`Registry`. An entry is registered where it is written, with

- its name (several names may share one implementation, e.g. the DPO family's variants);
- its own config dataclass, stored in the Hydra ConfigStore as `<group>/<name>_schema`: the option's yaml
  lists it first in its defaults (`defaults: [cdpo_schema, _self_]`), so a key the component does not
  declare, or a value of the wrong type, fails when the config is composed;
- its own `validate(cfg)`, called by `dpo_exp.validation.validate` when the component is selected, for
  checks between its keys and the rest of the config.

    @ALGORITHMS.register("my_loss", config=MyLossConfig, validate=check_my_loss)
    class MyLoss(OfflineAlgorithm): ...

An unknown name is a ConfigError listing the registered ones. Components outside the package register the
same way from a module that `dpo_exp.components.load` imports (see docs/extending.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, Optional, TypeVar

from dpo_exp.errors import ConfigError

T = TypeVar("T")
Validator = Callable[[Any], None]


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    value: T                          # the class or function registered
    config: Optional[type] = None     # its config dataclass (None: the component has no settings of its own)
    validate: Optional[Validator] = None  # checks of the whole config when this component is selected


class Registry(Generic[T]):
    """The components of one kind, by name.

    kind: what they are, for messages ("algorithm"); key: the config key that selects one ("loss.name");
    group: the Hydra config group whose options they are ("loss"), where their schemas are stored; None for
    kinds chosen by a plain string key (data.format, task.gold_reward).
    """

    def __init__(self, kind: str, key: str, group: Optional[str] = None):
        self.kind = kind
        self.key = key
        self.group = group
        self._entries: dict[str, Entry[T]] = {}

    def register(self, *names: str, config: Optional[type] = None,
                 validate: Optional[Validator] = None) -> Callable[[T], T]:
        """Decorator: register the class or function under each of `names`."""
        def wrap(value: T) -> T:
            for name in names:
                self.add(name, value, config=config, validate=validate)
            return value
        return wrap

    def add(self, name: str, value: T, config: Optional[type] = None, validate: Optional[Validator] = None) -> None:
        known = self._entries.get(name)
        if known is not None and known.value is not value:
            raise ValueError(f"{self.kind} {name!r} is already registered by {_qualname(known.value)}")
        self._entries[name] = Entry(name, value, config, validate)
        if config is not None and self.group is not None:
            store_schema(self.group, name, config)

    def remove(self, name: str) -> None:
        """Forget a registration (a test's, or a notebook cell's about to register a new version)."""
        self._entries.pop(name, None)

    def entry(self, name: Any) -> Entry[T]:
        name = str(name)
        if name not in self._entries:
            raise ConfigError(f"unknown {self.kind} {self.key}={name!r}; registered: {', '.join(self.names())}")
        return self._entries[name]

    def __getitem__(self, name: Any) -> T:
        return self.entry(name).value

    def __contains__(self, name: Any) -> bool:
        return str(name) in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return [(name, entry.value) for name, entry in self._entries.items()]


def schema_name(name: str) -> str:
    """The ConfigStore name of a component's schema within its group; the option's yaml lists it in defaults."""
    return f"{name}_schema"


def store_schema(group: str, name: str, config: type) -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group=group, name=schema_name(name), node=config)


def _qualname(value: Any) -> str:
    return getattr(value, "__qualname__", repr(value))
