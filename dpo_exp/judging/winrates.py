"""Win rates as the DPO paper measured them, for `python -m dpo_exp.judge` and a training run's `eval.judge`.

For every judged run and sampling temperature: the policy's
evaluation samples (the `eval/samples/T=<t>` tables the run wrote, at its last evaluation or `step`;
sampled now from checkpoints/final when the run wrote none at that temperature) are compared, prompt by
prompt, with a baseline's response to the same prompt:

- `baseline=initial`: the run's own policy before training (its step-0 samples at that temperature, or
  π_SFT sampled now): "against π_SFT";
- `baseline=reference`: the dataset's reference response to each held-out prompt (TL;DR's human reference summary, HH's chosen response; the held-out pair's chosen response where there is none);
- `baseline=RUN_DIR`: another run's samples at the same temperature (head to head).

Each comparison is shown in an order drawn from a seeded RNG and the verdict mapped back; ties and unusable
answers are counted apart. Results: RUN_DIR/winrates.json (one entry per judge and baseline: win rate,
counts, bootstrap 95% interval, position-bias agreement, the judge's tally), RUN_DIR/judgements_<judge>_vs_
<baseline>.jsonl (every comparison with the judge's raw answer), winrate/* keys in summary.json, and the
run's W&B page when it logged to W&B.
"""
from __future__ import annotations

import json
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import OmegaConf

from dpo_exp.conf_path import CONF_DIR
from dpo_exp.config import Config, LoggerName
from dpo_exp.errors import ConfigError
from dpo_exp.judging.judges import JUDGES, Comparison, Judge, JudgeContext
from dpo_exp.judging.stats import agreement, win_rate
from dpo_exp.loggers import console
from dpo_exp.pipeline import prepare
from dpo_exp.stages import reward_model_dir
from dpo_exp.tasks import TASKS


SAMPLES_FILE = "judge_samples.jsonl"  # samples drawn by the judge where a run had none (reused next time)
WINRATES_FILE = "winrates.json"


# ---- a judged run ---------------------------------------------------------------------------------

class JudgedRun:
    """A finished run directory: its training config, summary, and samples by temperature."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not (self.path / "summary.json").is_file():
            raise ConfigError(f"{self.path} is not a finished run directory (no summary.json)")
        self.summary = json.loads((self.path / "summary.json").read_text())
        self.cfg = load_run_config(self.path)
        self._prepared = None
        self.tables = self._read_tables()

    def _read_tables(self) -> dict[str, dict[int, list[tuple[str, str]]]]:
        """{table name: {step: [(prompt, response)]}} of the run's temperature tables and the judge's own."""
        tables: dict[str, dict[int, list[tuple[str, str]]]] = {}
        for name in ("samples.jsonl", SAMPLES_FILE):
            file = self.path / name
            if not file.exists():
                continue
            for line in file.read_text().splitlines():
                row = json.loads(line)
                if str(row.get("table", "")).startswith(("eval/samples/T=", "judge/")):
                    tables.setdefault(row["table"], {}).setdefault(int(row["step"]), []).append(
                        (row["prompt"], row.get("policy") or ""))
        return tables

    def temperatures(self) -> list[float]:
        return sorted({float(name.split("T=")[1]) for name in self.tables if name.startswith("eval/samples/T=")})

    @property
    def prepared(self):
        """The run's task, tokenizer and held-out pairs (from the cache, as training made them)."""
        if self._prepared is None:
            self._prepared = prepare(self.cfg)
        return self._prepared

    def samples(self, temperature: float, step: Optional[int], which: str, sample_missing: bool
                ) -> tuple[list[tuple[str, str]], str]:
        """(prompt, response) pairs of the policy (`which`=final: after training, at `step` or the last
        evaluation) or of the initial policy (`which`=initial: step 0, i.e. π_SFT), and where they came from."""
        table = self.tables.get(f"eval/samples/T={temperature:g}", {})
        if which == "initial" and 0 in table:
            return table[0], f"{self.path.name}: eval/samples/T={temperature:g} at step 0"
        if which == "final" and table:
            chosen = max(table) if step is None else step
            if chosen not in table:
                raise ConfigError(f"{self.path} has no T={temperature:g} samples at step {chosen}; steps: {sorted(table)}")
            return table[chosen], f"{self.path.name}: eval/samples/T={temperature:g} at step {chosen}"
        own = self.tables.get(f"judge/{which}/T={temperature:g}", {})
        if own:
            return own[max(own)], f"{self.path.name}: {SAMPLES_FILE} ({which}, T={temperature:g})"
        if not sample_missing:
            raise ConfigError(f"{self.path} has no {which} samples at T={temperature:g} (sample_missing=true samples "
                              "them from its checkpoint)")
        return self._sample(temperature, which), f"{self.path.name}: sampled now ({which}, T={temperature:g})"

    def _sample(self, temperature: float, which: str) -> list[tuple[str, str]]:
        """Sample the run's evaluation prompts now, as its evaluator would (same prompts, cap and seed)."""
        from dpo_exp.data import prompt_token_ids
        from dpo_exp.models import load_tokenizer, resolve_device, sample

        prep = self.prepared
        folder = self.path / "checkpoints" / "final" if which == "final" else Path(self.summary["sft_policy"])
        console(f"sampling {which} policy of {self.path.name} at T={temperature:g} ({folder})")
        model = load_policy(folder).to(resolve_device(self.cfg.trainer.device))
        tokenizer = load_tokenizer(str(folder) if (folder / "tokenizer_config.json").exists() else prep.sft_dir)
        prompts = [p for p in prep.task.eval_prompts(tokenizer, prep.eval_pairs)
                   for _ in range(self.cfg.eval.samples_per_prompt)]
        g = self.cfg.task.generation
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            out = sample(model, tokenizer, [prompt_token_ids(tokenizer, p) for p in prompts], g.max_new_tokens,
                         temperature, g.top_k, g.top_p, g.batch_size)
        rows = list(zip(prompts, out.texts))
        with open(self.path / SAMPLES_FILE, "a") as f:
            for prompt, text in rows:
                f.write(json.dumps({"table": f"judge/{which}/T={temperature:g}", "step": 0, "prompt": prompt,
                                    "policy": text, "source": str(folder)}) + "\n")
        return rows

    def references(self) -> dict[str, str]:
        """prompt -> the dataset's reference response (TL;DR's reference summary, HH's chosen response)."""
        prep = self.prepared
        return prep.task.reference_responses(prep.tokenizer, prep.eval_pairs)


