"""Win-rate judging: the statistics on known counts; the order of each comparison mapped back; the endpoint
judge against a scripted local chat-completions server (429, 500, a timeout, an unusable answer, the cache,
the cost tally, the key written nowhere); the local chat-model judge reading token probabilities; the
reward-model and gold judges on real runs; the temperature plot."""
from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import torch
from pathlib import Path

from conftest import ROOT, compose_judging, read_jsonl

from dpo_exp.judging.api import APIJudge, parse_choice
from dpo_exp.judging.judges import Comparison, GoldJudge, HFJudge, Judge, render
from dpo_exp.judging.stats import agreement, win_rate

SECRET = "sk-test-SECRET-4242"
TEMPLATE = {"name": "test", "system": "", "user": "Q: {prompt}\nA1: {first}\nA2: {second}"}


# ---- statistics -------------------------------------------------------------------------------------------

def test_win_rate_counts_ties_half_leaves_unusable_answers_out_and_reports_them():
    stats = win_rate(["policy"] * 6 + ["baseline"] * 2 + ["tie"] * 2 + ["invalid"], resamples=500)
    assert (stats["wins"], stats["losses"], stats["ties"], stats["invalid"], stats["judged"]) == (6, 2, 2, 1, 10)
    assert stats["win_rate"] == pytest.approx(0.7)
    assert stats["ci_low"] < 0.7 < stats["ci_high"]


def test_the_bootstrap_interval_matches_the_binomial_one_on_many_comparisons():
    stats = win_rate(["policy"] * 600 + ["baseline"] * 400, resamples=4000, seed=1)
    half_width = 1.96 * (0.6 * 0.4 / 1000) ** 0.5  # 0.0304
    assert stats["ci_low"] == pytest.approx(0.6 - half_width, abs=0.006)
    assert stats["ci_high"] == pytest.approx(0.6 + half_width, abs=0.006)
    assert agreement(["policy", "tie", "invalid"], ["policy", "baseline", "policy"])["agreement"] == 0.5


class AlwaysFirst(Judge):
    def choose(self, comparisons):
        return [("first", "1") for _ in comparisons]


def test_a_judge_that_always_picks_the_first_response_wins_exactly_where_the_policy_was_shown_first():
    comparisons = [Comparison("p", "a", "b", policy_first=i % 3 == 0) for i in range(30)]
    winners = [v.winner for v in AlwaysFirst().judge(comparisons)]
    assert winners == ["policy" if c.policy_first else "baseline" for c in comparisons]
    assert render(TEMPLATE, comparisons[1])[-1]["content"] == "Q: p\nA1: b\nA2: a"  # shown baseline first


def test_scoring_judges_map_scores_back_whatever_the_order():
    judge = GoldJudge(lambda prompts, texts: [float(len(t)) for t in texts])  # longer wins
    comparisons = [Comparison("p", "long answer", "short", first) for first in (True, False)]
    assert [v.winner for v in judge.judge(comparisons)] == ["policy", "policy"]
    with pytest.raises(ValueError, match="gold reward"):
        GoldJudge(None)


@pytest.mark.parametrize("text, choice", [("1", "first"), (" 2.", "second"), ("Response 2", "second"),
                                          ("It's a tie", "tie"), ("I cannot decide", "invalid"), ("10", "invalid"), ("1.5", "invalid")])
def test_endpoint_answers_are_read_as_a_response_number(text, choice):
    assert parse_choice(text) == choice


# ---- the endpoint judge against a scripted server -----------------------------------------------------------

