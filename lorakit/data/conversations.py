"""Chat and instruction data for causal-LM fine-tuning: recognise a table's format by its columns, turn each row into
a conversation (a list of {"role", "content"}), check it, render it with the tokenizer's chat template and label
only what the assistant says.

Formats (`FORMATS`, tried in order; a table matching none is plain prompt/text data):

    openai    messages = [{"role": "user", "content": "..."}, {"role": "assistant", ...}, ...]
    sharegpt  conversations = [{"from": "human", "value": "..."}, {"from": "gpt", ...}, ...]
    alpaca    instruction, output (and optionally input): one user turn, one assistant turn

Labels (causal-LM targets, -100 = no loss) cover, for every assistant turn, its content tokens and the template's
end-of-turn token after them (so that the tuned model learns to stop), and nothing else. To find them without
template-specific markers (`{% generation %}`), each assistant turn i is located by rendering prefixes:

    prompt_i = render(messages[:i], add_generation_prompt=True)   # what the model is given at inference
    upto_i   = render(messages[:i + 1])                           # ... and that turn, closed by the template
    full     = render(messages)

`upto_i` must be a prefix of `full` and `prompt_i` a prefix of `upto_i` (checked: a template that renders a turn
differently once later turns follow is refused). The assistant's content is searched in `upto_i` after `prompt_i`;
the end-of-turn token is the first special token after it within `upto_i`. The rendering is tokenised once, and the
character spans are mapped to tokens through the tokenizer's offsets, so a merge of template text and content into
one token at a boundary does not break the mask (that token is labelled).

Row numbers in errors count data rows from 1 (row 3 is the third line of a JSON Lines file).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import DataError

IGNORE = -100  # the label that the loss ignores
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
PROBE = [{"role": "user", "content": "lorakit probe question"},
         {"role": "assistant", "content": "lorakit probe answer"}]


# ---- formats: a row -> a conversation ----

def _message_list(value, row: int, column: str) -> list:
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(f"row {row}: column {column!r} must hold a non-empty list of messages, got {value!r:.80}")
    return list(value)


def _openai(record: dict, row: int) -> list[dict]:
    messages = []
    for k, m in enumerate(_message_list(record["messages"], row, "messages"), 1):
        if not isinstance(m, dict) or m.get("role") is None or m.get("content") is None:
            raise DataError(f"row {row}: message {k} is not a role/content pair: {m!r:.120}")
        # Arrow gives every message every key seen in the column (missing ones as None): keep only real values.
        messages.append({key: v for key, v in m.items() if v is not None})
    return messages


def _sharegpt(record: dict, row: int) -> list[dict]:
    messages = []
    for k, m in enumerate(_message_list(record["conversations"], row, "conversations"), 1):
        if not isinstance(m, dict) or m.get("from") is None or m.get("value") is None:
            raise DataError(f"row {row}: message {k} is not a from/value pair: {m!r:.120}")
        if m["from"] not in SHAREGPT_ROLES:
            raise DataError(f"row {row}: message {k} is from {m['from']!r}; ShareGPT speakers are "
                            f"{', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]})
    return messages


def _alpaca(record: dict, row: int) -> list[dict]:
    instruction, extra, output = record["instruction"], record.get("input"), record["output"]
    if isinstance(extra, float) and math.isnan(extra):  # pandas' empty cell in a column with no text at all
        extra = None
    for name, value in (("instruction", instruction), ("output", output)):
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"row {row}: {name} must be non-empty text, got {value!r:.80}")
    if extra is not None and not isinstance(extra, str):
        raise DataError(f"row {row}: input must be text, got {extra!r:.80}")
    user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


@dataclass(frozen=True)
class Format:
    """A data format: recognised when all `columns` are present; `to_messages(record, row)` builds a conversation."""

    name: str
    columns: tuple[str, ...]
    to_messages: Callable[[dict, int], list[dict]]


FORMATS = (Format("openai", ("messages",), _openai),
           Format("sharegpt", ("conversations",), _sharegpt),
           Format("alpaca", ("instruction", "output"), _alpaca))
FORMAT_NAMES = {f.name: f for f in FORMATS}


def detect_format(columns) -> Format | None:
    """The first of FORMATS whose columns are all present, or None (plain prompt/text data)."""
    return next((f for f in FORMATS if set(f.columns) <= set(columns)), None)


def check_messages(messages: list[dict], row: int) -> None:
    """Raise DataError (naming the row and message) unless every message has a known role and text content and
    at least one assistant message says something."""
    for k, m in enumerate(messages, 1):
        if m["role"] not in ROLES:
            raise DataError(f"row {row}: message {k} has role {m['role']!r}; roles are {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"row {row}: message {k} has content of type {type(m['content']).__name__}, not text")
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError(f"row {row}: message {k} is an empty assistant message")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"row {row}: the conversation has no assistant message, so nothing to learn")


def conversation(fmt: Format, record: dict, row: int) -> list[dict]:
    """The checked conversation of one `record` (a dict of column values) in format `fmt`."""
    messages = fmt.to_messages(record, row)
    check_messages(messages, row)
    return messages


# ---- the chat template ----

def set_chat_template(tokenizer, file: str | Path | None = None) -> None:
    """Give `tokenizer` the Jinja chat template in `file` (which wins over its own), or keep its own; then render a
    probe conversation to check that the template shows the assistant's text and closes its turn with a special
    token. Raises DataError otherwise."""
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise DataError(f"chat template file not found: {file}")
        tokenizer.chat_template = path.read_text()
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template; give one with --chat-template FILE (a Jinja template "
                        "as in a tokenizer_config.json's chat_template)")
    try:
        chat_labels(tokenizer, PROBE, row=0)
    except DataError as e:
        raise DataError(f"the chat template cannot be used for training: {str(e).removeprefix('row 0: ')}") from None


def render(tokenizer, messages: list[dict], row: int, add_generation_prompt: bool = False) -> str:
    """The chat template's text for `messages`; a template error (e.g. "roles must alternate") names the row."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja2's TemplateError and the template's own raise_exception(): both are data errors
        raise DataError(f"row {row}: the chat template failed: {type(e).__name__}: {e}") from None


