"""A conversation's tokens as the model reads them at inference, through its chat template.

At inference a chat model reads `apply_chat_template(messages, add_generation_prompt=True, tokenize=True)`:
the template's text tokenized with nothing added (the template writes BOS itself where the model wants one),
and writes its answer up to the template's end of turn. Training on a row uses exactly those tokens:

- the prompt's ids: the prompt's messages rendered with the generation prompt, tokenized with nothing added;
- an answer's ids: the whole conversation (the prompt's messages and the assistant's answer) rendered and
  tokenized the same way; the prompt's ids must be its first tokens, and the rest are the answer's, whatever
  the template writes after the answer (Llama 3's `<|eot_id|>`, Qwen's `<|im_end|>` and a newline, Phi-3's
  `<|end|>` and EOS). No EOS is appended. Where tokenization merges across the prompt's end (the whole
  conversation's tokens do not start with the prompt's), the answer's tokens are those that start at or after
  the prompt's last character; a token that covers both is an error.

`chat_tokens` raises `RowRefused` for what one row does (roles the template refuses, a template that renders
the prompt differently once the answer follows it) and `TemplateUnusable` for what no row can fix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Optional, Sequence

# The answer the end-of-turn probe renders: no whitespace (templates trim answers), no markup.
_PROBE_ANSWER = "dpo_exp_probe_answer"


class RowRefused(ValueError):
    """This row's conversation cannot be tokenized as the template renders it (a per-row defect)."""


class TemplateUnusable(ValueError):
    """The template or tokenizer cannot give training tokens for any row (a setting to change)."""


@dataclass(frozen=True)
class ChatTokens:
    prompt: str                  # the prompt's messages rendered with the generation prompt
    prompt_ids: list[int]        # as apply_chat_template(tokenize=True) gives them: nothing added
    answer_ids: list[list[int]]  # per answer: the template's tokens after the prompt, end of turn included


def special_tokens(tokenizer) -> dict[str, int]:
    """The tokenizer's special tokens (its BOS/EOS/pad and added control tokens such as `<|im_start|>`): text -> id."""
    return {token.content: i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special}


def starts_with_special_token(tokenizer, text: str) -> bool:
    """Whether `text` begins with one of the tokenizer's special tokens: a chat template wrote it (its BOS or a
    turn marker), so it is tokenized as apply_chat_template tokenizes it, with nothing added."""
    return any(text.startswith(token) for token in special_tokens(tokenizer))


def encode(tokenizer, text: str) -> list[int]:
    """Tokens of a template's text as apply_chat_template(tokenize=True) makes them: no special tokens added."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render(tokenizer, messages: Sequence[dict], generation_prompt: bool) -> str:
    """The template's text; jinja2.TemplateError when it refuses the messages (roles out of order, ...)."""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def end_of_turn_id(tokenizer) -> Optional[int]:
    """The token the tokenizer's chat template closes an assistant turn with: the first special token it writes
    after an answer (`<|eot_id|>`, `<|im_end|>`, `<end_of_turn>`, `<|end|>`, EOS), read from a rendering, not
    guessed from token names. None without a template, or when the template writes no special token there."""
    import jinja2

    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        text = render(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE_ANSWER}],
                      generation_prompt=False)
    except jinja2.TemplateError:  # a template that needs something else first (a system turn): no probe
        return None
    after = text[text.rfind(_PROBE_ANSWER) + len(_PROBE_ANSWER):] if _PROBE_ANSWER in text else ""
    found = [(after.find(token), -len(token), i) for token, i in special_tokens(tokenizer).items() if token in after]
    return min(found)[2] if found else None