class ScriptedServer:
    """A chat-completions endpoint on the loopback address. It answers the number of the shown response that
    contains GOOD; prompts named 'rate-limited', 'server-error' and 'slow' first get a 429, a 500 or no answer
    within the client's timeout; 'garbage' gets an answer naming no response."""

    def __init__(self):
        self.requests: list[dict] = []
        self.auth: set[str] = set()
        self.failed_once: set[str] = set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                server.auth.add(self.headers.get("Authorization", ""))
                text = body["messages"][-1]["content"]
                shown = re.search(r"Q: (.*?)\s+A1: (.*?)\s+A2: ", text, re.S)  # the test template
                prompt, first = shown.groups() if shown else ("", "")
                if prompt in ("rate-limited", "server-error", "slow") and prompt not in server.failed_once:
                    server.failed_once.add(prompt)
                    if prompt == "slow":
                        time.sleep(1.5)
                    else:
                        self.send_response(429 if prompt == "rate-limited" else 500)
                        self.send_header("Retry-After", "0")
                        self.end_headers()
                        return
                answer = "I cannot decide" if prompt == "garbage" else ("1" if "GOOD" in first else "2")
                out = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}],
                                  "usage": {"prompt_tokens": 20, "completion_tokens": 1}}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(out)))
                    self.end_headers()
                    self.wfile.write(out)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up on 'slow' already
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def server():
    s = ScriptedServer()
    yield s
    s.close()


def api_cfg(url: str, **overrides) -> SimpleNamespace:
    values = dict(base_url=url, model="judge-test", api_key_env="DPO_EXP_TEST_JUDGE_KEY", max_concurrency=4,
                  max_retries=3, backoff_s=0.01, backoff_max_s=0.05, timeout_s=0.5, temperature=0.0, max_tokens=8,
                  price_per_million_input=1.0, price_per_million_output=2.0)
    return SimpleNamespace(**{**values, **overrides})


