"""Dataset formats: the DPO paper's datasets and users' own files, read the way the paper's
authors read them (eric-mitchell/direct-preference-optimization, `preference_datasets.py`),
with every row validated before anything is returned.

Public API
----------
``load(name, *, path=None, hub_name=None, split="train", hub_config=None, on_invalid="skip",
tokenizer=None, min_score_ratio=None, kind="pairs") -> LoadResult``
    ``name`` is one of ``hh``, ``shp``, ``tldr``, ``imdb``, ``ultrafeedback``, ``pairs``. A local
    ``path`` takes precedence over ``hub_name`` (``LAYOUTS[name].hub_name`` is the usual hub copy; nothing
    is downloaded unless a hub name is given). ``kind="pairs"`` gives preference pairs,
    ``kind="sft"`` gives SFT examples ``PreferencePair(prompt, chosen=target)`` (``rejected`` None).
``read_rows(path)`` and ``hub_rows(...)`` live in `dpo_exp.data.files`:
``read_rows(path) -> Iterator[(number, row)]``
    Rows of a local ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file, each optionally ``.gz``.
    ``number`` is the 1-based *line* of the row for JSONL and CSV (a CSV record can span lines;
    its first line is given, the header being line 1) and the 1-based *row* for JSON and parquet.
``hub_rows(hub_name, split, config=None, **load_kwargs) -> Iterator[(number, row)]``
    ``datasets.load_dataset(hub_name, config, split=split, **load_kwargs)``, rows numbered from 1.
``check_lengths(pairs, tokenizer, max_length, max_prompt_length, keep_prompt_end=True)``
    ``-> (kept_pairs, skipped_counts)``: drops pairs whose prompt, truncated as
    `dpo_exp.data.tokenize_pair` truncates it, leaves no room for a response token.
``LoadResult(pairs, skipped, source, rows)``; ``LoadResult.summary()`` is one line for logs.
``DataFileError(ValueError)``: a file that does not parse, a chat row without a chat template (or with one
    that cannot give training tokens), or an invalid row with ``on_invalid="error"``. The message names the
    file (or hub name and split), the line or row, and the field: ``train.jsonl: line 17: field 'chosen': empty
    text``.

Validation
----------
Every row is checked for missing keys, non-string or empty (whitespace-only) text and a chosen
response identical to the rejected one (compared without surrounding whitespace), plus the
dataset's own structure. ``on_invalid="skip"`` skips the row and counts it in
``LoadResult.skipped`` under one reason; ``on_invalid="error"`` raises at the first invalid row.
Reasons (``<field>`` is the column):

=========================  ===================================================================
``missing_key:<field>``    the column is absent (a null value counts as ``not_a_string``)
``not_a_string:<field>``   text expected, something else found
``empty:<field>``          empty or whitespace-only text (for hh: the response after the prompt)
``chosen_equals_rejected`` the two responses are the same text
``no_assistant_turn``      hh: ``chosen`` has no ``"\\n\\nAssistant:"``
``no_shared_prefix``       hh: ``rejected`` does not start with the prompt taken from ``chosen``;
                           chat rows: a response's messages do not start with the prompt's
``bad_messages:<field>``   chat rows: not a list of ``{role, content}`` messages, not exactly one
                           assistant message after the prompt, refused by the chat template, or
                           not tokenizable as it renders them (`dpo_exp.data.chat`)
``bad_value:<field>``      shp ``labels`` not 0/1 or a score not a positive number; tldr
                           ``preferred`` not ``reference``/``ours``
=========================  ===================================================================

Filters drop rows by design, not as defects: they are counted in ``skipped`` but never raise,
whatever ``on_invalid`` says: ``low_score_ratio`` (shp), ``no_preference`` (tldr rows without a
verdict, pairs only), ``duplicate_prompt`` (hh and shp SFT: one example per prompt, see below)
and, from ``check_lengths``, ``prompt_too_long``. Always ``rows == len(pairs) + sum(skipped)``.
If rows were read but not one is usable, and not because of a filter, ``load`` raises
``DataFileError`` with the reasons and the first row's columns (most likely the wrong ``name`` for
the file), whatever ``on_invalid`` says.

Formats
-------
``hh`` (Anthropic/hh-rlhf): ``chosen`` and ``rejected`` are whole transcripts with turns
    ``"\\n\\nHuman: …"`` / ``"\\n\\nAssistant: …"``. The prompt is ``chosen`` up to and including
    its last ``"\\n\\nAssistant:"`` (the authors' ``extract_anthropic_prompt``); ``rejected`` must
    start with the same prompt (the authors did not check). Responses are what follows, leading
    space kept (``" Sure, …"``). SFT: one example per prompt whose target is the chosen response of
    the *last* row with that prompt (the authors keep a dict keyed by prompt and overwrite it).
``shp`` (stanfordnlp/SHP): prompt ``"\\n\\nHuman: " + history + "\\n\\nAssistant:"`` and
    responses ``" " + human_ref_A`` / ``" " + human_ref_B``, exactly as the authors' ``get_shp``;
    ``labels == 1`` means A is preferred. With ``min_score_ratio`` (the authors used 2) a row with
    ``score_A``/``score_B`` is kept only if max/min ≥ the ratio; rows without scores are kept.
    SFT: one example per prompt, target the highest-scoring preferred response (the authors'
    ``sft_target``), or the first row's preferred response when there are no scores. Histories
    already written as ``HUMAN: …\\n\\nASSISTANT: …`` (HH repacked as SHP, as in steamshp) get HH's own
    turn markers back, so their prompts read exactly as the HH original: ``"\\n\\nHuman: …\\n\\nAssistant:"``.
``tldr``: (a) CarperAI/openai_summarize_comparisons, ``prompt`` / ``chosen`` / ``rejected``, whose
    responses begin ``"TL;DR: "`` and whose prompt does not end with it (CarperAI's own trlx code
    reads ``prompt + " TL;DR:"`` and ``chosen[7:]``): the marker is moved to the end of the prompt,
    on a new line, so the prompt ends ``"\\nTL;DR:"`` and the response keeps its space. SFT target:
    ``chosen``. (b) the OpenAI-format judged file (``query`` ending ``"TL;DR:"``,
    ``reference_responses``, ``postprocessed_response``, ``preferred`` ∈ {reference, ours, ""}):
    rows with a verdict give pairs, rows without are filtered (``no_preference``); every row gives
    an SFT example, query → reference summary. Both layouts: a summary that does not start with
    whitespace gets a leading space. The layout is told per row by the ``query`` column.
``imdb``: ``text`` (``label`` is not used). Only ``kind="sft"``: ``PreferencePair("", text)`` with
    ``"<br />"`` replaced by a space; the 2–8-token prompts are cut elsewhere.
``ultrafeedback`` / ``pairs``: ``prompt``, ``chosen``, ``rejected``, either plain strings, taken
    verbatim (no template, no separator added), or chat style: ``prompt`` a string (one user
    message) or a list of ``{role, content}`` messages, or absent (TRL's implicit prompt: the
    messages ``chosen`` and ``rejected`` share from the start); ``chosen``/``rejected`` a list of
    messages, either the whole conversation (HuggingFaceH4/ultrafeedback_binarized) or only the
    assistant turn, or a string. A response is the content of the one assistant message after the
    prompt's messages.
``sharegpt`` (LLaMA-Factory): ``conversations`` ({from, value} turns), ``chosen`` / ``rejected`` ({from: gpt,
    value} or text), optional ``system``; ``alpaca``: ``instruction``, optional ``input`` and ``system``,
    ``chosen`` / ``rejected`` texts (without a chat template: the ``### Instruction:`` text prompt).

Conversations (chat rows, ShareGPT, Alpaca with a template) need a tokenizer with a chat template (a chat
model's, or one set with ``model.chat_template``). Their pairs keep their token ids (`dpo_exp.data.chat`):
the prompt is ``apply_chat_template(messages, add_generation_prompt=True)`` (also as text, ``pair.prompt``),
tokenized as at inference, and each response is the template's own tokens after it in the whole
conversation, through its end of turn, so prompt + response is token for token
``apply_chat_template(messages + [answer], tokenize=True)``. Text responses are never given EOS here;
tokenization appends it (`dpo_exp.data`).
"""
from __future__ import annotations

