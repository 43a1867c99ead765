"""Small offline tokenizers that carry each model family's special tokens, BOS behaviour and chat template.

No hub is reachable here and the real vocabularies are not needed: each tokenizer is a BPE trained on a few
hundred strings with the `tokenizers` library (byte-level for the GPT-2 / tiktoken lineage, SentencePiece-like
with prefix spaces for Mistral, Gemma, Phi-3 and Llama 2), with the family's exact special-token strings added
and its published tokenizer_config.json behaviour reproduced: which BOS / EOS / pad it names, whether encoding
a text prepends BOS, added tokens that swallow the whitespace after them (Phi-3's rstrip), and its chat
template, written here from those facts: the turn markers, where BOS is written, the default system prompt, what
it does with a system message (kept, folded into the first user turn, refused, or kept only while a user turn is
last), what follows the end of a turn. `generation_eos` is the model's generation_config.json `eos_token_id`.

`family(name)` builds a fresh tokenizer each call (the trained vocabularies are cached), so a test may change it.
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

# ---- the chat templates, as each family's tokenizer_config.json has them (tool calling left out) -------------

# Llama 3.1 Instruct: BOS written by the template, a system header always (dated), contents trimmed, tool turns
# as `ipython` with their content as JSON.
LLAMA31 = """{{- bos_token }}
{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message['role'] == 'tool' or message['role'] == 'ipython' %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message['content'] is mapping or message['content'] is iterable %}
            {{- message['content'] | tojson }}
        {%- else %}
            {{- message['content'] }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- else %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}"""

# Qwen2.5 Instruct: ChatML, a default system prompt when none is given, tool results inside a user turn.
QWEN25 = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}"""

# Mistral 7B Instruct v0.3: roles must alternate; the system message goes before the user message only while
# that user turn is the last message; an answer is " " + its trimmed text + EOS.
MISTRAL_V03 = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if (message["role"] == "user") != (loop.index0 % 2 == 0) %}
        {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif %}
{%- endfor %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"] | trim + eos_token }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}"""

# Gemma 2 it: BOS written by the template, no system role, the assistant is `model`, a newline after each turn.
GEMMA2 = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {{- raise_exception('System role not supported') }}
{%- endif %}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'assistant' %}{%- set role = 'model' %}{%- else %}{%- set role = message['role'] %}{%- endif %}
    {{- '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<start_of_turn>model\\n' }}
{%- endif %}"""

# Gemma 3 it: as Gemma 2, but a system message is folded into the first user turn.
GEMMA3 = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set first_user_prefix = "" %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif %}
    {%- if message['role'] == 'assistant' %}{%- set role = "model" %}{%- else %}{%- set role = message['role'] %}{%- endif %}
    {{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<start_of_turn>model\\n' }}
{%- endif %}"""

# Phi-3 mini instruct: <|role|> markers and <|end|>, each followed by a newline the rstrip tokens swallow; a whole
# conversation (no generation prompt) ends with EOS.
PHI3 = ("{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + "
        "'<|end|>\\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
        "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}")

# Phi-4: ChatML with <|im_sep|> after the role and nothing after <|im_end|>.
PHI4 = ("{% for message in messages %}{% if (message['role'] == 'system') %}{{'<|im_start|>system<|im_sep|>' + "
        "message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + "
        "message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'assistant') %}{{'<|im_start|>assistant"
        "<|im_sep|>' + message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}")

# SmolLM2 Instruct: ChatML with a default system prompt; its BOS is <|im_start|>, written by the template only.
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>"
           "system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}"
           "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@dataclass(frozen=True)