def load_run_config(run: Path):
    """The run's training config, typed (its checkpoint's run_config.json, else .hydra/config.yaml)."""
    resolved = run / "checkpoints" / "final" / "run_config.json"
    if resolved.exists():
        loaded = OmegaConf.create(json.loads(resolved.read_text()))
    elif (run / ".hydra" / "config.yaml").exists():
        loaded = OmegaConf.load(run / ".hydra" / "config.yaml")
        loaded.paths.output_dir = str(run)  # was ${hydra:runtime.output_dir}
    else:
        raise ConfigError(f"{run} has neither checkpoints/final/run_config.json nor .hydra/config.yaml")
    cfg = OmegaConf.merge(OmegaConf.structured(Config), loaded)
    OmegaConf.resolve(cfg)
    return cfg


def load_policy(folder: Path):
    """A run's final policy, or π_SFT: a causal LM folder, or a LoRA adapter (its merged/ export if any)."""
    from dpo_exp.models import load_model

    if (folder / "adapter_config.json").exists():
        if (folder / "merged").is_dir():
            return load_model(str(folder / "merged"), torch.float32)
        from peft import AutoPeftModelForCausalLM

        return AutoPeftModelForCausalLM.from_pretrained(str(folder)).merge_and_unload()
    return load_model(str(folder), torch.float32)


# ---- judging ------------------------------------------------------------------------------------

def build_judge(cfg, run: Optional[JudgedRun], kind: str) -> Judge:
    """The configured judge (judge=NAME, dpo_exp.judging.judges.JUDGES); `run` gives the task (gold reward,
    cached reward model), `kind` the judging prompt judge_prompt=auto picks."""
    context = JudgeContext(
        gold_reward=None if run is None else (lambda: run.prepared.task.gold_reward),
        reward_model=None if run is None else (lambda: str(reward_model_dir(run.cfg, run.prepared))),
        template=lambda: prompt_template(cfg, kind), cache_dir=Path(cfg.cache_dir))
    return JUDGES[cfg.judge.name](cfg.judge, context)


def task_kind(run: JudgedRun) -> str:
    """The judging prompt the run's task asks for (judge_prompt=auto): its task's `judge_prompt`."""
    return TASKS[run.cfg.task.name].judge_prompt(run.cfg)


