"""Chat templates a model can be given, and where a response ends.

A base model's tokenizer has no chat template (GPT-2, Pythia, GPT-J, a Llama base model) and a chat model's can
be replaced: `model.chat_template=NAME|PATH` names one of TEMPLATES or a Jinja file. `apply` sets it on the
tokenizer and adds the special tokens it needs; `fit_model` gives the model embedding rows for them (resizing
only when the tokenizer outgrows the embeddings; new rows drawn around the old rows' mean, transformers'
default) and adds the template's end of turn to the generation config's EOS ids. π_SFT's folder, the run's checkpoints and
their Hugging Face export are saved with that tokenizer and generation config, so the exported model renders and
stops as it was trained.

`stop_token_ids(tokenizer, generation_config)` is where sampling stops and what "the response ended" means
everywhere (PPO's missing-EOS penalty, the reward model's score position, truncated-sample counts): every EOS id
of the model's generation config (Llama 3.1: <|end_of_text|>, <|eom_id|>, <|eot_id|>), the tokenizer's EOS and
the chat template's end of turn (`dpo_exp.data.chat.end_of_turn_id`).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dpo_exp.errors import ConfigError
from dpo_exp.data.chat import end_of_turn_id, special_tokens
from dpo_exp.registry import Registry


@dataclass(frozen=True)
class ChatTemplate:
    name: str                          # a TEMPLATES name, or the Jinja file's path
    jinja: str                         # the template, rendered by transformers' apply_chat_template
    special_tokens: tuple[str, ...]    # control tokens it writes, added to a tokenizer that lacks them
    end_of_turn: Optional[str] = None  # the token closing an assistant turn; None: the tokenizer's EOS

    def key(self) -> dict:
        """What a cache entry built with this template depends on (its text and tokens, not where it came from)."""
        blob = "\0".join([self.jinja, *self.special_tokens, self.end_of_turn or ""]).encode()
        return {"name": self.name, "sha256": hashlib.sha256(blob).hexdigest()[:16]}


# `bos_token` is written where the tokenizer has one, so that every rendering starts with a special token (what
# dpo_exp.data.prompt_token_ids reads as "already formatted": nothing more is added to it).
_BOS = "{%- if bos_token %}{{- bos_token }}{%- endif %}"

# ChatML (OpenAI; Qwen, SmolLM2 and TRL's setup_chat_format write it): no default system turn, no BOS.
CHATML = ChatTemplate(
    "chatml",
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}",
    ("<|im_start|>", "<|im_end|>"), "<|im_end|>")

# Llama 3's turns (without Llama 3.1's dated system header): contents trimmed, the tokenizer's own BOS first.
LLAMA3 = ChatTemplate(
    "llama3",
    _BOS +
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}",
    ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "<|eot_id|>")

# Zephyr's: role markers as plain text, every turn closed by EOS and a newline (HuggingFaceH4/zephyr-7b-beta).
ZEPHYR = ChatTemplate(
    "zephyr",
    _BOS +
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}",
    ())

# Alpaca's text layout (the one dpo_exp.data.formats gives Alpaca rows without a template), answers closed by EOS.
ALPACA = ChatTemplate(
    "alpaca",
    _BOS +
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' %}{{- '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' %}{{- '### Response:\\n' + message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('the alpaca template has system, user and assistant turns, not '"
    " + message['role']) }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '### Response:\\n' }}{%- endif %}",
    ())

# model.chat_template=NAME selects one (or a Jinja file's path).
TEMPLATES: Registry[ChatTemplate] = Registry("chat template", "model.chat_template")
for _template in (CHATML, LLAMA3, ZEPHYR, ALPACA):
    TEMPLATES.add(_template.name, _template)

# A Jinja file's control tokens: `<|...|>` markers in its text (`<|im_start|>`, `<|eot_id|>`).
_CONTROL_TOKEN = re.compile(r"<\|[A-Za-z0-9_.\-]+\|>")


def resolve(spec: str) -> ChatTemplate:
    """model.chat_template: a name of TEMPLATES, or a Jinja file whose `<|...|>` markers are its special tokens."""
    import jinja2

    if spec in TEMPLATES:
        return TEMPLATES[spec]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.chat_template={spec!r} is neither a template name ({', '.join(TEMPLATES)}) nor a "
                          "Jinja file")
    text = path.read_text()
    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as err:
        raise ConfigError(f"model.chat_template={spec}: line {err.lineno}: {err.message}") from None
    return ChatTemplate(str(path), text, tuple(dict.fromkeys(_CONTROL_TOKEN.findall(text))))


def apply(tokenizer, template: ChatTemplate) -> list[str]:
    """Set the template on the tokenizer and make the tokens it needs special ones (never split, skipped when
    responses are decoded): a vocabulary entry keeps its id, a new token gets the next; returns the new ones."""
    new = [token for token in template.special_tokens if token not in tokenizer.get_vocab()]
    unmarked = [token for token in template.special_tokens if token not in special_tokens(tokenizer)]
    if unmarked:
        tokenizer.add_tokens(unmarked, special_tokens=True)
    tokenizer.chat_template = template.jinja
    return new


def fit_model(model, tokenizer) -> None:
    """The model for a tokenizer that `apply` may have grown: embedding rows for every token id (resized only when
    the tokenizer outgrows them: a vocabulary padded beyond the tokenizer's, GPT-J's or Qwen's, has room), and the
    template's end of turn among the generation config's EOS ids."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.generation_config.eos_token_id = stop_token_ids(tokenizer, model.generation_config)


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Where a response ends: the tokenizer's EOS, the chat template's end of turn and every EOS id of the
    model's generation config, each once."""
    configured = getattr(generation_config, "eos_token_id", None)
    ids = [tokenizer.eos_token_id, end_of_turn_id(tokenizer),
           *(configured if isinstance(configured, (list, tuple)) else [configured])]
    return list(dict.fromkeys(i for i in ids if i is not None))