def test_the_endpoint_judge_retries_maps_orders_back_caches_and_tallies(server, tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_EXP_TEST_JUDGE_KEY", SECRET)
    prompts = ["rate-limited", "server-error", "slow", "garbage"] + [f"plain {i}" for i in range(8)]
    comparisons = [Comparison(p, "a GOOD answer", "a weak answer", policy_first=i % 2 == 0)
                   for i, p in enumerate(prompts)]
    judge = APIJudge(api_cfg(server.url), TEMPLATE, tmp_path / "cache.sqlite")
    verdicts = judge.judge(comparisons)
    assert [v.winner for v in verdicts] == ["policy"] * 3 + ["invalid"] + ["policy"] * 8  # both orders, mapped back
    assert verdicts[3].raw == "I cannot decide"  # the raw answer is kept
    tally = judge.tally()
    assert (tally["requests"], tally["retries"], tally["failed"], tally["cached"]) == (15, 3, 0, 0)
    assert tally["prompt_tokens"] == 20 * 12 and tally["cost"] == pytest.approx((20 * 12 * 1.0 + 12 * 2.0) / 1e6)
    assert server.auth == {f"Bearer {SECRET}"}

    again = APIJudge(api_cfg(server.url), TEMPLATE, tmp_path / "cache.sqlite")
    assert [v.winner for v in again.judge(comparisons)] == [v.winner for v in verdicts]
    assert len(server.requests) == 15 and again.tally()["cached"] == 12  # a second run sends no request
    swapped = again.judge([c.flipped() for c in comparisons[4:6]])  # the other order is another comparison
    assert [v.winner for v in swapped] == ["policy", "policy"] and len(server.requests) == 17


def test_an_endpoint_that_keeps_failing_gives_unusable_verdicts_not_cached(server, tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_EXP_TEST_JUDGE_KEY", SECRET)
    judge = APIJudge(api_cfg(server.url, max_retries=0), TEMPLATE, tmp_path / "cache.sqlite")
    verdict, = judge.judge([Comparison("rate-limited", "GOOD", "x", True)])
    assert verdict.winner == "invalid" and "HTTP 429" in verdict.raw and judge.tally()["failed"] == 1
    retried, = APIJudge(api_cfg(server.url), TEMPLATE, tmp_path / "cache.sqlite").judge(
        [Comparison("rate-limited", "GOOD", "x", True)])
    assert retried.winner == "policy"  # the failure was not cached


def test_a_missing_key_is_a_clear_error(tmp_path, monkeypatch):
    from dpo_exp.errors import ConfigError

    monkeypatch.delenv("DPO_EXP_TEST_JUDGE_KEY", raising=False)
    with pytest.raises(ConfigError, match="DPO_EXP_TEST_JUDGE_KEY, which is not set"):
        APIJudge(api_cfg("http://127.0.0.1:9/v1"), TEMPLATE, tmp_path / "c.sqlite")


# ---- the local chat-model judge -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_chat_judge(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>", "1", "2", "Q:", "A1:", "A2:",
             "good", "bad", "movie", "very"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         pad_token_id=1, eos_token_id=2))
    folder = tmp_path_factory.mktemp("chat_judge")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_the_chat_model_judge_reads_the_two_answer_tokens_probabilities_batched_or_not(tiny_chat_judge):
    judge = HFJudge(str(tiny_chat_judge), TEMPLATE, torch.device("cpu"), batch_size=3)
    comparisons = [Comparison("movie", "very good", "bad", True), Comparison("movie very very", "good", "bad", False),
                   Comparison("movie", "bad bad bad bad", "good", True)]
    batched = judge.choose(comparisons)
    for c, (choice, raw) in zip(comparisons, batched):
        enc = judge.tokenizer(judge.text(c), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            probs = judge.model(**enc).logits[0, -1].softmax(-1)[judge.answer_ids].tolist()
        p1, p2 = (float(x.split("=")[1]) for x in raw.split())
        assert (p1, p2) == pytest.approx(probs, rel=1e-3)  # left-padded batches read the same probabilities
        assert choice == ("first" if probs[0] > probs[1] else "second")
    assert {v.winner for v in judge.judge(comparisons)} <= {"policy", "baseline"}


# ---- judging real runs ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def judged_runs(tmp_path_factory):
    """Two smoke runs that wrote samples at T = 0.5 and 1 (DPO and Preferred-FT), and a reward model, in one
    cache."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from dpo_exp import train as train_module
    from dpo_exp.components import register_configs

    register_configs()
    root = tmp_path_factory.mktemp("judged")
    runs = {}
    for name, loss in (("dpo", "dpo"), ("sft", "sft"), ("rm", "reward_model")):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=["debug=smoke", f"paths.cache_dir={root / 'cache'}", f"loss={loss}",
                                               f"paths.output_dir={root / name}", "eval.temperatures=[0.5,1.0]"])
        OmegaConf.resolve(cfg)
        train_module.run(cfg)
        runs[name] = root / name
    return runs


def test_a_run_judged_against_itself_ties_everywhere_and_results_land_beside_its_samples(judged_runs, tmp_path):
    from dpo_exp.judging.winrates import judge_runs

    run = judged_runs["dpo"]
    judge_runs(compose_judging(f"runs=[{run}]", f"baseline={run}", "judge=reward_model", f"cache_dir={tmp_path}"))
    entry = json.loads((run / "winrates.json").read_text())["reward_model/vs_dpo"]
    assert sorted(entry["temperatures"]) == ["0.5", "1"]
    for stats in entry["temperatures"].values():
        assert stats["ties"] == stats["judged"] == stats["comparisons"] > 0 and stats["win_rate"] == 0.5
    rows = read_jsonl(run / "judgements_reward_model_vs_dpo.jsonl")
    assert {r["winner"] for r in rows} == {"tie"} and {r["policy_first"] for r in rows} == {True, False}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["winrate/reward_model/vs_dpo/T=1"] == 0.5 and summary["steps"] == 4  # added, nothing lost


def test_step_0_judges_the_policy_before_training_and_is_kept_beside_the_last_step(judged_runs, tmp_path):
    from dpo_exp.judging.winrates import judge_runs

    run = judged_runs["dpo"]
    judge_runs(compose_judging(f"runs=[{run}]", "baseline=initial", "judge=reward_model", f"cache_dir={tmp_path}"))
    judge_runs(compose_judging(f"runs=[{run}]", "baseline=initial", "judge=reward_model", "step=0",
                               f"cache_dir={tmp_path}"))
    everything = json.loads((run / "winrates.json").read_text())
    before, after = everything["reward_model/vs_initial/step_0"], everything["reward_model/vs_initial"]
    assert before["step"] == 0 and after["step"] is None
    for t, stats in before["temperatures"].items():  # step-0 samples are the initial policy's: ties
        assert stats["ties"] == stats["judged"] > 0 and "at step 0" in stats["samples"]
        assert "at step 4" in after["temperatures"][t]["samples"]
    assert (run / "judgements_reward_model_vs_initial_step_0.jsonl").exists()
    assert "winrate/reward_model/vs_initial/step_0/T=1" in json.loads((run / "summary.json").read_text())


def test_the_reward_model_judge_scores_runs_head_to_head_and_is_order_blind(judged_runs, tmp_path):
    from dpo_exp.judging.winrates import judge_runs

    dpo, sft = judged_runs["dpo"], judged_runs["sft"]
    results = judge_runs(compose_judging(f"runs=[{dpo}]", f"baseline={sft}", "judge=reward_model",
                                     "position_check=1.0", f"cache_dir={tmp_path}"))
    entry = results[str(dpo)]
    for stats in entry["temperatures"].values():
        assert stats["wins"] + stats["losses"] + stats["ties"] == stats["judged"] > 0
        assert stats["position_agreement"]["agreement"] == 1.0  # a scoring judge never sees the order
        assert "sft: eval/samples/T=" in stats["baseline_samples"]
    assert json.loads((sft / "summary.json").read_text()).get("winrate/reward_model/vs_dpo/T=1") is None


def test_the_endpoint_judge_on_a_run_writes_the_key_nowhere(judged_runs, server, tmp_path, monkeypatch):
    from dpo_exp.judging.winrates import judge_runs

    monkeypatch.setenv("DPO_EXP_TEST_JUDGE_KEY", SECRET)
    run = judged_runs["sft"]
    cfg = compose_judging(f"runs=[{run}]", "judge=api", f"judge.base_url={server.url}",
                      "judge.api_key_env=DPO_EXP_TEST_JUDGE_KEY", f"cache_dir={tmp_path / 'cache'}",
                      "judge.backoff_s=0.01", "judge.timeout_s=5")
    entry = judge_runs(cfg)[str(run)]
    assert entry["prompt_template"] == "review" and entry["tally"]["requests"] > 0
    assert server.auth == {f"Bearer {SECRET}"}
    written = [p for folder in (run, tmp_path) for p in folder.rglob("*") if p.is_file()]
    assert written and not [p for p in written if SECRET.encode() in p.read_bytes()]


def refused_url() -> str:
    """An endpoint on this machine where nothing listens: every connection is refused."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def test_an_endpoint_that_refuses_every_connection_fails_the_judging_with_the_reason(judged_runs, tmp_path, capsys):
    """Not one usable verdict is a failure (exit 2, the request error on the console), not "win rate n/a"."""
    import runpy
    import sys
    import warnings

    run = judged_runs["sft"]
    before = (run / "winrates.json").read_text() if (run / "winrates.json").exists() else None
    argv, sys.argv = sys.argv, ["dpo_exp.judge", "judge=api", f"judge.base_url={refused_url()}",
                                "judge.api_key_env=null", "judge.max_retries=1", "judge.backoff_s=0.01",
                                f"runs=[{run}]", f"cache_dir={tmp_path / 'cache'}",
                                f"hydra.run.dir={tmp_path / 'judging'}"]
    try:
        with pytest.raises(SystemExit) as exit_, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="'dpo_exp.judge' found in sys.modules", category=RuntimeWarning)
            runpy.run_module("dpo_exp.judge", run_name="__main__", alter_sys=True)
    finally:
        sys.argv = argv
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err, err[-3000:]
    message = err.split("dpo_exp: error: ", 1)[1]
    assert message.startswith(f"{run} vs initial, T=") and "judge=api gave no usable verdict on any of the" in message
    assert "Connection refused after 2 attempts" in message  # the reason, as the HTTP client saw it
    after = (run / "winrates.json").read_text() if (run / "winrates.json").exists() else None
    assert after == before and not (tmp_path / "judging").exists()  # no win rate written, no judging folder left


