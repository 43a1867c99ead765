"""Write docs/configuration.md, the configuration reference, from conf/ and the typed schemas it names.

    python scripts/config_reference.py            # (re)write docs/configuration.md
    python scripts/config_reference.py --check    # exit 1 if docs/configuration.md is not what this writes

Everything is read at run time, nothing is listed here:
- the entry points are the yaml files at the top of conf/ (config.yaml, judging.yaml): their defaults lists name
  the config groups (with their default option and the comment beside it), their own keys follow;
- a group is a folder of conf/ (nested ones too, e.g. hydra/launcher); each option file gets its header comment,
  what its defaults list builds on or overrides, and every key with the value and comment written beside it.
  Files whose name starts with `_` hold keys the options of a group share. Files ignored by .gitignore
  (a machine's conf/local/*.yaml) are left out;
- a defaults entry that names a schema (`config_schema`, `cdpo_schema`, `data_columns@data.columns: schema`: a
  name ending in `_schema`, or `schema`) is not an option and is skipped; any other shape of entry is shown as
  written, never refused. The schemas are looked up in Hydra's ConfigStore after importing the modules the entry
  point's header comment runs (`python -m dpo_exp.train`): an entry point's as its name, a slot's and an option's
  under their group (`loss/cdpo_schema`, where dpo_exp's registry stores them). The keys a schema declares that
  no yaml file sets are listed with their default, type and the comment beside them in the schema's source.
"""
from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import importlib
import inspect
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "configuration.md"
COMMAND = "python scripts/config_reference.py"
SCHEMA_SUFFIX = "_schema"
MAX_VALUE = 90  # characters of a value shown in a table; longer ones are cut with an ellipsis


# ---- reading one yaml file: keys, values as written, comments ------------------------------------------------

@dataclass
class Key:
    path: str          # dotted, from the file's package (the group) down
    value: str         # as written (a mapping with keys below it: empty)
    comment: str


@dataclass
class DefaultsEntry:
    group: Optional[str]   # None for a plain name (`_base`, `_self_`, `cdpo_schema`)
    option: Any            # the option's name (a group entry), the plain name, or None (`experiment: null`)
    flags: tuple[str, ...] # override / optional
    comment: str
    package: Optional[str] = None  # `group@package: option` puts the option's keys under `package`

    @property
    def is_schema(self) -> bool:
        """A typed schema stored in Hydra's ConfigStore, not an option file: `config_schema`, `cdpo_schema`,
        `data_columns@data.columns: schema`."""
        return isinstance(self.option, str) and (self.option == "schema" or self.option.endswith(SCHEMA_SUFFIX))

    @property
    def label(self) -> str:
        at = f"@{self.package}" if self.package else ""
        return f"{self.group}{at}" if self.group else str(self.option)


@dataclass
class YamlFile:
    path: Path
    header: list[str]               # the leading comment lines (without '# ' and without the @package line)
    package: Optional[str]          # the `# @package` directive: None (the group's), _global_ or a path
    defaults: list[DefaultsEntry]
    keys: list[Key]

    @property
    def package_global(self) -> bool:
        return self.package == "_global_"

    @property
    def schemas(self) -> list[str]:
        return [str(e.option) for e in self.defaults if e.is_schema and e.group is None]


def _comment_after(line: str, column: int) -> str:
    """The comment that follows `column` on `line` (YAML: a '#' after whitespace), or ''."""
    rest = line[column:]
    match = re.search(r"(?:^|\s)#\s?(.*)$", rest)
    return match.group(1).strip() if match else ""


def _comment_lines_above(lines: list[str], index: int, first_body_line: int) -> list[str]:
    """Comment-only lines directly above line `index` (a note on the key below them), not the file's header."""
    out = []
    i = index - 1
    while i >= first_body_line and lines[i].strip().startswith("#"):
        out.insert(0, lines[i].strip().lstrip("#").strip())
        i -= 1
    return out