import functools
import math
import os
from collections import Counter
import difflib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from dpo_exp.data.chat import RowRefused, TemplateUnusable, chat_tokens, end_of_turn_id
from dpo_exp.data.examples import PreferencePair, prompt_token_ids
from dpo_exp.data.files import json_type, line_numbered, hub_rows, read_rows
from dpo_exp.errors import ConfigError, DataFileError
from dpo_exp.registry import Registry

__all__ = ["DataFileError", "LAYOUTS", "Layout", "LoadResult", "load", "read_rows", "hub_rows", "check_lengths"]

ASSISTANT_TURN = "\n\nAssistant:"
SHP_HUMAN = "HUMAN: "
TLDR_MARKER = "TL;DR:"
ON_INVALID = ("skip", "error")
KINDS = ("pairs", "sft")
FILTERS = frozenset({"low_score_ratio", "no_preference"})  # rows dropped by design, never an error


@dataclass
class LoadResult:
    pairs: list[PreferencePair]
    skipped: dict[str, int]   # reason -> rows dropped for it
    source: str               # path, or hub name and split
    rows: int = 0             # rows read; rows == len(pairs) + sum(skipped.values())
    layout: str = ""          # the layout the rows were read as
    detected: bool = False    # the layout was detected from the first row (data.format=auto)

    def summary(self) -> str:
        dropped = ", ".join(f"{reason} {count}" for reason, count in sorted(self.skipped.items()))
        layout = f" [{self.layout} layout, detected from the first row]" if self.detected else ""
        return (f"{self.source}{layout}: {self.rows} rows -> {len(self.pairs)} kept"
                + (f"; skipped {sum(self.skipped.values())} ({dropped})" if self.skipped else ""))


# --------------------------------------------------------------------------------------------
# Row checks shared by the datasets


class InvalidRow(Exception):
    """A row the loader cannot use. `reason` is its key in LoadResult.skipped; a `filter` drops a
    row by design (no verdict, low score ratio) and never raises."""

    def __init__(self, reason: str, field: str, detail: str, filter: bool = False):
        super().__init__(detail)
        self.reason, self.field, self.detail, self.filter = reason, field, detail, filter