def test_the_temperature_plot_draws_every_judged_run(judged_runs, tmp_path):
    import runpy
    import sys

    from dpo_exp.judging.winrates import judge_runs

    judge_runs(compose_judging(f"runs=[{judged_runs['dpo']},{judged_runs['sft']}]", "judge=reward_model",
                           f"cache_dir={tmp_path}"))
    out = tmp_path / "winrates.png"
    argv, sys.argv = sys.argv, ["winrate_plot.py", str(judged_runs["dpo"]), str(judged_runs["sft"]), "-o", str(out),
                                "--judge", "reward_model/vs_initial"]
    try:
        runpy.run_path(str(ROOT / "scripts" / "winrate_plot.py"), run_name="__main__")
    finally:
        sys.argv = argv
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_typo_in_the_judging_config_fails_at_composition():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_judging("judge.bse_url=http://x")


def write_recorded(path, rows) -> None:
    import csv
    import gzip

    with gzip.open(path, "wt", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["query", "postprocessed_response", "reference_responses", "preferred"])
        writer.writeheader()
        writer.writerows(rows)


def test_the_reference_baseline_of_tldr_is_the_human_summary_not_the_preferred_one(smoke_cfg, tmp_path):
    """In the judged TL;DR file the preferred summary is often the model's: the paper's baseline is the
    reference summary whichever one the record preferred."""
    from dpo_exp.tasks import build_task

    rows = [{"query": f"post {i} TL;DR:", "postprocessed_response": f" model summary {i}",
             "reference_responses": f" human summary {i}", "preferred": "ours" if i % 2 else "reference"}
            for i in range(8)]
    write_recorded(tmp_path / "judged.csv.gz", rows)
    cfg = smoke_cfg("task=preference", "data=tldr", f"data.path={tmp_path / 'judged.csv.gz'}", "data.eval_size=4")
    task = build_task(cfg)
    _, eval_pairs, _ = task.preference_pairs(Path("unused"), None)
    assert {p.chosen for p in eval_pairs} & {f" model summary {i}" for i in range(8)}  # a model summary was preferred
    references = task.reference_responses(None, eval_pairs)
    assert references == {p.prompt: " human summary " + p.prompt.split()[1] for p in eval_pairs}