class Spec:
    kind: str                         # "byte_level" (GPT-2 / tiktoken lineage) or "sentencepiece" (prefix spaces)
    base: tuple[str, ...]             # special tokens at ids 0.. (the trainer's)
    control: tuple[str, ...] = ()     # further special tokens, added after the vocabulary
    rstrip: tuple[str, ...] = ()      # added tokens that swallow the whitespace after them
    bos: Optional[str] = None
    eos: Optional[str] = None
    unk: Optional[str] = None
    pad: Optional[str] = None
    adds_bos: bool = False            # encoding a text prepends BOS (add_bos_token)
    template: Optional[str] = None
    generation_eos: tuple[str, ...] = ()  # generation_config.json eos_token_id, as tokens
    end_of_turn: Optional[str] = None     # what the template closes an assistant turn with
    system: str = "kept"              # kept | refused (the template raises) | dropped_once_answered (Mistral)
    prefix: str = "first"             # SentencePiece-like: where a prefix space is added (Gemma: never)


LLAMA3_SPECIAL = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|finetune_right_pad_id|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")

SPECS = {
    # chat models
    "llama3.1": Spec("byte_level", LLAMA3_SPECIAL, bos="<|begin_of_text|>", eos="<|eot_id|>", adds_bos=True,
                     template=LLAMA31, generation_eos=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
                     end_of_turn="<|eot_id|>"),
    "qwen2.5": Spec("byte_level", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), eos="<|im_end|>",
                    pad="<|endoftext|>", template=QWEN25, generation_eos=("<|im_end|>", "<|endoftext|>"),
                    end_of_turn="<|im_end|>"),
    "mistral-v0.3": Spec("sentencepiece", ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"), bos="<s>", eos="</s>",
                         unk="<unk>", adds_bos=True, template=MISTRAL_V03, generation_eos=("</s>",), end_of_turn="</s>",
                         system="dropped_once_answered"),
    "gemma-2": Spec("sentencepiece", ("<pad>", "<eos>", "<bos>", "<unk>"), ("<start_of_turn>", "<end_of_turn>"),
                    bos="<bos>", eos="<eos>", unk="<unk>", pad="<pad>", adds_bos=True, template=GEMMA2,
                    generation_eos=("<eos>", "<end_of_turn>"), end_of_turn="<end_of_turn>", system="refused",
                    prefix="never"),
    "gemma-3": Spec("sentencepiece", ("<pad>", "<eos>", "<bos>", "<unk>"), ("<start_of_turn>", "<end_of_turn>"),
                    bos="<bos>", eos="<eos>", unk="<unk>", pad="<pad>", adds_bos=True, template=GEMMA3,
                    generation_eos=("<eos>", "<end_of_turn>"), end_of_turn="<end_of_turn>", prefix="never"),
    "phi-3": Spec("sentencepiece", ("<unk>", "<s>", "</s>"),
                  ("<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"),
                  rstrip=("<|assistant|>", "<|system|>", "<|end|>", "<|user|>"), bos="<s>", eos="<|endoftext|>",
                  unk="<unk>", pad="<|endoftext|>", template=PHI3,
                  generation_eos=("<|endoftext|>", "<|assistant|>", "<|end|>"), end_of_turn="<|end|>"),
    "phi-4": Spec("byte_level", ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_sep|>", "<|dummy_85|>"),
                  bos="<|endoftext|>", eos="<|im_end|>", pad="<|dummy_85|>", template=PHI4,
                  generation_eos=("<|im_end|>",), end_of_turn="<|im_end|>"),
    "smollm2": Spec("byte_level", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), bos="<|im_start|>",
                    eos="<|im_end|>", unk="<|endoftext|>", pad="<|im_end|>", template=SMOLLM2,
                    generation_eos=("<|im_end|>",), end_of_turn="<|im_end|>"),
    # base models: no template
    "gpt2": Spec("byte_level", ("<|endoftext|>",), bos="<|endoftext|>", eos="<|endoftext|>", unk="<|endoftext|>",
                 generation_eos=("<|endoftext|>",)),
    "pythia": Spec("byte_level", ("<|endoftext|>", "<|padding|>"), bos="<|endoftext|>", eos="<|endoftext|>",
                   unk="<|endoftext|>", pad="<|padding|>", generation_eos=("<|endoftext|>",)),
    "gpt-j": Spec("byte_level", ("<|endoftext|>",), bos="<|endoftext|>", eos="<|endoftext|>", unk="<|endoftext|>",
                  generation_eos=("<|endoftext|>",)),  # GPT-2's tokenizer; the model's embeddings are padded beyond it
    "llama2-base": Spec("sentencepiece", ("<unk>", "<s>", "</s>"), bos="<s>", eos="</s>", unk="<unk>", adds_bos=True,
                        generation_eos=("</s>",)),
}
CHAT_FAMILIES = tuple(name for name, spec in SPECS.items() if spec.template)
BASE_FAMILIES = tuple(name for name, spec in SPECS.items() if not spec.template)