def prompt_template(cfg, kind: str) -> dict:
    """The judging prompt: the configured one, or the one for `kind` (judge_prompt=auto)."""
    p = cfg.judge_prompt
    if p.name != "auto":
        return {"name": p.name, "system": p.system, "user": p.user}
    chosen = OmegaConf.load(CONF_DIR / "judge_prompt" / f"{kind}.yaml")
    return {"name": kind, "system": chosen.system, "user": chosen.user}


def pair_up(policy: list[tuple[str, str]], baseline: dict[str, list[str]]) -> tuple[list[tuple[str, str, str]], int]:
    """(prompt, policy response, baseline response) for each policy sample whose prompt the baseline answered
    (the i-th sample of a prompt meets the baseline's i-th, or its last); and how many had no baseline."""
    seen: dict[str, int] = {}
    out, unmatched = [], 0
    for prompt, text in policy:
        answers = baseline.get(prompt)
        if not answers:
            unmatched += 1
            continue
        i = seen.get(prompt, 0)
        seen[prompt] = i + 1
        out.append((prompt, text, answers[min(i, len(answers) - 1)]))
    return out, unmatched


def judge_run(cfg, run: JudgedRun, judge: Judge, temperatures: list[float]) -> dict:
    """Every temperature of one run against the baseline: its entry of winrates.json."""
    label = baseline_label(cfg.baseline)
    other = JudgedRun(Path(cfg.baseline)) if label not in ("initial", "reference") else None
    results, rows = {}, []
    references = run.references() if label == "reference" else None  # reads the data file: once, not per T
    for t in temperatures:
        policy, source = run.samples(t, cfg.step, "final", cfg.sample_missing)
        if references is not None:
            base, base_source = {p: [r] for p, r in references.items()}, "the dataset's reference responses"
        else:
            base_rows, base_source = (run.samples(t, None, "initial", cfg.sample_missing) if other is None
                                      else other.samples(t, None, "final", cfg.sample_missing))
            base = {}
            for prompt, text in base_rows:
                base.setdefault(prompt, []).append(text)
        triples, unmatched = pair_up(policy, base)
        if cfg.max_prompts is not None:
            triples = triples[:cfg.max_prompts]
        if not triples:
            raise ConfigError(f"{run.path}: no T={t:g} sample has a baseline response to the same prompt "
                              f"({source} against {base_source})")
        rng = np.random.default_rng([cfg.seed, zlib.crc32(f"{run.path.name}|{label}|{t:g}".encode())])
        comparisons = [Comparison(p, a, b, bool(first)) for (p, a, b), first
                       in zip(triples, rng.integers(0, 2, size=len(triples)))]
        verdicts = judge.judge(comparisons)
        require_usable(verdicts, f"{run.path} vs {label}, T={t:g}", cfg.judge.name)
        check = sorted(rng.permutation(len(comparisons))[:round(cfg.position_check * len(comparisons))].tolist())
        swapped = judge.judge([comparisons[i].flipped() for i in check]) if check else []
        stats = win_rate([v.winner for v in verdicts], cfg.bootstrap, cfg.seed)
        stats["position_agreement"] = agreement([verdicts[i].winner for i in check], [v.winner for v in swapped],
                                                cfg.bootstrap, cfg.seed)
        stats.update({"unmatched": unmatched, "samples": source, "baseline_samples": base_source})
        results[f"{t:g}"] = stats
        console(f"{run.path.name} vs {label}, T={t:g}: win rate {fmt(stats['win_rate'])} "
                f"[{fmt(stats['ci_low'])}, {fmt(stats['ci_high'])}] over {stats['judged']} "
                f"({stats['ties']} ties, {stats['invalid']} unusable)")
        judged = [(c, v, False) for c, v in zip(comparisons, verdicts)]
        judged += [(comparisons[i].flipped(), v, True) for i, v in zip(check, swapped)]
        rows += [{"temperature": t, "prompt": c.prompt, "policy": c.policy, "baseline": c.baseline,
                  "policy_first": c.policy_first, "winner": v.winner, "raw": v.raw, "swapped_check": again}
                 for c, v, again in judged]
    entry = {"judge": cfg.judge.name, "judge_model": judge_model(cfg), "baseline": label,
             "prompt_template": getattr(judge, "template", {}).get("name"), "seed": cfg.seed,
             "step": cfg.step, "temperatures": results, "tally": judge.tally()}
    write_results(run, entry, rows, cfg)
    return entry