class _Fatal(Exception):
    """Something no row can fix (a chat row without a chat template): always a DataFileError."""


@dataclass
class RowOptions:
    kind: str
    tokenizer: Any = None
    min_score_ratio: float | None = None

    @functools.cached_property
    def end_ids(self) -> frozenset:
        """The tokens that end a response: EOS and the chat template's end of turn (read once per file)."""
        return frozenset(i for i in (self.tokenizer.eos_token_id, end_of_turn_id(self.tokenizer)) if i is not None)


def require_fields(row: dict, fields: Sequence[str]) -> None:
    for name in fields:
        if name not in row:
            raise InvalidRow(f"missing_key:{name}", name, "missing")


def text_field(row: dict, name: str) -> str:
    if name not in row:
        raise InvalidRow(f"missing_key:{name}", name, "missing")
    value = row[name]
    if not isinstance(value, str):
        raise InvalidRow(f"not_a_string:{name}", name, f"expected text, got {json_type(value)}")
    if not value.strip():
        raise InvalidRow(f"empty:{name}", name, "empty text")
    return value


def nonempty(text: str, name: str) -> str:
    """A response cut out of a longer text (hh, tldr, chat), checked like a field."""
    if not text.strip():
        raise InvalidRow(f"empty:{name}", name, "empty response")
    return text


def checked_pair(prompt: str, chosen: str, rejected: str, **ids) -> PreferencePair:
    """A preference pair; `ids`: a conversation's prompt_ids, chosen_ids and rejected_ids."""
    # Compared without surrounding whitespace: " Yes" vs " Yes\n" carries no preference either.
    if chosen.strip() == rejected.strip():
        raise InvalidRow("chosen_equals_rejected", "rejected", "identical to 'chosen'")
    return PreferencePair(prompt, chosen, rejected, **ids)


Converted = tuple[PreferencePair, "float | None"]  # the example, and a score for SFT selection


# --------------------------------------------------------------------------------------------
# Datasets


def _hh(row: dict, opts: RowOptions) -> Converted:
    require_fields(row, ("chosen",) if opts.kind == "sft" else ("chosen", "rejected"))
    chosen = text_field(row, "chosen")
    cut = chosen.rfind(ASSISTANT_TURN)
    if cut < 0:
        raise InvalidRow("no_assistant_turn", "chosen", "no '\\n\\nAssistant:' turn")
    prompt = chosen[:cut + len(ASSISTANT_TURN)]
    chosen_response = nonempty(chosen[len(prompt):], "chosen")
    if opts.kind == "sft":
        return PreferencePair(prompt, chosen_response), None
    rejected = text_field(row, "rejected")
    if not rejected.startswith(prompt):
        raise InvalidRow("no_shared_prefix", "rejected",
                       "does not start with the prompt of 'chosen' (its text up to the last '\\n\\nAssistant:')")
    rejected_response = nonempty(rejected[len(prompt):], "rejected")
    return checked_pair(prompt, chosen_response, rejected_response), None


def _label(row: dict) -> int:
    value = row["labels"]
    if isinstance(value, str):
        value = value.strip()
    if value not in (0, 1, "0", "1"):  # CSV gives "0"/"1", pandas may give 0.0/1.0
        raise InvalidRow("bad_value:labels", "labels", f"expected 0 or 1, got {value!r}")
    return int(value)