def test_calibration_measures_agreement_with_recorded_verdicts(server, tmp_path, monkeypatch):
    from dpo_exp.judging.winrates import calibrate

    monkeypatch.setenv("DPO_EXP_TEST_JUDGE_KEY", SECRET)
    monkeypatch.chdir(tmp_path)
    rows = [{"query": f"post {i}", "postprocessed_response": "GOOD" if i % 4 else "meh",
             "reference_responses": "meh" if i % 4 else "GOOD", "preferred": "ours" if i < 10 else "reference"}
            for i in range(12)] + [{"query": "unjudged", "postprocessed_response": "a", "reference_responses": "b",
                                    "preferred": ""}]
    write_recorded(tmp_path / "judged.csv.gz", rows)
    test_prompt = ["judge_prompt.name=test", "judge_prompt.user='Q: {prompt} A1: {first} A2: {second}'"]
    result = calibrate(compose_judging("calibrate=judged.csv.gz", "judge=api", f"judge.base_url={server.url}",
                                   "judge.api_key_env=DPO_EXP_TEST_JUDGE_KEY", f"cache_dir={tmp_path}",
                                   "position_check=1.0", *test_prompt))
    # the server prefers the summary with GOOD (the model's on rows i % 4 != 0); the record prefers ours on rows < 10
    expected = sum((("ours" if i % 4 else "reference") == r["preferred"]) for i, r in enumerate(rows[:12])) / 12
    assert result["comparisons"] == 12 and result["agreement"]["agreement"] == pytest.approx(expected)
    assert result["recorded_win_rate"]["win_rate"] == pytest.approx(10 / 12)
    assert result["position_agreement"]["agreement"] == 1.0
    assert json.loads((tmp_path / "calibration.json").read_text())["agreement"] == result["agreement"]

    write_recorded(tmp_path / "bad.csv.gz", [{**rows[0], "preferred": "A"}])
    from dpo_exp.errors import ConfigError
    with pytest.raises(ConfigError, match=r"bad.csv.gz:2: field 'preferred' is 'A'"):
        calibrate(compose_judging("calibrate=bad.csv.gz", "judge=api", f"judge.base_url={server.url}",
                              "judge.api_key_env=DPO_EXP_TEST_JUDGE_KEY", *test_prompt))