def special_ids(tokenizer) -> frozenset[int]:
    """Ids of the tokenizer's special tokens (EOS, <|im_end|>, <|eot_id|>, ...): the end-of-turn candidates."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    return frozenset(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}


# ---- the assistant mask ----

def assistant_spans(tokenizer, messages: list[dict], full: str, row: int) -> list[tuple[int, int, int]]:
    """(content start, content end, turn end) character offsets in `full` for each assistant message."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        upto = render(tokenizer, messages[: i + 1], row)
        if not full.startswith(upto):
            raise DataError(f"row {row}: the chat template renders the messages up to message {i + 1} differently "
                            f"once later messages follow, so the assistant's tokens cannot be located; use a template "
                            f"that renders each turn the same way wherever it stands")
        prompt = render(tokenizer, messages[:i], row, add_generation_prompt=True)
        if not upto.startswith(prompt):  # a generation prompt the rendered turn does not repeat: the bare prefix
            prompt = render(tokenizer, messages[:i], row)
            if not upto.startswith(prompt):
                raise DataError(f"row {row}: the chat template renders the messages before message {i + 1} "
                                f"differently once message {i + 1} follows, so its tokens cannot be located")
        text = m["content"].strip()  # templates often trim
        start = upto.find(text, len(prompt))
        if start < 0:
            raise DataError(f"row {row}: the chat template renders without the assistant's text of message {i + 1}")
        spans.append((start, start + len(text), len(upto)))
    return spans


def chat_labels(tokenizer, messages: list[dict], row: int) -> dict:
    """{input_ids, attention_mask, labels} of one checked conversation: labels = input_ids on each assistant turn's
    content and end-of-turn token (and anything the template puts between them), -100 elsewhere."""
    full = render(tokenizer, messages, row)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)  # the template holds BOS itself
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels, stops = [IGNORE] * len(ids), special_ids(tokenizer)
    for start, end, turn_end in assistant_spans(tokenizer, messages, full, row):
        # The end-of-turn token: the first special token after the content, inside this turn's rendering.
        eot = next((k for k, (a, b) in enumerate(offsets) if a >= end and b <= turn_end and ids[k] in stops), None)
        if eot is None:
            raise DataError(f"row {row}: the chat template closes an assistant turn with no special token (such as "
                            f"EOS) after its text, so the model would not learn to stop; use a template that ends "
                            f"assistant turns with an end-of-turn token: {full[end:turn_end]!r}")
        for k in range(eot + 1):
            if offsets[k][1] > start:  # overlaps the content or follows it, up to the end-of-turn token
                labels[k] = ids[k]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}