def _value_text(node: yaml.Node, lines: list[str]) -> str:
    if isinstance(node, yaml.ScalarNode) and node.style in ("|", ">"):
        first = node.value.strip().splitlines()[0] if node.value.strip() else ""
        return f"{first} …" if "\n" in node.value.strip() else first
    start, end = node.start_mark, node.end_mark
    if start.line == end.line:
        text = lines[start.line][start.column:end.column].strip()
    else:  # a collection written over several lines: its value in flow style
        text = yaml.safe_dump(yaml.safe_load(yaml.serialize(node)), default_flow_style=True, width=10**6).strip()
    return text if len(text) <= MAX_VALUE else text[:MAX_VALUE - 1] + "…"


def _entry_comment(node: yaml.Node, lines: list[str]) -> str:
    """The comment beside a defaults entry (`- model: tiny_llama  # ...`, `- _self_  # ...`)."""
    if isinstance(node, yaml.MappingNode) and node.value:
        node = node.value[-1][1]
    if isinstance(node, yaml.ScalarNode) or node.start_mark.line == node.end_mark.line:
        return _comment_after(lines[node.end_mark.line], node.end_mark.column)
    return _comment_after(lines[node.start_mark.line], node.start_mark.column)


def _defaults(node: yaml.Node, lines: list[str]) -> list[DefaultsEntry]:
    """Every entry of a defaults list, of whatever shape (a name, GROUP: OPTION, override/optional GROUP:
    OPTION, GROUP: [a, b]); anything else is kept as a plain name rather than refused."""
    if not isinstance(node, yaml.SequenceNode):
        return []
    entries = []
    for item in node.value:
        comment = _entry_comment(item, lines)
        if isinstance(item, yaml.MappingNode) and len(item.value) == 1:
            key_node, value_node = item.value[0]
            words = str(key_node.value).split()
            group, _, package = (words[-1] if words else "").lstrip("/").partition("@")
            value = yaml.safe_load(yaml.serialize(value_node))
            entries.append(DefaultsEntry(group, value, tuple(words[:-1]), comment, package or None))
        elif isinstance(item, yaml.ScalarNode):
            entries.append(DefaultsEntry(None, item.value, (), comment))
        else:
            entries.append(DefaultsEntry(None, yaml.safe_load(yaml.serialize(item)), (), comment))
    return entries


def read_yaml(path: Path) -> YamlFile:
    text = path.read_text()
    lines = text.splitlines()
    header, package, first_body = [], None, 0
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped.startswith("#"):
            first_body = i
            break
        directive = re.match(r"#\s*@package\s+(\S+)", stripped)
        if directive:
            package = directive.group(1)
        else:
            header.append(stripped[1:].removeprefix(" ").rstrip())  # indentation kept: an indented line is a command
    else:
        first_body = len(lines)
    root = yaml.compose(text)
    defaults, keys = [], []
    if isinstance(root, yaml.MappingNode):
        for key_node, value_node in root.value:
            if key_node.value == "defaults":
                defaults = _defaults(value_node, lines)
            else:
                keys.extend(_keys(key_node, value_node, "", lines, first_body))
    return YamlFile(path, header, package, defaults, keys)


def _keys(key_node: yaml.Node, value_node: yaml.Node, prefix: str, lines: list[str],
          first_body: int) -> Iterator[Key]:
    name = f"{prefix}{key_node.value}"
    key_line = key_node.start_mark.line
    block_mapping = isinstance(value_node, yaml.MappingNode) and not value_node.flow_style and value_node.value
    if block_mapping or (isinstance(value_node, yaml.ScalarNode) and value_node.style in ("|", ">")) \
            or value_node.start_mark.line != key_line:
        comment = _comment_after(lines[key_line], key_node.end_mark.column)
    else:
        comment = _comment_after(lines[value_node.end_mark.line], value_node.end_mark.column)
    if not comment:
        comment = " ".join(_comment_lines_above(lines, key_line, first_body))
    if block_mapping:
        if comment:
            yield Key(name, "", comment)
        for child_key, child_value in value_node.value:
            yield from _keys(child_key, child_value, f"{name}.", lines, first_body)
    else:
        yield Key(name, _value_text(value_node, lines), comment)