def _score(row: dict, name: str) -> float:
    value = row[name]
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise InvalidRow(f"bad_value:{name}", name, f"not a number: {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        # The ratio max/min needs positive scores (the authors' code divides by them).
        raise InvalidRow(f"bad_value:{name}", name, f"expected a positive number, got {value!r}")
    return float(value)


def _shp(row: dict, opts: RowOptions) -> Converted:
    require_fields(row, ("history", "human_ref_A", "human_ref_B", "labels"))
    history = text_field(row, "history")
    if history.startswith(SHP_HUMAN):  # HH repacked as SHP: restore HH's turn markers instead of nesting them
        history = (history[len(SHP_HUMAN):].replace("\n\nASSISTANT: ", "\n\nAssistant: ")
                   .replace("\n\nHUMAN: ", "\n\nHuman: "))
    a_preferred = _label(row) == 1
    winner, loser = ("human_ref_A", "human_ref_B") if a_preferred else ("human_ref_B", "human_ref_A")
    prompt = "\n\nHuman: " + history + ASSISTANT_TURN
    chosen = " " + text_field(row, winner)

    score = None
    has_scores = "score_A" in row or "score_B" in row
    if has_scores and (opts.min_score_ratio is not None or opts.kind == "sft"):
        require_fields(row, ("score_A", "score_B"))
        scores = {"score_A": _score(row, "score_A"), "score_B": _score(row, "score_B")}
        score = scores["score_A" if a_preferred else "score_B"]
        ratio = max(scores.values()) / min(scores.values())
        if opts.min_score_ratio is not None and ratio < opts.min_score_ratio:
            raise InvalidRow("low_score_ratio", "score_A", f"score ratio {ratio:.3g} < {opts.min_score_ratio}",
                           filter=True)
    if opts.kind == "sft":
        return PreferencePair(prompt, chosen), score
    return checked_pair(prompt, chosen, " " + text_field(row, loser)), None


def _summary_text(text: str) -> str:
    # The prompt ends "TL;DR:"; the summary must not be glued to it.
    return text if text[:1].isspace() else " " + text


def _tldr(row: dict, opts: RowOptions) -> Converted:
    if "query" in row:
        return _tldr_judged(row, opts)
    return _tldr_comparisons(row, opts)


def _tldr_judged(row: dict, opts: RowOptions) -> Converted:
    sft = opts.kind == "sft"
    require_fields(row, ("query", "reference_responses") if sft else
             ("query", "reference_responses", "postprocessed_response", "preferred"))
    query = text_field(row, "query")
    reference = _summary_text(text_field(row, "reference_responses"))
    if sft:
        return PreferencePair(query, reference), None
    ours = _summary_text(text_field(row, "postprocessed_response"))
    verdict = row["preferred"]
    if verdict is None:  # a missing verdict read back from parquet/JSON
        verdict = ""
    if not isinstance(verdict, str):
        raise InvalidRow("not_a_string:preferred", "preferred", f"expected text, got {json_type(verdict)}")
    verdict = verdict.strip()
    if not verdict:
        raise InvalidRow("no_preference", "preferred", "no verdict", filter=True)
    if verdict not in ("reference", "ours"):
        raise InvalidRow("bad_value:preferred", "preferred", f"expected 'reference', 'ours' or '', got {verdict!r}")
    chosen, rejected = (reference, ours) if verdict == "reference" else (ours, reference)
    return checked_pair(query, chosen, rejected), None


def _tldr_comparisons(row: dict, opts: RowOptions) -> Converted:
    names = ("chosen",) if opts.kind == "sft" else ("chosen", "rejected")
    require_fields(row, ("prompt",) + names)
    prompt = text_field(row, "prompt")
    responses = {name: text_field(row, name) for name in names}
    if not prompt.rstrip().endswith(TLDR_MARKER):
        # The hub layout puts "TL;DR:" at the start of each response; the model should be
        # prompted with it, as in the OpenAI format, so the response is the summary alone.
        moved = False
        for name, text in responses.items():
            if text.lstrip().startswith(TLDR_MARKER):
                responses[name] = text.lstrip()[len(TLDR_MARKER):]
                moved = True
        if moved:
            prompt = prompt + ("" if prompt.endswith("\n") else "\n") + TLDR_MARKER
    responses = {name: _summary_text(nonempty(text, name)) for name, text in responses.items()}
    if opts.kind == "sft":
        return PreferencePair(prompt, responses["chosen"]), None
    return checked_pair(prompt, responses["chosen"], responses["rejected"]), None


def _imdb(row: dict, opts: RowOptions) -> Converted:
    require_fields(row, ("text",))
    text = nonempty(text_field(row, "text").replace("<br />", " "), "text")
    return PreferencePair("", text), None


def _pairs(row: dict, opts: RowOptions) -> Converted:
    names = ("chosen",) if opts.kind == "sft" else ("chosen", "rejected")
    if any(isinstance(row.get(name), list) for name in ("prompt",) + names):
        return _chat_pair(row, opts, names)
    if "prompt" not in row and all(isinstance(row.get(n), str) for n in ("chosen", "rejected")):
        pair, _ = _implicit_text_pair(row)  # the prompt is what chosen and rejected share, for SFT too
        return (PreferencePair(pair.prompt, pair.chosen) if opts.kind == "sft" else pair), None
    require_fields(row, ("prompt",) + names)
    prompt = text_field(row, "prompt")
    responses = [text_field(row, name) for name in names]
    if opts.kind == "sft":
        return PreferencePair(prompt, responses[0]), None
    return checked_pair(prompt, *responses), None


def _implicit_text_pair(row: dict) -> Converted:
    """TRL's standard implicit-prompt rows: `chosen` and `rejected` are whole texts and their shared start is
    the prompt, cut at the last whitespace of the shared text so neither response starts mid-word (each keeps
    its leading space: "The sky is" / " blue." / " green."). Words both responses begin with become prompt."""
    chosen, rejected = text_field(row, "chosen"), text_field(row, "rejected")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    cut = max((i for i in range(shared) if chosen[i].isspace()), default=-1)
    if shared == len(chosen) == len(rejected):
        raise InvalidRow("chosen_equals_rejected", "rejected", "identical to 'chosen'")
    while cut > 0 and chosen[cut - 1].isspace():  # a run of whitespace goes with the responses
        cut -= 1
    if cut <= 0 or not chosen[:cut].strip():
        raise InvalidRow("missing_key:prompt", "prompt", "missing, and 'chosen' and 'rejected' share no leading text")
    return checked_pair(chosen[:cut], nonempty(chosen[cut:], "chosen"), nonempty(rejected[cut:], "rejected")), None


def _messages(row: dict, name: str) -> list[dict] | str:
    """A response or prompt as a list of {role, content} messages, or as plain text."""
    value = row[name]
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        raise InvalidRow(f"bad_messages:{name}", name, "expected text or a list of {role, content} messages "
                       "with string content")
    return value


def _turns(messages: list[dict]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in messages]


def _chat_response(value: list[dict] | str, prompt: list[dict], name: str) -> str:
    if isinstance(value, str):
        return nonempty(value, name)
    if _turns(value[:len(prompt)]) == _turns(prompt):
        value = value[len(prompt):]  # the whole conversation: keep what follows the prompt
    if not value:
        raise InvalidRow(f"empty:{name}", name, "no message after the prompt")
    if value[0]["role"] != "assistant":
        raise InvalidRow("no_shared_prefix", name, "its messages do not start with the prompt's")
    if len(value) != 1:
        raise InvalidRow(f"bad_messages:{name}", name,
                       f"expected one assistant message after the prompt, got {len(value)} messages")
    return nonempty(value[0]["content"], name)


def _chat_pair(row: dict, opts: RowOptions, names: Sequence[str]) -> Converted:
    _need_template(opts, "chat-style ({role, content} messages)")
    require_fields(row, names)
    responses = {name: _messages(row, name) for name in names}

    if row.get("prompt") is not None:
        prompt_value = _messages(row, "prompt")
        if isinstance(prompt_value, str):
            prompt = [{"role": "user", "content": text_field(row, "prompt")}]
        elif prompt_value:
            prompt = prompt_value
        else:
            raise InvalidRow("empty:prompt", "prompt", "no messages")
    else:
        # TRL's implicit prompt: the messages chosen and rejected share from the start.
        chosen = responses["chosen"]
        rejected = responses.get("rejected")
        if not isinstance(chosen, list):
            raise InvalidRow("missing_key:prompt", "prompt", "missing, and 'chosen' is plain text")
        if isinstance(rejected, list):
            # The last message of each is its response, even when the two are identical (which
            # the equality check then reports).
            shared = 0
            while (shared < min(len(chosen), len(rejected)) - 1
                   and _turns(chosen[shared:shared + 1]) == _turns(rejected[shared:shared + 1])):
                shared += 1
            prompt = chosen[:shared]
        else:
            prompt = chosen[:-1]
        if not prompt:
            raise InvalidRow("missing_key:prompt", "prompt", "missing, and 'chosen'/'rejected' share no "
                           "leading messages")

    texts = [_chat_response(responses[name], prompt, name) for name in names]
    return _conversation(prompt, texts, opts, "prompt"), None


def _need_template(opts: RowOptions, layout: str) -> None:
    from dpo_exp.models.templates import TEMPLATES  # the named templates a base model can be given

    tokenizer = opts.tokenizer
    if tokenizer is None:
        raise _Fatal(f"{layout} rows are conversations: rendering them needs a tokenizer with a chat template, and "
                     "a model built from a config trains its own on plain text; give one with model.tokenizer=<a "
                     f"folder or hub name> (and model.chat_template={' | '.join(TEMPLATES)} if it has no template)")
    if not getattr(tokenizer, "chat_template", None):
        raise _Fatal(f"{layout} rows are conversations: rendering them needs a tokenizer with a chat template and "
                     f"this one has none; set one with model.chat_template={' | '.join(TEMPLATES)} (or a Jinja "
                     "file), or use a chat model (model=smollm2_135m, or model.tokenizer=<an instruct model>)")


def _conversation(messages: list[dict], texts: list[str], opts: RowOptions, field: str) -> PreferencePair:
    """The row as the model reads it at inference: its prompt through the chat template with the generation
    prompt, each response as the template writes the assistant's answer after it (`dpo_exp.data.chat`); the
    pair keeps those token ids with its texts. `texts`: chosen (and rejected); `field`: the prompt's column."""
    try:
        tokens = chat_tokens(opts.tokenizer, messages, texts, opts.end_ids)
    except RowRefused as err:
        raise InvalidRow(f"bad_messages:{field}", field, str(err)) from None
    except TemplateUnusable as err:
        raise _Fatal(str(err)) from None
    if opts.kind == "sft":
        return PreferencePair(tokens.prompt, texts[0], prompt_ids=tokens.prompt_ids, chosen_ids=tokens.answer_ids[0])
    return checked_pair(tokens.prompt, *texts, prompt_ids=tokens.prompt_ids, chosen_ids=tokens.answer_ids[0],
                 rejected_ids=tokens.answer_ids[1])


# ShareGPT / LLaMA-Factory roles ("from") as chat-template roles
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "observation": "tool", "function": "tool", "tool": "tool",
                  "function_call": "assistant"}


