"""The documentation is a contract: every shell command in the ```bash blocks of README.md and docs/**/*.md runs
as written.

Commands are read from the documents themselves, so a newly documented command is covered without editing this
file. They are taken in reading order: README.md, then the guides and result pages in the order the README's
"Guides" and "Results" lists link them, then any other page under docs/. A command shown in several places (a
guide's command repeated on the result page it produced) is checked once, where it first appears. Inline code is
not read. Each kind of command is handled one way, and a command of no known kind fails the test:

- `pip install ...`: not run (CI installs); every extra it names must exist in pyproject.toml.
- `python -m pytest ...`: this suite.
- `torchrun [options] -m dpo_exp.train ...`: composed like a train command; a single-node (`--standalone`)
  command that can run here is run at smoke budget on 2 CPU processes (gloo), and must write one run
  directory with both ranks' checkpoint files.
- `python -m dpo_exp.judge ...`: composed as written (conf/judging.yaml); run in order when everything it
  reads is here (the run folders commands before it made, the judge's model folder, ../shared for
  calibration) and its judge needs no endpoint: it must write winrates.json into every judged run (or
  calibration.json).
- `python -m dpo_exp.train ...`: composed and validated as written (every sweep value), its hub ids
  checked. If it can run here (no hub dataset or hub model, no GPU, no pretrained model) it is also run,
  in order, at smoke budget (`debug=smoke`, whose keys win over the command's), with cwd a scratch
  checkout whose ../shared is the real one; it must exit 0 and write summary.json, metrics.jsonl and
  .hydra/ for each of its jobs.
- `python scripts/X.py`: run in order on what the commands before it wrote
  (a folder under outputs/ it reads must exist by then: the command before must have made it); a file
  it is told to write (-o / --out / --json) must appear. Scripts that download (fetch_smollm2.py) are
  checked with --help instead; the benchmark gets a smoke budget (SCRIPT_BUDGET).

Besides the commands: every relative link between the documents must reach a file and, if it names one, a
heading that exists; every guide and result page must be linked from the README; the README stays a first page.
"""
from __future__ import annotations

import itertools
import json
import re
import runpy
import shlex
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import ROOT, SHARED_DATA, assert_valid_hub_ids, compose_judging, hub_values, is_local_path, run_cli
from dpo_exp.components import register_configs
from dpo_exp.validation import validate

README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 250  # the guide's first page; the rest lives in docs/
register_configs()

# Scripts that fetch from the network: their flags are checked against --help instead of running them.
DOWNLOADS = {"scripts/fetch_smollm2.py"}
# Extra arguments that give a script a smoke budget (appended, so they win over the documented ones).
# The benchmark's smoke budget runs its default row against TRL's fp32 (the strict loss check) and the scaling
# table's smallest shape (a process per row and a FLOP-count process per table row: all would take ten minutes),
# TRL as shipped only (--trl-allocator both doubles its rows; run by hand: docs/results/throughput_vs_trl.md).
SCRIPT_BUDGET = {"scripts/bench_dpo.py": ["--steps", "3", "--warmup-steps-excluded", "1", "--pairs", "16",
                                          "--repeats", "1", "--rows", "fp32", "--scaling-steps", "3",
                                          "--shapes", "128", "--trl-allocator", "default"]}
OUTPUT_FLAGS = ("-o", "--out", "--json")


def _reading_order_links(text: str) -> list[str]:
    """docs/ pages in the order the README's "Guides" and "Results" lists link them (the whole README if it has
    no such list), each once."""
    start = text.find("\n## Guides")
    links = re.findall(r"\]\((docs/[^)#\s]+\.md)", text[start:] if start >= 0 else text)
    return list(dict.fromkeys(links))


def documents() -> list[Path]:
    """README.md, then every docs/**/*.md in reading order."""
    linked = [ROOT / link for link in _reading_order_links(README.read_text())]
    rank = {path: i for i, path in enumerate(linked)}
    pages = sorted(DOCS.rglob("*.md"), key=lambda p: (rank.get(p, len(rank)), p.as_posix()))
    return [README, *pages]


@dataclass(frozen=True)
class Command:
    file: str        # the document, relative to the repository
    line: int        # its line number there
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {shlex.join(self.argv)}"

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def kind(self) -> str:
        a = self.argv
        if a[:2] == ("pip", "install"):
            return "install"
        if a[:3] == ("python", "-m", "pytest"):
            return "tests"
        if a[:3] == ("python", "-m", "dpo_exp.train"):
            return "train"
        if a[0] == "torchrun" and ("-m", "dpo_exp.train") in zip(a, a[1:]):
            return "torchrun"
        if a[:3] == ("python", "-m", "dpo_exp.judge"):
            return "judge"
        if len(a) >= 2 and a[0] == "python" and a[1].endswith(".py"):
            return "script"
        return "unknown"


