"""Every data config that names a hub dataset loads that dataset's published layout.

No hub is reachable here, so each test writes a small folder laid out as the dataset's card and
file listing describe it (file and split names, columns and feature types) and loads it through
the call the hub path makes (`datasets.load_dataset(hub_name, hub_config, split=...)`), with the
folder in place of the repository id. What each layout holds, from the cards:

- Anthropic/hh-rlhf: `chosen` / `rejected` transcripts in `<subset>/train.jsonl.gz` and
  `<subset>/test.jsonl.gz` for harmless-base, helpful-base, helpful-online and
  helpful-rejection-sampled; `red-team-attempts/red_team_attempts.jsonl.gz` holds other columns and
  is not part of the default load.
- stanfordnlp/SHP: one folder per subreddit with `train.json`, `validation.json`, `test.json`
  (JSON Lines), columns post_id, domain, upvote_ratio, history, c_root_id_A/B, created_at_utc_A/B,
  score_A/B, human_ref_A/B, labels, seconds_difference, score_ratio.
- CarperAI/openai_summarize_comparisons: `prompt`, `chosen`, `rejected` strings in parquet shards
  `data/{train,test,valid1,valid2}-00000-of-00001-<hash>.parquet`; responses start "TL;DR: ".
- stanfordnlp/imdb: config `plain_text`, `text` and `label` (ClassLabel neg/pos) in
  `plain_text/{train,test,unsupervised}-00000-of-00001.parquet`, splits declared in the card's YAML.
- trl-lib/ultrafeedback_binarized: `chosen` / `rejected` lists of {content, role} messages (the user
  turn shared, TRL's implicit prompt), `score_chosen` / `score_rejected` float64, in
  `data/{train,test}-00000-of-00001.parquet`.
"""
import gzip
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import ROOT
from dpo_exp.components import register_configs
from dpo_exp.tasks import build_task

datasets = pytest.importorskip("datasets")
register_configs()


def compose_data(data: str, folder: Path, *overrides: str):
    task = "sentiment" if data == "imdb" else "preference"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"data={data}", f"task={task}", f"data.hub_name={folder}",
                                           "paths.output_dir=/tmp/dpo_exp_unused", *overrides])
    OmegaConf.resolve(cfg)
    assert cfg.data.path is None  # the hub path, not a local file
    return cfg


def assert_config_splits_exist(cfg, folder: Path):
    splits = datasets.load_dataset(str(folder), cfg.data.hub_config)
    assert cfg.data.train_split in splits and cfg.data.eval_split in splits, list(splits)


def write_jsonl_gz(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)


def hh_row(question: str, good: str, bad: str) -> dict:
    prompt = f"\n\nHuman: {question}\n\nAssistant:"
    return {"chosen": f"{prompt} {good}", "rejected": f"{prompt} {bad}"}


def test_hh_rlhf_layout(tmp_path):
    folder = tmp_path / "hh-rlhf"
    for subset in ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled"):
        for split, n in (("train", 3), ("test", 2)):
            write_jsonl_gz(folder / subset / f"{split}.jsonl.gz",
                           [hh_row(f"{subset} {split} question {i}?", "A careful answer.", "No.") for i in range(n)])
    write_jsonl_gz(folder / "red-team-attempts" / "red_team_attempts.jsonl.gz",
                   [{"transcript": "\n\nHuman: hi\n\nAssistant: hello", "min_harmlessness_score_transcript": 0.5,
                     "num_params": 52000000000, "model_type": "plain lm", "rating": 1.0,
                     "task_description": "x", "task_descripton_harmlessness_score": 0.1, "red_team_member_id": 3,
                     "is_upworker": False, "tags": None}])
    cfg = compose_data("hh", folder)
    assert_config_splits_exist(cfg, folder)
    task = build_task(cfg)
    train, evaluation, skipped = task.preference_pairs(Path("/unused"), None)
    assert len(train) == 12 and len(evaluation) == 8 and skipped == {}  # four subsets, no red-team rows
    pair = next(p for p in train if p.prompt.startswith("\n\nHuman: helpful-base train question 0?"))
    assert pair.prompt.endswith("\n\nAssistant:") and pair.chosen == " A careful answer." and pair.rejected == " No."
    assert {p.chosen for p in task.sft_examples(None)} == {" A careful answer."}


def shp_row(i: int, split: str, domain: str) -> dict:
    return {"post_id": f"p{i}{split}", "domain": f"{domain}_{split}", "upvote_ratio": 0.98,
            "history": f"In {domain}, is question {i} of {split} a good one?", "c_root_id_A": f"a{i}",
            "c_root_id_B": f"b{i}", "created_at_utc_A": 1600000000 + i, "created_at_utc_B": 1600000100 + i,
            "score_A": 30 + i, "score_B": 5 if i % 2 else 20 + i, "human_ref_A": f"Yes, because {i}.",
            "human_ref_B": "Who knows.", "labels": 1, "seconds_difference": 100.0,
            "score_ratio": (30 + i) / (5 if i % 2 else 20 + i)}