# ---- the typed schema: every key it declares, its default, type and source comment ------------------------------

@dataclass
class SchemaKey:
    path: str
    default: str
    type: str
    comment: str


def _source_comments(cls: type) -> dict[str, str]:
    """field name -> the comment beside its declaration in the class's source."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments = {}
    for line in source.splitlines():
        match = re.match(r"\s+(\w+)\s*:[^#]*#\s?(.*)$", line)
        if match:
            comments[match.group(1)] = match.group(2).strip()
    return comments


def _show(value: Any) -> str:
    from enum import Enum

    if isinstance(value, Enum):
        value = value.value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()


def schema_keys(cls: type, prefix: str = "") -> Iterator[SchemaKey]:
    """Every leaf key of a dataclass schema, nested dataclasses followed (their defaults as the enclosing
    class builds them)."""
    from omegaconf import MISSING

    comments = _source_comments(cls)
    try:
        instance = cls()
    except TypeError:  # a field without a default: read the defaults field by field
        instance = None
    for f in dataclasses.fields(cls):
        if instance is not None:
            default = getattr(instance, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = MISSING
        kind = _type_name(f.type)
        if dataclasses.is_dataclass(default):
            yield from schema_keys(type(default), f"{prefix}{f.name}.")
            continue
        if default == MISSING:
            nested = _dataclass_named(cls, kind)
            if nested is not None:
                yield from schema_keys(nested, f"{prefix}{f.name}.")
                continue
            shown = "(required)"
        else:
            shown = _show(default)
        yield SchemaKey(f"{prefix}{f.name}", shown, kind, comments.get(f.name, ""))


def _type_name(annotation: Any) -> str:
    """An annotation as written: a string under `from __future__ import annotations`, else its repr."""
    if isinstance(annotation, str):
        return annotation
    if isinstance(annotation, type):
        return annotation.__name__
    return re.sub(r"\b(typing|builtins)\.", "", repr(annotation))


def _dataclass_named(owner: type, annotation: str) -> Optional[type]:
    """The dataclass an annotation names, looked up in the owner's module (annotations are strings)."""
    module = sys.modules.get(owner.__module__)
    candidate = getattr(module, annotation.strip(), None) if module else None
    return candidate if isinstance(candidate, type) and dataclasses.is_dataclass(candidate) else None


def schema_from_store(name: str, modules: list[str]) -> Optional[type]:
    """The dataclass stored in Hydra's ConfigStore as `name` once `modules` are imported (None if none is)."""
    from hydra.core.config_store import ConfigLoadError, ConfigStore
    from omegaconf import OmegaConf

    for module in modules:
        importlib.import_module(module)
    try:
        node = ConfigStore.instance().load(f"{name}.yaml").node
    except ConfigLoadError:
        return None
    kind = OmegaConf.get_type(node)
    return kind if isinstance(kind, type) and dataclasses.is_dataclass(kind) else None


# ---- the whole conf/ folder -------------------------------------------------------------------------------

@dataclass
class Group:
    name: str                       # hydra/launcher
    options: dict[str, YamlFile]    # option name -> file (shared `_` files included)
    slot: Optional[DefaultsEntry] = None
    entry_point: Optional[str] = None

    @property
    def package(self) -> str:
        """Where its options' keys go: the slot's `@package`, else the group's path."""
        if self.slot is not None and self.slot.package:
            return self.slot.package
        return self.name.replace("/", ".")

    @property
    def selectable(self) -> list[str]:
        return sorted(n for n in self.options if not n.startswith("_"))


@dataclass
class Conf:
    root: Path
    entry_points: dict[str, YamlFile] = field(default_factory=dict)
    groups: dict[str, Group] = field(default_factory=dict)