def _system_message(row: dict) -> list[dict]:
    """The optional `system` text of a ShareGPT or Alpaca row as a leading system message (none if absent/empty)."""
    system = row.get("system")
    if system is None:
        return []
    if not isinstance(system, str):
        raise InvalidRow("not_a_string:system", "system", f"expected text, got {json_type(system)}")
    return [{"role": "system", "content": system}] if system.strip() else []


def _sharegpt_turn(turn: Any, field: str) -> dict:
    if not (isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
        raise InvalidRow(f"bad_messages:{field}", field, "expected {from, value} turns with string values")
    role = SHAREGPT_ROLES.get(turn["from"].strip().lower())
    if role is None:
        raise InvalidRow(f"bad_messages:{field}", field, f"unknown role from={turn['from']!r}; known: "
                       + ", ".join(SHAREGPT_ROLES))
    return {"role": role, "content": turn["value"]}


def _sharegpt(row: dict, opts: RowOptions) -> Converted:
    """LLaMA-Factory / ShareGPT preference rows: `conversations` (the prompt's {from, value} turns), `chosen`
    and `rejected` ({from: gpt, value} objects, or plain text), an optional `system` text."""
    names = ("chosen",) if opts.kind == "sft" else ("chosen", "rejected")
    _need_template(opts, "ShareGPT")
    require_fields(row, ("conversations",) + names)
    turns = row["conversations"]
    if not isinstance(turns, list) or not turns:
        raise InvalidRow("bad_messages:conversations", "conversations", "expected a non-empty list of {from, value} turns")
    messages = _system_message(row) + [_sharegpt_turn(turn, "conversations") for turn in turns]
    if messages[-1]["role"] == "assistant":
        raise InvalidRow("bad_messages:conversations", "conversations",
                       "ends with an assistant turn; the prompt's last turn is the user's (chosen/rejected answer it)")
    texts = []
    for name in names:
        value = row[name]
        if isinstance(value, dict):
            turn = _sharegpt_turn(value, name)
            if turn["role"] != "assistant":
                raise InvalidRow(f"bad_messages:{name}", name, f"from={value['from']!r}; a response is the assistant's (gpt)")
            value = turn["content"]
        elif not isinstance(value, str):
            raise InvalidRow(f"bad_messages:{name}", name, f"expected a {{from, value}} object or text, got {json_type(value)}")
        texts.append(nonempty(value, name))
    return _conversation(messages, texts, opts, "conversations"), None


ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


def _alpaca(row: dict, opts: RowOptions) -> Converted:
    """Alpaca-style preference rows: `instruction`, optional `input` and `system`, `chosen` and `rejected` texts.
    With a chat template the prompt is one user message (instruction, a blank line, input) after the system
    text; without one, the Alpaca text template (ALPACA_PROMPT)."""
    names = ("chosen",) if opts.kind == "sft" else ("chosen", "rejected")
    require_fields(row, ("instruction",) + names)
    instruction = text_field(row, "instruction")
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise InvalidRow("not_a_string:input", "input", f"expected text, got {json_type(extra)}")
    extra = (extra or "").strip()
    texts = [text_field(row, name) for name in names]
    if opts.tokenizer is not None and getattr(opts.tokenizer, "chat_template", None):
        messages = _system_message(row) + [{"role": "user", "content": instruction + (f"\n\n{extra}" if extra else "")}]
        return _conversation(messages, texts, opts, "instruction"), None
    prompt = (ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=extra) if extra
              else ALPACA_PROMPT.format(instruction=instruction))
    if opts.kind == "sft":
        return PreferencePair(prompt, texts[0]), None
    return checked_pair(prompt, *texts), None