class JudgingFailed(ConfigError):
    """Not one comparison got a usable verdict (an endpoint that refused every request, answers that name neither
    response): there is no win rate to report, so nothing is written and the command fails with the judge's
    reason."""


def require_usable(verdicts: list, what: str, judge_name: str) -> None:
    """A judging whose every verdict is unusable is a failure, not a win rate of n/a: raise JudgingFailed with the
    commonest reason as the judge gave it (for judge=api, the request error as the HTTP client saw it)."""
    if not verdicts or any(v.winner != "invalid" for v in verdicts):
        return
    reason, count = Counter(v.raw for v in verdicts).most_common(1)[0]
    share = "all" if count == len(verdicts) else f"{count}"
    raise JudgingFailed(f"{what}: judge={judge_name} gave no usable verdict on any of the {len(verdicts)} "
                        f"comparisons; {share} of them: {reason[:500]}")


def baseline_label(baseline: str) -> str:
    return baseline if baseline in ("initial", "reference") else Path(baseline).name


def judge_model(cfg) -> Optional[str]:
    """The model behind the judge, where it has one (an endpoint's model, or a model folder)."""
    j = cfg.judge
    return j.get("model", j.get("path"))


def fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def write_results(run: JudgedRun, entry: dict, rows: list[dict], cfg) -> None:
    """winrates.json (one entry per judge and baseline), the judged comparisons, summary.json keys, W&B."""
    at_step = "" if entry["step"] is None else f"/step_{entry['step']}"  # step=0 (before training) beside the last
    key = f"{entry['judge']}/vs_{entry['baseline']}{at_step}"
    file = run.path / WINRATES_FILE
    everything = json.loads(file.read_text()) if file.exists() else {}
    everything[key] = entry
    write_json(file, everything)
    judged = run.path / f"judgements_{key.replace('/', '_')}.jsonl"
    judged.write_text("".join(json.dumps(r) + "\n" for r in rows))
    flat = {}
    for t, stats in entry["temperatures"].items():
        for name in ("win_rate", "ci_low", "ci_high", "judged"):
            flat[f"winrate/{key}/T={t}" + ("" if name == "win_rate" else f"/{name}")] = stats[name]
    summary = {**run.summary, **flat}
    write_json(run.path / "summary.json", summary)
    if cfg.wandb and (run.path / "wandb_run_id").exists() and LoggerName(run.cfg.logger.name) is LoggerName.wandb:
        from dpo_exp.loggers import WandbSink

        sink = WandbSink(run.cfg.logger, run.path, {}, run.cfg.experiment_name, None)
        sink.summary(flat)
        columns = ("temperature", "prompt", "policy", "baseline", "policy_first", "winner", "raw", "swapped_check")
        sink.table(f"judge/{key}", columns, [[r[c] for c in columns] for r in rows], int(run.summary.get("steps", 0)))
        sink.finish()


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)


def expand_runs(paths) -> list[Path]:
    """Run directories: each path that is one (it has summary.json), and every run directly inside a path that
    is not (a multirun's folder)."""
    out = []
    for path in map(Path, paths):
        if (path / "summary.json").is_file():
            out.append(path)
            continue
        inside = sorted(p for p in path.iterdir() if (p / "summary.json").is_file()) if path.is_dir() else []
        if not inside:
            raise ConfigError(f"runs: {path} is neither a finished run directory (no summary.json) nor a folder of runs")
        out += inside
    return out


def judge_runs(cfg) -> dict[str, dict]:
    """Judge every run of `cfg.runs`; returns {run directory: its winrates.json entry}."""
    if not cfg.runs:
        raise ConfigError("runs=[...] names no run directory to judge (or calibrate=FILE to check a judge)")
    runs = [JudgedRun(path) for path in expand_runs(cfg.runs)]
    temperatures = (list(cfg.temperatures) if cfg.temperatures is not None
                    else sorted({t for r in runs for t in r.temperatures()}) or [1.0])
    judge = build_judge(cfg, runs[0], task_kind(runs[0]))
    return {str(r.path): judge_run(cfg, r, judge, temperatures) for r in runs}