def ignored_patterns(repo: Path, conf: Path) -> list[str]:
    """The .gitignore patterns that reach into conf/ (relative to conf/), e.g. local/*.yaml."""
    gitignore = repo / ".gitignore"
    if not gitignore.is_file():
        return []
    prefix = conf.name + "/"
    return [line.strip()[len(prefix):] for line in gitignore.read_text().splitlines()
            if line.strip().startswith(prefix) and not line.strip().startswith("#")]


def read_conf(conf: Path, ignore: list[str] = ()) -> Conf:
    out = Conf(conf)
    for path in sorted(conf.rglob("*.yaml")):
        rel = path.relative_to(conf).as_posix()
        if any(fnmatch.fnmatch(rel, pattern) for pattern in ignore):
            continue
        parsed = read_yaml(path)
        if path.parent == conf:
            out.entry_points[path.stem] = parsed
        else:
            group = path.parent.relative_to(conf).as_posix()
            out.groups.setdefault(group, Group(group, {})).options[path.stem] = parsed
    for entry_name, entry in out.entry_points.items():
        for d in entry.defaults:
            if d.group and "override" not in d.flags and not d.is_schema:
                group = out.groups.setdefault(d.group, Group(d.group, {}))
                group.slot, group.entry_point = d, entry_name
    return out


def set_keys(conf: Conf) -> set[str]:
    """Every key some yaml file sets, as a path from the config root."""
    keys = set()
    for entry in conf.entry_points.values():
        keys |= {k.path for k in entry.keys}
    for group in conf.groups.values():
        for option in group.options.values():
            package = option.package or group.package
            prefix = "" if package == "_global_" else package + "."
            keys |= {prefix + k.path for k in option.keys}
    return keys


def _covered(path: str, keys: set[str]) -> bool:
    return path in keys or any(k.startswith(path + ".") for k in keys)


# ---- Markdown ---------------------------------------------------------------------------------------------

def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    if not text:
        return ""
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{_cell(text)}{pad}{fence}"


def _anchor(title: str) -> str:
    """GitHub's heading anchor."""
    slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
    return "#" + slug


def _header(lines: list[str]) -> list[str]:
    """A file's header comment as a block quote; an indented line (a usage example) as its own line of code."""
    out, previous_code = [], False
    for line in lines:
        code = line.startswith("  ")
        if code or previous_code:
            out.append(">")
        out.append(f"> {_code(line.strip())}" if code else f"> {line}".rstrip())
        previous_code = code
    while out and out[-1] == ">":
        out.pop()
    return out + ([""] if out else [])


def _keys_table(keys: list[Key], value_title: str = "value") -> list[str]:
    if not keys:
        return ["(no keys of its own)", ""]
    rows = [f"| key | {value_title} | meaning |", "| --- | --- | --- |"]
    rows += [f"| {_code(k.path)} | {_code(k.value)} | {_cell(k.comment) or '—'} |" for k in keys]
    return rows + [""]


def _schema_table(keys: list[tuple[SchemaKey, str]]) -> list[str]:
    rows = ["| key | default | type | meaning | schema |", "| --- | --- | --- | --- | --- |"]
    rows += [f"| {_code(k.path)} | {_code(k.default)} | {_code(k.type)} | {_cell(k.comment) or '—'} | {where} |"
             for k, where in keys]
    return rows + [""]


def _builds_on(option: YamlFile) -> list[str]:
    parts = []
    bases = [str(e.option) for e in option.defaults
             if e.group is None and not e.is_schema and e.option not in ("_self_", None)]
    if bases:
        parts.append("builds on " + ", ".join(_code(b) for b in bases))
    overrides = [e for e in option.defaults if e.group and not e.is_schema]
    if overrides:
        parts.append("sets " + ", ".join(_code(f"{e.group}={_show(e.option)}") for e in overrides))
    return [f"*{'; '.join(parts)}.*", ""] if parts else []


def entry_point_command(entry: YamlFile) -> Optional[str]:
    """The command an entry point's header runs (`python -m dpo_exp.train`), if it names one."""
    for line in entry.header:
        match = re.search(r"python -m ([\w.]+)", line)
        if match:
            return match.group(1)
    return None