def _is_sharegpt(keys: set) -> bool:
    return "conversations" in keys and "chosen" in keys


def _is_alpaca(keys: set) -> bool:
    return "instruction" in keys and "chosen" in keys


def _is_shp(keys: set) -> bool:
    return {"history", "human_ref_A", "human_ref_B", "labels"} <= keys


def _is_tldr(keys: set) -> bool:
    return {"query", "reference_responses"} <= keys


def _has_responses(row: dict) -> bool:
    return {"chosen", "rejected"} <= set(row) and not set(row) & {"conversations", "instruction"}


def _is_transcript(row: dict) -> bool:
    chosen = row.get("chosen")
    return "prompt" not in row and isinstance(chosen, str) and "\n\nHuman:" in chosen and ASSISTANT_TURN in chosen


@dataclass(frozen=True)
class Layout:
    """A file layout: how a row becomes an example, and what it reads."""
    convert: Callable[[dict, RowOptions], Converted]  # a row -> (example, score for SFT selection), or InvalidRow
    reads: str                    # the columns a row holds, for messages
    fields: tuple[str, ...]       # every column it may read (data.columns.<field>=<column> renames them)
    hub_name: str | None = None   # where the dataset usually comes from (load() never downloads unless asked)
    conversational: bool = False  # rows may be conversations rendered by a chat template (cache keys hold it)
    matches: Callable[[dict], bool] | None = None  # data.format=auto: the first row is this layout's
    one_per_prompt: bool = False  # SFT: one example per prompt, as the DPO authors read hh and shp
    judge_prompt: str = "dialogue"  # the judging prompt judge_prompt=auto picks for its samples (conf/judge_prompt/)


# data.format=NAME (or data.name's own) selects one; data.format=auto detects it from the first row.
LAYOUTS: Registry[Layout] = Registry("data layout", "data.format")
_PAIR_FIELDS = ("prompt", "chosen", "rejected")
LAYOUTS.add("hh", Layout(_hh, "chosen, rejected (whole '\\n\\nHuman: ... \\n\\nAssistant: ...' transcripts)",
                         ("chosen", "rejected"), "Anthropic/hh-rlhf",
                         matches=lambda row: _has_responses(row) and _is_transcript(row), one_per_prompt=True))
LAYOUTS.add("shp", Layout(_shp, "history, human_ref_A, human_ref_B, labels (optional score_A, score_B)",
                          ("history", "human_ref_A", "human_ref_B", "labels", "score_A", "score_B"), "stanfordnlp/SHP",
                          matches=lambda row: _is_shp(set(row)), one_per_prompt=True))