def commands_in(path: Path) -> list[Command]:
    """Every command of every ```bash block of one document (`a && b` is two commands), comments dropped."""
    commands, lang = [], None
    name = path.relative_to(ROOT).as_posix()
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            lang = line[3:].strip() if lang is None else None
            continue
        if lang == "bash" and line.strip():
            for part in line.split("&&"):
                argv = shlex.split(part, comments=True)
                if argv:
                    commands.append(Command(name, number, tuple(argv)))
    return commands


def every_occurrence() -> list[Command]:
    """Every documented command in reading order, repeats included."""
    return [c for path in documents() for c in commands_in(path)]


def documented_commands() -> list[Command]:
    """Every documented command once, where it first appears in reading order."""
    first: dict[tuple[str, ...], Command] = {}
    for command in every_occurrence():
        first.setdefault(command.argv, command)
    return list(first.values())


COMMANDS = documented_commands()
TRAIN = [c for c in COMMANDS if c.kind == "train"]
TORCHRUN = [c for c in COMMANDS if c.kind == "torchrun"]


def torchrun_options(command: Command) -> list[str]:
    """torchrun's own options: the words between `torchrun` and `-m dpo_exp.train`."""
    return list(command.argv[1:command.argv.index("dpo_exp.train") - 1])


def train_overrides(command: Command) -> tuple[list[str], bool]:
    words = list(command.argv[command.argv.index("dpo_exp.train") + 1:])
    multirun = any(w in ("-m", "--multirun") for w in words)
    return [w for w in words if w not in ("-m", "--multirun")], multirun


def expand_sweeps(overrides: list[str]) -> list[list[str]]:
    """One override list per job of a `-m key=a,b` sweep (the cross product, as Hydra's basic sweeper)."""
    choices = []
    for word in overrides:
        key, _, value = word.partition("=")
        if "," in value and not value.startswith(("[", "{")):
            choices.append([f"{key}={v}" for v in value.split(",")])
        else:
            choices.append([word])
    return [list(job) for job in itertools.product(*choices)]


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, "paths.output_dir=/tmp/dpo_exp_readme_compose"])
    OmegaConf.resolve(cfg)
    return cfg


def _is_hub_id(value) -> bool:
    return isinstance(value, str) and not is_local_path(value)


def why_not_here(cfg) -> str | None:
    """Why a composed command cannot run on this offline CPU machine, or None."""
    if str(cfg.trainer.device).startswith("cuda"):
        return "needs a GPU"
    if cfg.model.name_or_path is not None:
        where = "the hub" if _is_hub_id(cfg.model.name_or_path) else "a model folder another command fetches"
        return f"trains a pretrained model from {where} ({cfg.model.name_or_path})"
    d, task = cfg.data, cfg.task.name
    reads_data = task == "preference" or d.name == "imdb"
    if reads_data and d.path is None and d.hub_name:
        return f"reads the hub dataset {d.hub_name}"
    return None