def _where(schema: type) -> str:
    return f"`{schema.__module__}.{schema.__qualname__}`"


def render(conf_dir: Path, schema_lookup: Callable[[str, list[str]], Optional[type]] = schema_from_store,
           ignore: list[str] = ()) -> str:
    """The whole reference as Markdown.

    `schema_lookup(name, modules)` returns the dataclass stored under `name` once `modules` are imported, or None:
    an entry point's schema (`config_schema`, asked with the modules its header runs), a schema an entry point
    puts in a slot (`data_columns/schema`) and an option's own (`loss/cdpo_schema`). Their keys that no yaml sets
    are listed with their defaults; a schema it cannot find only leaves those out."""
    conf = read_conf(conf_dir, ignore)
    keys_set = set_keys(conf)
    out = ["# Configuration reference", "",
           f"<!-- Generated by {COMMAND} from conf/ and the schemas it names: do not edit by hand. -->", "",
           f"Generated from `conf/` by `{COMMAND}` (a test fails when this file is stale; `--check` tells). Every config "
           "group, every option file, every key with the value the file sets and the comment written beside it, and "
           "the keys only a typed schema declares. `GROUP=OPTION` picks an option (`loss=ipo`), `GROUP.KEY=VALUE` "
           "changes a key (`loss.beta=0.5`), `python -m dpo_exp.train --cfg job` prints the composed config. The "
           "guides say when to use what: [README](../README.md).", ""]
    contents, body = [], []
    schema_only: dict[str, list[tuple[SchemaKey, str]]] = {}  # group -> (key, the schema it comes from)

    for entry_name, entry in conf.entry_points.items():
        command = entry_point_command(entry)
        modules = [command] if command else []
        title = f"{entry_name}.yaml" + (f": python -m {command}" if command else "")
        contents.append(f"- [{title}]({_anchor(title)})")
        body += [f"## {title}", ""] + _header(entry.header)
        slots = [d for d in entry.defaults if d.group and not d.is_schema]
        if slots:
            body += ["| slot | default | options | what it selects |", "| --- | --- | --- | --- |"]
            for d in slots:
                group = conf.groups.get(d.group)
                options = ", ".join(_code(n) for n in group.selectable) if group and group.selectable else "—"
                default = _show(d.option) if d.option is not None else "none"
                flags = f" ({', '.join(d.flags)})" if d.flags else ""
                link = f"[{_code(d.label)}]({_anchor('group ' + d.group)})" if group and group.options else _code(d.label)
                body.append(f"| {link}{flags} | {_code(default)} | {options} | {_cell(d.comment) or '—'} |")
            body.append("")
        schemas = [e for e in entry.defaults if e.is_schema]
        if schemas:
            body += ["Typed schemas (stored in Hydra's ConfigStore, not files of conf/):", ""]
            body += [f"- {_code(e.label if e.group is None else f'{e.label}: {e.option}')}"
                     + (f": {_cell(e.comment)}" if e.comment else "") for e in schemas] + [""]
        body += [f"Keys of `{entry_name}.yaml` itself:", ""] + _keys_table(entry.keys, "default")

        found = []  # (schema, the prefix its keys have from the config root)
        for e in schemas:
            name = str(e.option) if e.group is None else f"{e.group}/{e.option}"
            schema = schema_lookup(name, modules)
            if schema is not None:
                found.append((schema, "" if e.group is None else (e.package or e.group.replace("/", ".")) + "."))
        loose, sections = [], {}
        for schema, prefix in found:
            for key in schema_keys(schema, prefix):
                if _covered(key.path, keys_set):
                    continue
                head = key.path.split(".")[0]
                if head in conf.groups and conf.groups[head].options:
                    schema_only.setdefault(head, []).append((key, _where(schema)))
                elif "." in key.path:
                    sections.setdefault(head, []).append((key, _where(schema)))
                else:
                    loose.append((key, _where(schema)))
        if loose:
            body += ["Top-level keys only a schema declares:", ""] + _schema_table(loose)
        for head, keys in sections.items():
            body += [f"### Section `{head}`: no yaml, the schema's defaults", ""] + _schema_table(keys)

    for name in _group_order(conf):
        group = conf.groups[name]
        if not group.options:
            continue
        title = f"Group {name}"
        contents.append(f"- [`{name}`]({_anchor(title)})")
        body += [f"## {title}", ""]
        intro = [f"Folder `conf/{name}/`; pick an option with `{name}=NAME`"]
        if group.package != name.replace("/", "."):
            intro.append(f"its keys go under `{group.package}`")
        if group.slot is not None:
            default = _show(group.slot.option) if group.slot.option is not None else "none"
            intro.append(f"default `{default}` (`{group.entry_point}.yaml`)")
            if group.slot.comment:
                intro.append(group.slot.comment)
        body += ["; ".join(intro) + ".", ""]
        for option_name in sorted(group.options):
            option = group.options[option_name]
            shared = option_name.startswith("_")
            heading = f"`{option_name}.yaml`: keys its group's options share" if shared else f"`{name}={option_name}`"
            body += [f"### {heading}", ""] + _header(option.header) + _builds_on(option)
            if option.package_global:
                body += ["*Keys are paths from the config root (`# @package _global_`).*", ""]
            elif (option.package or group.package) != group.name.replace("/", "."):
                body += [f"*Keys are under `{option.package or group.package}`.*", ""]
            body += _keys_table(option.keys)
            own = _option_schema_keys(group, option, schema_lookup)
            if own:
                body += ["Keys only its schema declares (their defaults apply):", ""] + _schema_table(own)
        keys = schema_only.get(name, [])
        if keys:
            body += [f"### Keys of `{name}` no option file sets", "", "Their defaults are the schema's.", ""]
            body += _schema_table(keys)
    return "\n".join(out + ["Contents:", ""] + contents + [""] + body).rstrip() + "\n"