LAYOUTS.add("tldr", Layout(_tldr, "query, reference_responses (and postprocessed_response, preferred); or prompt, "
                           "chosen, rejected", _PAIR_FIELDS + ("query", "reference_responses", "postprocessed_response",
                                                               "preferred"),
                           "CarperAI/openai_summarize_comparisons", matches=lambda row: _is_tldr(set(row)),
                           judge_prompt="summary"))
LAYOUTS.add("imdb", Layout(_imdb, "text", ("text",), "stanfordnlp/imdb"))
LAYOUTS.add("ultrafeedback", Layout(_pairs, "prompt, chosen, rejected (as pairs)", _PAIR_FIELDS,
                                    "trl-lib/ultrafeedback_binarized", conversational=True))
LAYOUTS.add("pairs", Layout(_pairs, "prompt, chosen, rejected (texts or {role, content} messages; no prompt: TRL's "
                            "implicit prompt)", _PAIR_FIELDS, conversational=True,
                            matches=lambda row: _has_responses(row) and not _is_transcript(row)))
LAYOUTS.add("sharegpt", Layout(_sharegpt, "conversations ({from, value} turns), chosen, rejected ({from, value}), "
                               "optional system", ("conversations", "chosen", "rejected", "system"), conversational=True,
                               matches=lambda row: _is_sharegpt(set(row))))
LAYOUTS.add("alpaca", Layout(_alpaca, "instruction, optional input and system, chosen, rejected",
                             ("instruction", "input", "system", "chosen", "rejected"), conversational=True,
                             matches=lambda row: _is_alpaca(set(row))))

# The order data.format=auto tries layouts in, and lists several matches in.
_DETECTION_ORDER = ("sharegpt", "alpaca", "shp", "tldr", "hh", "pairs")


def layout_names() -> tuple[str, ...]:
    return tuple(LAYOUTS)


def fields() -> frozenset:
    """Every field some registered layout reads: the keys data.columns accepts."""
    return frozenset(f for _, layout in LAYOUTS.items() for f in layout.fields)


def conversational(name: str) -> bool:
    """Whether a file read as `name` (a layout or auto) may hold conversations rendered by a chat template."""
    return name == "auto" or (name in LAYOUTS and LAYOUTS[name].conversational)


def _described() -> str:
    return "; ".join(f"{name}: {layout.reads}" for name, layout in LAYOUTS.items())


def detect(row: dict) -> list[str]:
    """The layouts whose columns the row has (data.format=auto reads the first row)."""
    order = [n for n in _DETECTION_ORDER if n in LAYOUTS] + [n for n in LAYOUTS if n not in _DETECTION_ORDER]
    return [name for name in order if LAYOUTS[name].matches is not None and LAYOUTS[name].matches(row)]


def validate_data(cfg: Any) -> None:
    """data.format names a registered layout (or auto); data.columns names fields a layout reads."""
    data = cfg.data
    if data.format is not None and data.format != "auto" and data.format not in LAYOUTS:
        raise ConfigError(f"data.format={data.format} is not a layout; one of auto, " + ", ".join(LAYOUTS)
                          + " (" + _described() + ")")
    known = fields()
    for field, column in (data.columns or {}).items():
        if field not in known:
            close = difflib.get_close_matches(str(field), known, n=1)
            hint = f" (did you mean data.columns.{close[0]}?)" if close else ""
            raise ConfigError(f"data.columns.{field}={column}: {field} is not a field any layout reads{hint}; "
                              "fields: " + ", ".join(sorted(known)))


def _columns_hint(columns: dict[str, str], field: str) -> str:
    """A field as the file names it: 'question' (data.columns.prompt) under a mapping."""
    return f"'{columns[field]}' (data.columns.{field})" if field in columns else f"'{field}'"


def _renamed(row: dict, columns: dict[str, str]) -> dict:
    """The row with the file's columns under the names the layouts read (columns: layout field -> file column)."""
    if not columns:
        return row
    out = dict(row)
    for field, column in columns.items():
        if column in out:
            out[field] = out.pop(column)
    return out


def _one_per_prompt(name: str, examples: list[Converted]) -> list[PreferencePair]:
    """The authors' SFT data for hh and shp: one example per prompt (they key by prompt)."""
    best: dict[str, Converted] = {}
    for pair, score in examples:
        held = best.get(pair.prompt)
        if held is None or name == "hh":  # hh: the last row's chosen overwrites, as in get_hh
            best[pair.prompt] = (pair, score)
        elif score is not None and held[1] is not None and score > held[1]:
            best[pair.prompt] = (pair, score)  # shp: the highest-scoring response
    return [pair for pair, _ in best.values()]


# --------------------------------------------------------------------------------------------
# The entry point