def smoke_keys() -> set[str]:
    def flat(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    return set(flat(yaml.safe_load((ROOT / "conf" / "debug" / "smoke.yaml").read_text())))


def at_smoke_budget(overrides: list[str]) -> list[str]:
    """The command's overrides with debug=smoke, smoke's keys winning (so 160 steps become smoke's 4)."""
    keys = smoke_keys()
    kept = [w for w in overrides if w.partition("=")[0].lstrip("+~") not in keys]
    return kept if "debug=smoke" in kept else [*kept, "debug=smoke"]


# ---- every command is of a known kind, and every train command composes ---------------------------

def test_the_docs_document_commands_of_known_kinds():
    assert len(TRAIN) >= 20
    unknown = [str(c) for c in COMMANDS if c.kind == "unknown"]
    assert not unknown, "documented commands this test does not know how to check:\n" + "\n".join(unknown)
    readme = commands_in(README)
    assert any(c.kind == "tests" for c in readme), "the README says how to run the tests"


def test_every_extra_the_docs_install_exists():
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    for command in (c for c in COMMANDS if c.kind == "install"):
        for word in command.argv[2:]:
            if match := re.fullmatch(r"\.\[([\w,-]+)\]", word):
                assert set(match.group(1).split(",")) <= extras, command
    quickstart = next(c for c in commands_in(README) if c.kind == "install")
    assert quickstart.argv[2].startswith("torch=="), "install torch first: an unpinned torch pulls the CUDA build"


@pytest.mark.parametrize("command", TRAIN + TORCHRUN, ids=[c.id for c in TRAIN + TORCHRUN])
def test_every_documented_train_command_composes_validates_and_names_valid_hub_ids(command):
    overrides, _ = train_overrides(command)
    for job in expand_sweeps(overrides):
        cfg = compose_cfg(job)
        validate(cfg)
        assert_valid_hub_ids(hub_values(OmegaConf.to_container(cfg, enum_to_str=True)), str(command))


# ---- and the ones that can run here, run ------------------------------------------------------------

@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A scratch working directory laid out like a clone: scripts/, docs/, outputs/ and ../shared."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "scripts").symlink_to(ROOT / "scripts")
    (repo / "docs").mkdir()  # written into here, never into the real docs/
    if SHARED_DATA.exists():
        (tmp_path / "shared").symlink_to(SHARED_DATA.parent)
    monkeypatch.chdir(repo)
    return repo


def run_dirs(repo: Path) -> set[Path]:
    return {p.parent.parent for p in (repo / "outputs").rglob(".hydra/config.yaml")}


def run_script(argv: list[str]) -> str:
    import contextlib
    import io

    old = sys.argv
    sys.argv = argv
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise AssertionError(f"python {shlex.join(argv)} exited with {exit_.code}\n{out.getvalue()[-2000:]}")
    finally:
        sys.argv = old
    return out.getvalue()


def written_before(command: Command) -> set[str]:
    """Paths that documented commands before this one are told to write (-o / --out / --json)."""
    paths = set()
    for earlier in COMMANDS[:COMMANDS.index(command)]:
        a = earlier.argv
        paths |= {a[i + 1] for i, w in enumerate(a[:-1]) if w in OUTPUT_FLAGS}
    return paths


_LAST_START = [0.0]  # when the last train command started


def check_train(command: Command, repo: Path) -> str:
    overrides, multirun = train_overrides(command)
    cfg = compose_cfg(expand_sweeps(overrides)[0])
    reason = why_not_here(cfg)
    if not SHARED_DATA.exists() and "shared/data" in " ".join(map(str, (cfg.data.path, cfg.data.eval_path, *overrides))):
        return f"skipped: {SHARED_DATA} (the project's real data samples) is absent here"
    if reason:
        model = cfg.model.name_or_path
        if model is not None and not _is_hub_id(model):
            assert model in written_before(command), f"{command}: reads {model}, which no command before it makes"
        return f"composed only: {reason}"
    before = run_dirs(repo)
    time.sleep(max(0.0, 1.0 - (time.time() % 1.0)) if time.time() - _LAST_START[0] < 1.0 else 0.0)
    _LAST_START[0] = time.time()  # run folders are named to the second: two runs started in one second would share one
    run_cli(*(["-m"] if multirun else []), *at_smoke_budget(overrides))
    new = run_dirs(repo) - before
    jobs = len(expand_sweeps(overrides)) if multirun else 1
    assert len(new) >= jobs, f"{command}: {len(new)} run directories, expected {jobs}"
    for run in new:
        for name in ("summary.json", "metrics.jsonl"):
            assert (run / name).is_file(), f"{command}: no {name} in {run}"
        summary = json.loads((run / "summary.json").read_text())
        assert summary["steps"] > 0, f"{command}: {run} trained no step"
    return f"ran at smoke budget: {len(new)} run(s)"


def check_torchrun(command: Command, repo: Path) -> str:
    overrides, _ = train_overrides(command)
    cfg = compose_cfg(overrides)
    reason = why_not_here(cfg) or (None if "--standalone" in torchrun_options(command) else "several nodes")
    if reason:
        return f"composed only: {reason}"
    before = run_dirs(repo)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dpo_exp.train",
            *at_smoke_budget(overrides)]
    done = subprocess.run(argv, cwd=repo, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{command}: exited with {done.returncode}\n{(done.stdout + done.stderr)[-3000:]}"
    new = run_dirs(repo) - before
    assert len(new) == 1, f"{command}: {len(new)} run directories, expected 1 shared by both ranks"
    run = new.pop()
    assert json.loads((run / "summary.json").read_text())["steps"] > 0
    assert sorted(p.name for p in (run / "checkpoints" / "final" / "rng").iterdir()) == ["rank_0.pt", "rank_1.pt"]
    return "ran at smoke budget: 2 processes"


JUDGE = [c for c in COMMANDS if c.kind == "judge"]


@pytest.mark.parametrize("command", JUDGE, ids=[c.id for c in JUDGE])
def test_every_documented_judge_command_composes(command):
    cfg = compose_judging(*command.argv[3:], "cache_dir=/tmp/dpo_exp_readme_judge_cache")
    assert cfg.runs or cfg.calibrate, f"{command}: judges nothing"


def check_judge(command: Command, repo: Path) -> str:
    overrides = list(command.argv[3:])
    cfg = compose_judging(*overrides, "cache_dir=/tmp/dpo_exp_readme_judge_cache")
    if cfg.judge.name == "api":
        return "composed only: needs a chat-completions endpoint and its key"
    if cfg.judge.name == "hf" and not (repo / cfg.judge.path).exists():
        return f"composed only: reads {cfg.judge.path}, which scripts/fetch_smollm2.py fetches"
    if cfg.calibrate:
        if not (repo / cfg.calibrate).exists():
            return f"skipped: {cfg.calibrate} is absent here"
    else:
        for path in [*cfg.runs, *([] if cfg.baseline in ("initial", "reference") else [cfg.baseline])]:
            assert (repo / path).exists(), f"{command}: reads {path}, which no command before it made"
    run_cli(*overrides, f"cache_dir={repo / 'outputs' / 'cache'}", module="dpo_exp.judge")
    if not cfg.calibrate:
        from dpo_exp.judging.winrates import expand_runs

        for run in expand_runs([repo / r for r in cfg.runs]):
            assert (run / "winrates.json").is_file(), f"{command}: no winrates.json in {run}"
    return "ran"


def check_script(command: Command, repo: Path) -> str:
    argv = list(command.argv[1:])
    script = argv[0]
    assert (ROOT / script).is_file(), f"{command}: no such script"
    outputs = {argv[i + 1] for i, w in enumerate(argv[:-1]) if w in OUTPUT_FLAGS}
    if script in DOWNLOADS:
        help_text = run_script([script, "--help"])
        for flag in (w for w in argv[1:] if w.startswith("-")):
            assert flag in help_text, f"{command}: {flag} is not an option of {script}"
        return "download: flags checked against --help"
    for word in argv[1:]:  # what it reads was made by a command before it
        if word.startswith("outputs/") and word not in outputs:
            assert (repo / word).exists(), f"{command}: reads {word}, which no command before it made"
    if script in SCRIPT_BUDGET:
        if not _importable("trl"):
            argv += ["--impl", "dpo_exp"]  # TRL is the bench extra; without it, dpo_exp's side alone
        argv += SCRIPT_BUDGET[script]
    printed = run_script(argv)
    for out in outputs:
        written = (repo / out).is_file() and (repo / out).stat().st_size > 0
        written |= (repo / out).is_dir() and any(f.stat().st_size > 0 for f in (repo / out).iterdir())  # a folder
        assert written, f"{command}: did not write {out}"
        if out.endswith(".png"):
            assert (repo / out).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if "--markdown" in argv:
        assert re.search(r"^\| .+ \|$", printed, re.M), f"{command}: printed no Markdown table"
    return "ran"


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.mark.slow
def test_every_documented_command_runs_in_order_from_a_fresh_checkout(checkout, capsys):
    results = []
    unmade: set[str] = set()  # folders that commands skipped here (no ../shared) would have written
    for command in COMMANDS:
        start = time.perf_counter()
        if command.kind == "train":
            how = check_train(command, checkout)
            if how.startswith("skipped"):
                unmade |= {w.split("=", 1)[1] for w in command.argv if w.startswith(("hydra.sweep.dir=", "hydra.run.dir="))}
        elif command.kind == "torchrun":
            how = check_torchrun(command, checkout)
        elif command.kind == "judge":
            reads_unmade = [w for w in command.argv if any(u in w for u in unmade)]
            how = (f"skipped: reads {reads_unmade[0]}, made by a skipped command" if reads_unmade
                   else check_judge(command, checkout))
        elif command.kind == "script":
            reads_unmade = [w for w in command.argv if w in unmade]
            how = (f"skipped: reads {reads_unmade[0]}, made by a skipped command" if reads_unmade
                   else check_script(command, checkout))
        else:
            continue
        results.append((command, how, time.perf_counter() - start))
    ran = [c for c, how, _ in results if how.startswith("ran")]
    with capsys.disabled():  # what was run and what was only composed, and how long it took, for whoever reads the log
        print("\n" + "\n".join(f"{how:>40} {seconds:6.1f} s  {c}" for c, how, seconds in results))
    assert len(ran) >= (20 if SHARED_DATA.exists() else 15)


def test_the_on_invalid_error_example_is_what_the_code_prints():
    from dpo_exp.data import formats

    pattern = r"naming file, line and field \(`([^`]+)`\)"
    quoted = next((m for path in documents() if (m := re.search(pattern, path.read_text()))), None)
    assert quoted, "the docs' data.on_invalid=error example"
    file_name = quoted.group(1).split(":")[0]
    path = SHARED_DATA / "ultrafeedback" / file_name
    if not path.exists():
        pytest.skip(f"{path} is absent")
    with pytest.raises(formats.DataFileError) as info:
        formats.load("ultrafeedback", path=str(path), on_invalid="error")
    assert str(info.value).endswith(quoted.group(1))


def test_documented_commands_write_into_outputs_never_over_committed_files():
    """A documented command run as written (at any budget) must not replace a committed file such as the measured
    figures in docs/: everything a command writes (-o, --out, --json) goes under outputs/."""
    written = [(c, c.argv[i + 1]) for c in every_occurrence() for i, w in enumerate(c.argv[:-1]) if w in OUTPUT_FLAGS]
    assert written, "no documented command names an output; the check would be empty"
    assert [f"{c}: writes {path}" for c, path in written if not path.startswith("outputs/")] == []


def test_the_documented_reward_model_users_reuse_the_documented_reward_model():
    """The docs say one cached reward model serves PPO and online DPO: the commands that train on a reward model
    (outside presets) must name the reward-model command's settings, or each would train a reward model of its own."""
    def uses_reward_model(args: list[str]) -> bool:
        if any(a.startswith("experiment=") for a in args):
            return False
        return ("loss=reward_model" in args or ("loss=ppo" in args and "ppo.reward=gold" not in args)
                or ("loss=online_dpo" in args and "online_dpo.annotator=gold" not in args))

    settings = {}
    for command in TRAIN:
        args = train_overrides(command)[0]
        if uses_reward_model(args):
            settings[str(command)] = sorted(a for a in args if a.startswith("reward_model."))
    assert len(settings) >= 3, settings
    assert len({tuple(s) for s in settings.values()}) == 1, settings


# ---- the documents hang together ----------------------------------------------------------------------

def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors of a Markdown document's headings (lower case, punctuation dropped, spaces to hyphens,
    a repeated heading numbered)."""
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.+)$", _without_code_blocks(text), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _without_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def relative_links(path: Path) -> list[tuple[str, str]]:
    """(target, anchor) of every link and image of a document that points inside the repository."""
    text = re.sub(r"`[^`\n]*`", "", _without_code_blocks(path.read_text()))  # code is not a link
    links = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        links.append((file, anchor))
    return links


def test_every_relative_link_in_the_docs_reaches_a_file_and_heading():
    broken = []
    for path in documents():
        for file, anchor in relative_links(path):
            target = (path.parent / file).resolve() if file else path
            if not target.exists():
                broken.append(f"{path.relative_to(ROOT)}: {file} does not exist")
            elif anchor and target.suffix == ".md" and anchor not in heading_anchors(target.read_text()):
                broken.append(f"{path.relative_to(ROOT)}: {file or path.name} has no heading #{anchor}")
    assert not broken, "links that lead nowhere:\n" + "\n".join(broken)


def test_the_link_check_sees_a_broken_anchor(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A `title`: here\n\n[ok](#a-title-here) [bad](#nowhere) [file](other.md)\n")
    assert heading_anchors(page.read_text()) == {"a-title-here"}
    assert relative_links(page) == [("", "a-title-here"), ("", "nowhere"), ("other.md", "")]


def test_every_guide_and_result_page_is_linked_from_the_readme():
    linked = {ROOT / link for link in _reading_order_links(README.read_text())}
    pages = {p for p in DOCS.rglob("*.md")}
    assert sorted(str(p.relative_to(ROOT)) for p in pages - linked) == []


def test_the_readme_stays_a_first_page():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, (f"README.md has {lines} lines; it is the guide's first page "
                                       f"(at most {README_MAX_LINES}): move detail into docs/")