# What the tokenizers are trained on: the tests' conversations and some ordinary text.
CORPUS = [
    "What is 2+2?", "Four.", "Five, I think.", "You answer in one word.", "Be kind.", "hi", "hello", "there",
    "Name a colour.", "Blue.", "Seven.", "Add the numbers.", "2 and 3", "5", "6", "weather?", "sunny", "Sunny.",
    "Rain.", "The sky is blue and the grass is green.", "A model reads tokens and writes an answer.",
    "What is 12 plus 30? 12 plus 30 is 42.", "Answer with the sum.", "Question: Answer:", "### Instruction:",
    "### Response:", "You are a helpful assistant.", "Cutting Knowledge Date: December 2023", "Today Date: 26 Jul 2024",
    "system user assistant model tool ipython", '{"name": "w"}', "Hello! How can I help you today?",
]


@dataclass
class Family:
    name: str
    spec: Spec
    tokenizer: object                # a PreTrainedTokenizerFast
    generation_eos: list[int]        # generation_config.json eos_token_id

    def id(self, token: str) -> int:
        return self.tokenizer.convert_tokens_to_ids(token)

    @property
    def end_of_turn_id(self) -> Optional[int]:
        return None if self.spec.end_of_turn is None else self.id(self.spec.end_of_turn)


@lru_cache(maxsize=None)
def _trained(kind: str, base: tuple[str, ...], prefix: str) -> str:
    """A BPE vocabulary over CORPUS with `base` special tokens at ids 0.., as tokenizer JSON."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if kind == "byte_level":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # SentencePiece-like: spaces as "▁" joined to the next word, newlines their own token (byte fallback)
        tok = Tokenizer(models.BPE(unk_token=base[base.index("<unk>")] if "<unk>" in base else None))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split("\n", "isolated"),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prefix, split=True)])
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=prefix, split=True)
        alphabet = [c for c in string.printable if c not in "\x0b\x0c\r\t"] + ["▁"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(base), initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok.to_str()


def family(name: str) -> Family:
    """A fresh tokenizer of family `name` (SPECS) and its generation config's EOS ids."""
    from tokenizers import AddedToken, Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    spec = SPECS[name]
    tok = Tokenizer.from_str(_trained(spec.kind, spec.base, spec.prefix))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False, rstrip=t in spec.rstrip) for t in spec.control])
    if spec.adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A", pair=f"{spec.bos} $A {spec.bos} $B", special_tokens=[(spec.bos, tok.token_to_id(spec.bos))])
    tokens = {key: value for key, value in (("bos_token", spec.bos), ("eos_token", spec.eos), ("unk_token", spec.unk),
                                            ("pad_token", spec.pad)) if value}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, **tokens)
    if spec.template:
        tokenizer.chat_template = spec.template
    return Family(name, spec, tokenizer, [tokenizer.convert_tokens_to_ids(t) for t in spec.generation_eos])


# ---- conversations in every conversational layout `data=pairs` detects ---------------------------------------

@dataclass(frozen=True)
class Conversation:
    system: Optional[str]
    turns: tuple[tuple[str, str], ...]   # (role, text) of the prompt's turns after the system message
    answers: tuple[str, str]             # chosen, rejected

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": role, "content": text} for role, text in self.turns]