def load(name: str, *, path: str | os.PathLike | None = None, hub_name: str | None = None,
         split: str = "train", hub_config: str | None = None, on_invalid: str = "skip",
         tokenizer=None, min_score_ratio: float | None = None, kind: str = "pairs",
         columns: dict[str, str] | None = None) -> LoadResult:
    """Read dataset `name` (a registered layout, or "auto": the layout the first row's columns fit) from a local
    `path` (preferred) or the hub, validating every row. `columns` maps the fields a layout reads to the file's
    own column names ({"prompt": "question", "chosen": "response_j", "rejected": "response_k"})."""
    columns = dict(columns or {})
    unknown = sorted(set(columns) - fields())
    if unknown:
        raise ValueError(f"data.columns: {', '.join(unknown)} is not a field any layout reads; fields: "
                         + ", ".join(sorted(fields())))
    if name not in LAYOUTS and name != "auto":
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(LAYOUTS)} or auto")
    if on_invalid not in ON_INVALID:
        raise ValueError(f"on_invalid must be 'skip' or 'error', got {on_invalid!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be 'pairs' or 'sft', got {kind!r}")
    if name == "imdb" and kind == "pairs":
        raise ValueError("imdb has no preference pairs (only reviews and labels): load it with "
                         "kind='sft'; pairs for the IMDb task are sampled and labelled elsewhere")
    if min_score_ratio is not None and name != "shp":
        raise ValueError(f"min_score_ratio filters SHP pairs by their upvote scores; {name} has none")

    if path is not None:
        source = str(path)
        rows = read_rows(source)
        where = "line" if line_numbered(source) else "row"
    elif hub_name is not None:
        source = f"{hub_name}{'/' + hub_config if hub_config else ''}[{split}]"
        rows = hub_rows(hub_name, split, hub_config)
        where = "row"
    else:
        hub_name = LAYOUTS[name].hub_name if name in LAYOUTS else None
        hint = f" (e.g. hub_name={hub_name!r})" if hub_name else ""
        raise ValueError(f"give path= (a local file) or hub_name={hint}")

    convert = LAYOUTS[name].convert if name in LAYOUTS else None
    detected = None
    opts = RowOptions(kind, tokenizer, min_score_ratio)
    examples: list[Converted] = []
    skipped: Counter[str] = Counter()
    count = 0
    first_columns: list[str] | None = None
    for number, row in rows:
        count += 1
        if first_columns is None:
            first_columns = list(row)
        row = _renamed(row, columns)
        if convert is None:  # auto: the first row decides the layout of the file
            detected = _detect_layout(row, first_columns, source, f"{where} {number}")
            name, convert = detected, LAYOUTS[detected].convert
        try:
            examples.append(convert(row, opts))
        except InvalidRow as bad:
            if on_invalid == "error" and not bad.filter:
                raise DataFileError(f"{source}: {where} {number}: field {_columns_hint(columns, bad.field)}: "
                                    f"{bad.detail}") from None
            skipped[bad.reason] += 1
        except _Fatal as fatal:
            raise DataFileError(f"{source}: {where} {number}: {fatal}") from None

    if not count:
        raise DataFileError(f"{source}: no rows (the file is empty)" if path is not None else f"{source}: no rows")
    if not examples and not FILTERS.intersection(skipped):
        # Not one usable row, and not because of a filter: the file is another dataset's format
        # (or name is wrong), which "skip" would otherwise turn into an empty dataset.
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items()))
        how = "detected from the first row" if detected else "named by data.format / data.name"
        raise DataFileError(f"{source}: none of its {count} rows is a valid '{name}' row ({reasons}); the first "
                            f"row has the columns {first_columns} (layout {how}). Layouts: "
                            + _described() + ". Rename columns with data.columns.<field>=<column> or pick data.format=")

    if kind == "sft" and LAYOUTS[name].one_per_prompt:
        pairs = _one_per_prompt(name, examples)
        if len(pairs) < len(examples):
            skipped["duplicate_prompt"] += len(examples) - len(pairs)
    else:
        pairs = [pair for pair, _ in examples]
    return LoadResult(pairs=pairs, skipped=dict(skipped), source=source, rows=count, layout=name,
                      detected=detected is not None)


def _detect_layout(row: dict, columns: list[str], source: str, where: str) -> str:
    found = detect(row)
    if len(found) == 1:
        return found[0]
    layouts = _described()
    if not found:
        raise DataFileError(f"{source}: {where}: its columns {columns} fit no known layout ({layouts}). Name the "
                            "file's columns with data.columns.<field>=<column> (e.g. data.columns.prompt=question "
                            "data.columns.chosen=response_j data.columns.rejected=response_k) or pick data.format=")
    raise DataFileError(f"{source}: {where}: its columns {columns} fit several layouts ({', '.join(found)}); "
                        f"pick one with data.format= ({layouts})")


def check_lengths(pairs: Sequence[PreferencePair], tokenizer, max_length: int, max_prompt_length: int,
                  keep_prompt_end: bool = True) -> tuple[list[PreferencePair], dict[str, int]]:
    """Drop pairs whose prompt, truncated to max_prompt_length as `dpo_exp.data.tokenize_pair`
    truncates it, leaves no room for a single response token within max_length ("prompt_too_long").

    Responses themselves are cut to fit at tokenization, so they never make a pair invalid. With
    max_prompt_length < max_length every pair fits and nothing is tokenized.
    """
    if max_prompt_length < max_length:
        return list(pairs), {}
    kept, dropped = [], 0
    for pair in pairs:
        ids = pair.prompt_ids if pair.prompt_ids is not None else prompt_token_ids(tokenizer, pair.prompt)
        prompt_len = min(len(ids), max_prompt_length)
        # keep_prompt_end only chooses which end survives; the length is the same.
        if max_length - prompt_len >= 1:
            kept.append(pair)
        else:
            dropped += 1
    return kept, ({"prompt_too_long": dropped} if dropped else {})