def judge_after_training(train_cfg) -> dict:
    """eval.judge=NAME: judge the run that just ended, as `python -m dpo_exp.judge runs=[RUN] judge=NAME
    *eval.judge_overrides` would."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = [f"judge={train_cfg.eval.judge}", f"runs=[{train_cfg.paths.output_dir}]",
                 f"cache_dir={train_cfg.paths.cache_dir}", *train_cfg.eval.judge_overrides]
    if GlobalHydra.instance().is_initialized():  # inside `python -m dpo_exp.train`
        cfg = compose("judging", overrides=overrides)
    else:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("judging", overrides=overrides)
    return judge_runs(cfg)


# ---- calibration against recorded verdicts -------------------------------------------------------------

RECORDED_COLUMNS = ("query", "postprocessed_response", "reference_responses", "preferred")


def recorded_verdicts(path: Path) -> list[dict]:
    """Rows of a judged comparison file (TL;DR's oai1b_judged.csv.gz layout) that carry a verdict: query, the
    model's summary (postprocessed_response), the reference summary, and which one the judge preferred
    (`ours` / `reference`)."""
    import csv
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    if not path.is_file():
        raise ConfigError(f"calibrate={path}: no such file")
    with opener(path, "rt", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in RECORDED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ConfigError(f"{path}: no column {', '.join(missing)} (has: {', '.join(reader.fieldnames or [])})")
        rows = []
        for number, row in enumerate(reader, 2):  # line 1 is the header
            verdict = (row["preferred"] or "").strip()
            if not verdict:
                continue
            if verdict not in ("ours", "reference"):
                raise ConfigError(f"{path}:{number}: field 'preferred' is {verdict!r}; expected ours, reference or empty")
            rows.append(row)
    return rows


def calibrate(cfg) -> dict:
    """Agreement of the configured judge with recorded verdicts (model summary vs reference summary), with a
    bootstrap 95% interval, the judge's and the record's win rate of the model summaries, and the position
    check; written to calibration.json in the judge's output folder."""
    path = Path(cfg.calibrate)
    rows = recorded_verdicts(path)[:cfg.max_prompts] if cfg.max_prompts else recorded_verdicts(path)
    judge = build_judge(cfg, None, "summary")
    rng = np.random.default_rng([cfg.seed, zlib.crc32(path.name.encode())])
    comparisons = [Comparison(r["query"], r["postprocessed_response"], r["reference_responses"], bool(first))
                   for r, first in zip(rows, rng.integers(0, 2, size=len(rows)))]
    started = time.perf_counter()
    verdicts = judge.judge(comparisons)
    require_usable(verdicts, f"calibrate={path}", cfg.judge.name)
    seconds = time.perf_counter() - started
    recorded = ["policy" if r["preferred"].strip() == "ours" else "baseline" for r in rows]
    check = sorted(rng.permutation(len(comparisons))[:round(cfg.position_check * len(comparisons))].tolist())
    swapped = judge.judge([comparisons[i].flipped() for i in check]) if check else []
    result = {"file": str(path), "judge": cfg.judge.name, "judge_model": judge_model(cfg),
              "prompt_template": getattr(judge, "template", {}).get("name"), "comparisons": len(rows),
              "agreement": agreement([v.winner for v in verdicts], recorded, cfg.bootstrap, cfg.seed),
              "judge_win_rate": win_rate([v.winner for v in verdicts], cfg.bootstrap, cfg.seed),
              "recorded_win_rate": win_rate(recorded, cfg.bootstrap, cfg.seed),
              "position_agreement": agreement([verdicts[i].winner for i in check], [v.winner for v in swapped],
                                              cfg.bootstrap, cfg.seed),
              "seconds": seconds, "tally": judge.tally()}
    out = output_dir() / "calibration.json"
    write_json(out, result)
    a = result["agreement"]
    console(f"{cfg.judge.name} ({result['judge_model']}) agrees with {len(rows)} recorded verdicts "
            f"{fmt(a['agreement'])} [{fmt(a['ci_low'])}, {fmt(a['ci_high'])}] (usable {a['usable']}); "
            f"model summaries win {fmt(result['judge_win_rate']['win_rate'])} by this judge, "
            f"{fmt(result['recorded_win_rate']['win_rate'])} by the record; {out}")
    return result


def output_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    folder = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path.cwd()
    folder.mkdir(parents=True, exist_ok=True)
    return folder