def chat_tokens(tokenizer, messages: Sequence[dict], answers: Sequence[str], end_ids: Collection[int]) -> ChatTokens:
    """The prompt's and each answer's token ids, as the model reads them at inference (module docstring).

    `messages`: the prompt's {role, content} messages; `answers`: assistant texts that answer them; `end_ids`: the
    tokens that end a response (EOS, the template's end of turn), one of which each answer's tokens must hold, or
    a model trained on them would never stop.
    """
    import jinja2

    try:
        prompt = render(tokenizer, messages, generation_prompt=True)
        wholes = [render(tokenizer, [*messages, {"role": "assistant", "content": a}], generation_prompt=False)
                  for a in answers]
    except jinja2.TemplateError as err:  # templates raise on roles they do not take
        raise RowRefused(f"refused by the chat template: {err}") from None
    prompt_ids = encode(tokenizer, prompt)
    _check_prompt_as_text(tokenizer, prompt, prompt_ids)
    answer_ids = [_answer_ids(tokenizer, prompt, prompt_ids, whole) for whole in wholes]
    for whole, ids in zip(wholes, answer_ids):
        if not set(ids) & set(end_ids):
            raise TemplateUnusable(f"the chat template ends an assistant turn with no special token (after the answer "
                                   f"it writes {whole[len(prompt):][-20:]!r}): a model trained on it would never stop; "
                                   "close the assistant turn with {{ eos_token }} or an end-of-turn token")
    return ChatTokens(prompt, prompt_ids, answer_ids)


def _answer_ids(tokenizer, prompt: str, prompt_ids: list[int], whole: str) -> list[int]:
    if not whole.startswith(prompt):
        raise RowRefused("the chat template renders the prompt differently once the answer follows it (Mistral's "
                         "keeps a system message only while a user turn is last), so no tokens are both the prompt "
                         "the model reads at inference and the start of the whole conversation")
    fast = bool(getattr(tokenizer, "is_fast", False))
    encoded = tokenizer(whole, add_special_tokens=False, return_offsets_mapping=fast)
    ids = encoded["input_ids"]
    if ids[:len(prompt_ids)] == prompt_ids:
        return ids[len(prompt_ids):]
    offsets = encoded.get("offset_mapping")
    cut = len(prompt)
    if offsets is None:
        raise RowRefused("the answer's first tokens merge with the prompt's last ones and this (slow) tokenizer gives "
                         "no character offsets to split them by")
    for i, (start, end) in enumerate(offsets):
        if start < cut < end:
            raise RowRefused(f"the answer's first characters merge with the prompt's last into one token "
                             f"({whole[start:end]!r}), so no token sequence is both the prompt and its answer's start; "
                             "end the template's generation prompt with a special token or a newline")
        if start >= cut:
            return ids[i:]
    return []


def _check_prompt_as_text(tokenizer, prompt: str, prompt_ids: list[int]) -> None:
    """Prompts also travel as text (sampling, evaluation, the judge read `pair.prompt` through
    dpo_exp.data.prompt_token_ids): that text must give the same tokens as the template's prompt."""
    as_text = prompt_token_ids(tokenizer, prompt)
    if as_text != prompt_ids:
        raise TemplateUnusable(
            "the chat template's text does not begin with a special token and this tokenizer adds special tokens "
            f"to a text ({len(as_text)} tokens instead of the template's {len(prompt_ids)}), so a prompt read as text "
            "(sampling, evaluation) would not be the one trained on; start the template with {{ bos_token }} or a "
            "special token")


def prompt_token_ids(tokenizer, prompt: str) -> list[int]:
    """Prompt tokens as the model reads them: a text that begins with one of the tokenizer's special tokens was
    written by a chat template (its BOS or a turn marker) and is tokenized as apply_chat_template tokenizes it,
    with nothing added (no second BOS); any other text gets the tokenizer's own special tokens (BOS for
    Llama-style tokenizers), as the DPO authors' code gave them."""
    ids = tokenizer(prompt, add_special_tokens=not starts_with_special_token(tokenizer, prompt))["input_ids"]
    if not ids:  # an empty prompt still needs a token to condition on
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = [start]
    return ids