CONVERSATIONS = {
    "single": Conversation(None, (("user", "Add the numbers.\n\n2 and 3"),), ("5", "6")),
    "single_system": Conversation("You answer in one word.", (("user", "What is 2+2?"),), ("Four.", "Five, I think.")),
    "multi": Conversation(None, (("user", "hi"), ("assistant", "hello"), ("user", "Name a colour.")), ("Blue.", "Seven.")),
    "multi_system": Conversation("Be kind.", (("user", "hi"), ("assistant", "hello"), ("user", "Name a colour.")),
                                 ("Blue.", "Seven.")),
}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _sharegpt_row(c: Conversation) -> dict:
    who = {"user": "human", "assistant": "gpt"}
    row = {"conversations": [{"from": who[role], "value": text} for role, text in c.turns],
           "chosen": {"from": "gpt", "value": c.answers[0]}, "rejected": {"from": "gpt", "value": c.answers[1]}}
    return {**row, "system": c.system} if c.system else row


def _alpaca_row(c: Conversation) -> Optional[dict]:
    """One user turn: instruction, a blank line, input (how the alpaca layout makes its user message)."""
    if len(c.turns) != 1:
        return None
    instruction, _, extra = c.turns[0][1].partition("\n\n")
    row = {"instruction": instruction, "input": extra, "chosen": c.answers[0], "rejected": c.answers[1]}
    return {**row, "system": c.system} if c.system else row


def _prompt_string_row(c: Conversation) -> Optional[dict]:
    """HuggingFaceH4/ultrafeedback_binarized: the prompt as a string (one user message), whole conversations."""
    if c.system or len(c.turns) != 1:
        return None
    return {"prompt": c.turns[0][1], "chosen": c.messages() + [_assistant(c.answers[0])],
            "rejected": c.messages() + [_assistant(c.answers[1])]}


# layout -> (row of a conversation, or None where the layout cannot hold it; the field naming the prompt)
LAYOUTS = {
    "trl_prompt_string": (_prompt_string_row, "prompt"),
    "trl_prompt": (lambda c: {"prompt": c.messages(), "chosen": [_assistant(c.answers[0])],
                              "rejected": [_assistant(c.answers[1])]}, "prompt"),
    "trl_implicit": (lambda c: {"chosen": c.messages() + [_assistant(c.answers[0])],
                                "rejected": c.messages() + [_assistant(c.answers[1])]}, "prompt"),
    "sharegpt": (_sharegpt_row, "conversations"),
    "alpaca": (_alpaca_row, "instruction"),
}


def assert_tokens_as_at_inference(tokenizer, conversation: Conversation, pair) -> None:
    """The pair's tokens are what the model reads at inference: the prompt is apply_chat_template with the generation
    prompt, and prompt + each response is the template's rendering of the whole conversation with that answer,
    tokenized as apply_chat_template(tokenize=True) tokenizes it; tokenization keeps them, and the prompt read as
    text (sampling, evaluation) gives the same tokens."""
    from dpo_exp.data import prompt_token_ids, tokenize_pair

    messages = conversation.messages()
    assert pair.prompt == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert pair.prompt_ids == tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert prompt_token_ids(tokenizer, pair.prompt) == pair.prompt_ids
    assert (pair.chosen, pair.rejected) == conversation.answers  # the texts stay the assistant's answers
    tokenized = tokenize_pair(tokenizer, pair, 0, max_length=4096, max_prompt_length=2048)
    for answer, ids, kept in zip(conversation.answers, (pair.chosen_ids, pair.rejected_ids),
                                 (tokenized.chosen_ids, tokenized.rejected_ids)):
        whole = tokenizer.apply_chat_template(messages + [_assistant(answer)])["input_ids"]
        assert pair.prompt_ids + ids == whole, (tokenizer.convert_ids_to_tokens(pair.prompt_ids + ids),
                                               tokenizer.convert_ids_to_tokens(whole))
        assert tokenized.prompt_ids + kept == whole