def test_shp_layout(tmp_path):
    folder = tmp_path / "SHP"
    for domain in ("askacademia", "askculinary"):
        for split in ("train", "validation", "test"):
            path = folder / domain / f"{split}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(shp_row(i, split, domain)) + "\n" for i in range(4)))
    cfg = compose_data("shp", folder)
    assert_config_splits_exist(cfg, folder)
    train, evaluation, skipped = build_task(cfg).preference_pairs(Path("/unused"), None)
    # score ratio >= 2 (the authors' filter, data.min_score_ratio) keeps rows 1 and 3 of each file
    assert len(train) == 4 and len(evaluation) == 4
    assert skipped == {"train/low_score_ratio": 4, "eval/low_score_ratio": 4}
    assert all(p.prompt.startswith("\n\nHuman: In ask") and p.prompt.endswith("\n\nAssistant:") for p in train)
    assert {p.chosen for p in train} == {" Yes, because 1.", " Yes, because 3."} and train[0].rejected == " Who knows."


def write_parquet(path: Path, rows: list[dict], features=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))


def test_tldr_comparisons_layout(tmp_path):
    folder = tmp_path / "openai_summarize_comparisons"
    post = "SUBREDDIT: r/relationships\nTITLE: {t}\nPOST: My friend and I argued about split {s}, row {i}."
    for split, n in (("train", 6), ("test", 3), ("valid1", 2), ("valid2", 2)):
        write_parquet(folder / "data" / f"{split}-00000-of-00001-5a1e3e0a9b2c4d6f.parquet",
                      [{"prompt": post.format(t="An argument", s=split, i=i),
                        "chosen": f"TL;DR: we argued about {split} {i} and made up",
                        "rejected": "TL;DR: friends"} for i in range(n)])
    cfg = compose_data("tldr", folder)
    assert_config_splits_exist(cfg, folder)
    assert set(datasets.load_dataset(str(folder))) == {"train", "test", "valid1", "valid2"}
    train, evaluation, skipped = build_task(cfg).preference_pairs(Path("/unused"), None)
    assert len(train) == 6 and len(evaluation) == 3 and skipped == {}
    assert train[0].prompt.endswith("row 0.\nTL;DR:") and train[0].chosen == " we argued about train 0 and made up"


def test_imdb_layout(tmp_path):
    folder = tmp_path / "imdb"
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    for split, label in (("train", 1), ("test", 0), ("unsupervised", -1)):
        write_parquet(folder / "plain_text" / f"{split}-00000-of-00001.parquet",
                      [{"text": f"A {split} review number {i}.<br />It was fine.", "label": label} for i in range(5)],
                      features)
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: plain_text\n  data_files:\n  - split: train\n    path: plain_text/train-*\n"
        "  - split: test\n    path: plain_text/test-*\n  - split: unsupervised\n    path: plain_text/unsupervised-*\n"
        "  default: true\ndataset_info:\n  config_name: plain_text\n  features:\n  - name: text\n    dtype: string\n"
        "  - name: label\n    dtype:\n      class_label:\n        names:\n          '0': neg\n          '1': pos\n---\n")
    cfg = compose_data("imdb", folder, "data.num_train_texts=4", "data.num_eval_texts=3")
    assert_config_splits_exist(cfg, folder)
    task = build_task(cfg)
    # the reviews of each split, "<br />" read as a space (shuffled: the hub's files are sorted by label)
    assert set(task.train_texts) < {f"A train review number {i}. It was fine." for i in range(5)}
    assert set(task.eval_texts) < {f"A test review number {i}. It was fine." for i in range(5)}
    assert (len(task.train_texts), len(task.eval_texts)) == (4, 3)


def test_ultrafeedback_binarized_layout(tmp_path, chat_tokenizer):
    folder = tmp_path / "ultrafeedback_binarized"

    def row(i: int, split: str) -> dict:
        user = {"content": f"hi {split} {i}", "role": "user"}
        return {"chosen": [user, {"content": "there there", "role": "assistant"}],
                "rejected": [user, {"content": "there", "role": "assistant"}],
                "score_chosen": 8.0, "score_rejected": 3.5}

    for split, n in (("train", 5), ("test", 3)):
        write_parquet(folder / "data" / f"{split}-00000-of-00001.parquet", [row(i, split) for i in range(n)])
    cfg = compose_data("ultrafeedback", folder)
    assert_config_splits_exist(cfg, folder)
    train, evaluation, skipped = build_task(cfg).preference_pairs(Path("/unused"), chat_tokenizer)
    assert len(train) == 5 and len(evaluation) == 3 and skipped == {}
    assert train[0].prompt == "<|user|>\nhi train 0\n<|assistant|>\n"  # the shared user turn, rendered
    assert (train[0].chosen, train[0].rejected) == ("there there", "there")