def _option_schema_keys(group: Group, option: YamlFile,
                        schema_lookup: Callable[[str, list[str]], Optional[type]]) -> list[tuple[SchemaKey, str]]:
    """The keys an option's own schema (`defaults: [cdpo_schema, _self_]`, stored as `loss/cdpo_schema`) declares
    that neither the option nor the shared files it builds on set."""
    written = {k.path for k in option.keys}
    for base in option.defaults:
        if base.group is None and not base.is_schema and str(base.option) in group.options:
            written |= {k.path for k in group.options[str(base.option)].keys}
    keys = []
    for name in option.schemas:
        schema = schema_lookup(f"{group.name}/{name}", [])
        if schema is not None:
            keys += [(k, _where(schema)) for k in schema_keys(schema) if not _covered(k.path, written)]
    return keys


def _group_order(conf: Conf) -> list[str]:
    """Groups in the order the entry points' defaults list them, then the others alphabetically."""
    ordered = []
    for entry in conf.entry_points.values():
        ordered += [d.group for d in entry.defaults if d.group and d.group in conf.groups and d.group not in ordered]
    return ordered + sorted(set(conf.groups) - set(ordered))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is not what this would write")
    parser.add_argument("--conf", type=Path, default=ROOT / "conf", help="the config folder (default: conf/)")
    parser.add_argument("--out", type=Path, default=OUT, help="the file to write (default: docs/configuration.md)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))

    def lookup(name: str, modules: list[str]) -> Optional[type]:
        schema = schema_from_store(name, modules)
        if schema is None and "/" not in name:  # an entry point's own schema: its keys would go missing unnoticed
            print(f"config_reference: no schema {name!r} in Hydra's ConfigStore after importing "
                  f"{', '.join(modules) or 'nothing'}; the keys only it declares are left out", file=sys.stderr)
        return schema

    text = render(args.conf, schema_lookup=lookup, ignore=ignored_patterns(ROOT, args.conf))
    if args.check:
        current = args.out.read_text() if args.out.is_file() else ""
        if current != text:
            print(f"{args.out} is stale: regenerate it with `{COMMAND}`", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