def test_eval_judge_judges_the_run_when_it_ends(smoke_cfg):
    from dpo_exp import train as train_module

    cfg = smoke_cfg("eval.temperatures=[1.0]", "eval.judge=reward_model", "eval.judge_overrides=['position_check=0']")
    train_module.run(cfg)
    entry = json.loads((Path(cfg.paths.output_dir) / "winrates.json").read_text())["reward_model/vs_initial"]
    assert list(entry["temperatures"]) == ["1"] and entry["temperatures"]["1"]["judged"] == 8
    assert entry["temperatures"]["1"]["position_agreement"]["pairs"] == 0


def test_win_rates_reach_the_runs_own_wandb_run(smoke_cfg, monkeypatch):
    import glob

    from conftest import read_wandb_records
    from dpo_exp import train as train_module

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = smoke_cfg("logger=wandb", "logger.mode=offline", "eval.temperatures=[1.0]", "eval.judge=reward_model")
    train_module.run(cfg)
    run_dir = Path(cfg.paths.output_dir)
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    files = glob.glob(str(run_dir / "wandb" / "offline-run-*" / f"run-{run_id}.wandb"))
    assert len(files) == 2  # the training run, and the judge continuing the same run id
    records = [r for f in files for r in read_wandb_records(f)]
    summary = {item.key or "/".join(item.nested_key) for r in records if r.WhichOneof("record_type") == "summary"
               for item in r.summary.update}
    history = {item.key or "/".join(item.nested_key) for r in records if r.WhichOneof("record_type") == "history"
               for item in r.history.item}
    assert "winrate/reward_model/vs_initial/T=1" in summary
    assert any(k.startswith("judge/reward_model/vs_initial") for k in history)  # the judged comparisons


def test_the_plot_reads_the_same_win_rates_from_a_summary_as_a_wandb_group_would_give(judged_runs, tmp_path):
    import importlib.util

    from dpo_exp.judging.winrates import judge_runs

    run = judged_runs["sft"]
    judge_runs(compose_judging(f"runs=[{run}]", "judge=reward_model", f"cache_dir={tmp_path}"))
    spec = importlib.util.spec_from_file_location("winrate_plot", ROOT / "scripts" / "winrate_plot.py")
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    from_summary = plot.tables_of_summary(json.loads((run / "summary.json").read_text()))["reward_model/vs_initial"]
    from_file = json.loads((run / "winrates.json").read_text())["reward_model/vs_initial"]
    for t, stats in from_file["temperatures"].items():
        assert {k: stats[k] for k in ("win_rate", "ci_low", "ci_high", "judged")} == from_summary["temperatures"][t]
