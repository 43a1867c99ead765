"""A judge behind any OpenAI-compatible chat-completions endpoint (OpenAI, a vLLM or llama.cpp server).

- The key is read from the environment variable the config names (`judge.api_key_env`); only the name is
  ever in a config, log, W&B run or cache entry. It travels in the Authorization header and nowhere else.
- Requests run concurrently (`judge.max_concurrency`), with retries and exponential backoff on 429, 5xx,
  timeouts and dropped connections (a Retry-After header is honoured). A request that still fails is an
  `invalid` verdict, counted apart, and is not cached.
- A persistent cache (SQLite) keyed by the endpoint's model, the prompt template, the prompt, both
  responses and their shown order: judging the same comparison again sends no request.
- `tally()`: requests sent, answers from the cache, retries, failures, prompt and completion tokens and,
  with `judge.price_per_million_input/output`, the cost.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from dpo_exp.judging.config import JudgeConfig
from dpo_exp.judging.judges import JUDGES, Comparison, Judge, JudgeContext, render

RETRIED_STATUS = {429, 500, 502, 503, 504}


class JudgeCache:
    """Answers of an endpoint judge by comparison key, in one SQLite file shared by runs (thread-safe)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, timeout=60)
        self._db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, answer TEXT)")
        self._db.commit()
        self._lock = threading.Lock()

    def get(self, key: str) -> Optional[dict]:
        with self._lock:
            row = self._db.execute("SELECT answer FROM answers WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, answer: dict) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?)", (key, json.dumps(answer)))
            self._db.commit()


def parse_choice(text: str) -> str:
    """'first' / 'second' from an answer that names response 1 or 2 (the first such number wins), 'tie' for an
    answer that says so, else 'invalid'."""
    match = re.search(r"(?<![\d.])([12])(?!\d|\.\d)", text)  # "2", "2.", "Response 1"; not "10" or "1.5"
    if match:
        return "first" if match.group(1) == "1" else "second"
    if re.search(r"\b(tie|equal|both)\b", text, re.I):
        return "tie"
    return "invalid"


@dataclass
class APIJudgeConfig(JudgeConfig):
    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4o-mini"
    api_key_env: Optional[str] = "OPENAI_API_KEY"  # the NAME of the variable holding the key; never the key
    max_concurrency: int = 8
    max_retries: int = 6
    backoff_s: float = 1.0
    backoff_max_s: float = 60.0
    timeout_s: float = 60.0
    temperature: float = 0.0
    max_tokens: int = 8
    price_per_million_input: Optional[float] = None
    price_per_million_output: Optional[float] = None


class APIJudge(Judge):
    name = "api"

    def __init__(self, cfg, template: dict, cache_path: Path):
        self.cfg, self.template = cfg, template
        self.url = str(cfg.base_url).rstrip("/") + "/chat/completions"
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        if cfg.api_key_env and not key:
            from dpo_exp.errors import ConfigError

            raise ConfigError(f"judge=api reads its key from the environment variable {cfg.api_key_env}, which is "
                              "not set (judge.api_key_env=null for an endpoint without a key)")
        self._headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        self.cache = JudgeCache(cache_path)
        self._counts = {"requests": 0, "cached": 0, "retries": 0, "failed": 0, "prompt_tokens": 0,
                        "completion_tokens": 0}
        self._lock = threading.Lock()

    def _count(self, **add: int) -> None:
        with self._lock:
            for key, value in add.items():
                self._counts[key] += value

    def cache_key(self, messages: list[dict]) -> str:
        """Model, template, prompt and both responses in their shown order (all inside `messages`)."""
        blob = json.dumps({"model": self.cfg.model, "template": dict(self.template), "messages": messages,
                           "temperature": self.cfg.temperature, "max_tokens": self.cfg.max_tokens}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def choose(self, comparisons: Sequence[Comparison]) -> list[tuple[str, str]]:
        from dpo_exp.loggers import progress

        with ThreadPoolExecutor(max_workers=max(1, self.cfg.max_concurrency)) as pool, \
                progress(len(comparisons), "judging") as bar:
            out = []
            for answer in pool.map(self._one, comparisons):  # in order; the bar moves as answers arrive
                out.append(answer)
                bar.update(1)
            return out

    def _one(self, comparison: Comparison) -> tuple[str, str]:
        messages = render(self.template, comparison)
        key = self.cache_key(messages)
        answer = self.cache.get(key)
        if answer is not None:
            self._count(cached=1)
            return parse_choice(answer["text"]), answer["text"]
        try:
            answer = self._request(messages)
        except JudgeRequestError as err:
            self._count(failed=1)
            return "invalid", f"request failed: {err}"
        self.cache.put(key, answer)
        return parse_choice(answer["text"]), answer["text"]

    def _request(self, messages: list[dict]) -> dict:
        body = json.dumps({"model": self.cfg.model, "messages": messages, "temperature": self.cfg.temperature,
                           "max_tokens": self.cfg.max_tokens}).encode()
        last = ""
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                self._count(retries=1)
            self._count(requests=1)
            wait = min(self.cfg.backoff_max_s, self.cfg.backoff_s * 2 ** attempt)
            try:
                request = urllib.request.Request(self.url, data=body, headers=self._headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as response:
                    data = json.loads(response.read())
                usage = data.get("usage") or {}
                self._count(prompt_tokens=int(usage.get("prompt_tokens", 0)),
                            completion_tokens=int(usage.get("completion_tokens", 0)))
                return {"text": data["choices"][0]["message"]["content"] or "", "usage": usage}
            except urllib.error.HTTPError as err:
                if err.code not in RETRIED_STATUS:
                    raise JudgeRequestError(f"HTTP {err.code} from {self.url}: {err.read()[:300]!r}") from None
                last = f"HTTP {err.code}"
                retry_after = err.headers.get("Retry-After") if err.headers else None
                if retry_after and retry_after.replace(".", "", 1).isdigit():
                    wait = min(self.cfg.backoff_max_s, float(retry_after))
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                last = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
            except (KeyError, IndexError, ValueError) as err:
                raise JudgeRequestError(f"{self.url} answered something that is not a chat completion: {err}") from None
            if attempt < self.cfg.max_retries:
                time.sleep(wait)
        raise JudgeRequestError(f"{last} after {self.cfg.max_retries + 1} attempts")

    def tally(self) -> dict:
        out = dict(self._counts)
        prices = (self.cfg.price_per_million_input, self.cfg.price_per_million_output)
        if None not in prices:
            out["cost"] = (out["prompt_tokens"] * prices[0] + out["completion_tokens"] * prices[1]) / 1e6
        return out


class JudgeRequestError(RuntimeError):
    """A request the endpoint did not answer usefully (the message never holds the key)."""


@JUDGES.register("api", config=APIJudgeConfig)
def api_judge(cfg, context: JudgeContext) -> Judge:
    return APIJudge(cfg, context.template(), Path(context.cache_dir) / "judge" / "api.sqlite")
