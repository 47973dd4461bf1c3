"""Preference data: rows read, checked and tokenised, and batches built from them.

Formats (TRL's), chosen by the columns:

    paired (dpo, ipo, orpo)   prompt, chosen, rejected
    unpaired (kto)            prompt, completion, label (true: desirable)

Each text is a string, or (conversational) `prompt` a list of messages and each completion a list holding the
assistant's message, rendered with the tokenizer's chat template. Tokenising follows TRL's DPOTrainer: the prompt
alone and prompt + completion are tokenised whole (plain text: EOS appended to the completion unless it ends with
it; conversations: the template closes the turn), and the completion starts where the two token lists first differ,
so a token merged across the boundary belongs to the completion. The loss covers the completion tokens only.

Lengths: the prompt is cut from the left to --max-prompt-length (its end, next to the completion, is kept), then the
completion so that prompt + completion fit --max-length. A prompt that fills --max-length alone is an error naming
the row (TRL drops such rows silently); so are a missing or empty field and a chosen completion equal to the
rejected one. Row numbers count data rows from 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...data.tables import read_table
from ...errors import DataError

PAIRED = ("prompt", "chosen", "rejected")
UNPAIRED = ("prompt", "completion", "label")


@dataclass
class Tokenized:
    """A file's tokenised rows and what truncation did to them."""

    rows: list[dict]
    source: str
    chat: bool  # rendered with the chat template
    prompts_cut: int = 0  # prompts shortened to --max-prompt-length
    completions_cut: int = 0  # completions shortened to fit --max-length

    def summary(self) -> str:
        kind = "conversational" if self.chat else "plain-text"
        return (f"{kind} preference data: {len(self.rows)} rows; {self.prompts_cut} prompts cut to "
                f"--max-prompt-length, {self.completions_cut} completions cut to fit --max-length")


def read_rows(source, fields: tuple[str, ...], name: str) -> list[dict]:
    """The rows of a table (file or Hugging Face dataset, or a list of dicts), each checked: every field present and
    not empty, texts strings or message lists, labels booleans, chosen differing from rejected."""
    records = source if isinstance(source, list) else read_table(source).to_dict("records")
    if not records:
        raise DataError(f"{name}: no rows")
    for i, record in enumerate(records, 1):
        check_row(record, i, fields, name)
    return records


def check_row(record: dict, row: int, fields: tuple[str, ...], name: str) -> None:
    """DataError naming the row and field for anything a preference row cannot be."""
    for field in fields:
        value = record.get(field)
        if value is None or (isinstance(value, float) and value != value) or (isinstance(value, str) and not value):
            raise DataError(f"{name}: row {row}: missing or empty field {field!r} (a row needs {', '.join(fields)})")
        if field == "label":
            if not isinstance(value, bool) and value not in (0, 1):
                raise DataError(f"{name}: row {row}: label must be true or false, got {value!r:.40}")
        elif not isinstance(value, (str, list, tuple)):
            raise DataError(f"{name}: row {row}: field {field!r} must be text or a list of messages, got "
                            f"{type(value).__name__}")
    texts = [record[f] for f in fields if f != "label"]
    if len({isinstance(t, str) for t in texts}) > 1:
        raise DataError(f"{name}: row {row}: mixes plain text and message lists in {', '.join(fields)}")
    if "chosen" in fields and _same(record["chosen"], record["rejected"]):
        raise DataError(f"{name}: row {row}: chosen and rejected are the same; a pair must differ")


def _same(a, b) -> bool:
    return [dict(m) for m in a] == [dict(m) for m in b] if isinstance(a, (list, tuple)) else a == b


def _messages(value) -> list[dict]:
    # Arrow/pandas give every message every key seen in the column (missing ones as None): keep real values only.
    return [{k: v for k, v in dict(m).items() if v is not None} for m in value]


def _encode(tokenizer, prompt, completion=None) -> list[int]:
    """Token ids as TRL makes them: the chat template for messages (a generation prompt after a prompt alone), else
    the tokenizer's own call (its BOS included), EOS closing a plain completion."""
    if isinstance(prompt, (list, tuple)):
        messages = _messages(prompt) + (_messages(completion) if completion is not None else [])
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            add_generation_prompt=completion is None)["input_ids"]
        return list(ids)
    text = prompt
    if completion is not None:
        eos = tokenizer.eos_token or ""
        text = prompt + (completion if completion.endswith(eos) else completion + eos)
    return list(tokenizer(text=text)["input_ids"])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_rows(records: list[dict], tokenizer, max_length: int, max_prompt_length: int | None, name: str,
                  paired: bool = True) -> Tokenized:
    """Rows of prompt_ids and completion ids (chosen_ids/rejected_ids, or completion_ids and label), truncated and
    checked as the module docstring says."""
    keys = ("chosen", "rejected") if paired else ("completion",)
    out = Tokenized([], name, chat=not isinstance(records[0]["prompt"], str))
    for i, record in enumerate(records, 1):
        prompt_ids = _encode(tokenizer, record["prompt"])
        full = {k: _encode(tokenizer, record["prompt"], record[k]) for k in keys}
        start = min(_common_prefix(prompt_ids, ids) for ids in full.values())
        prompt = full[keys[0]][:start]
        if max_prompt_length is not None and len(prompt) > max_prompt_length:
            prompt, out.prompts_cut = prompt[len(prompt) - max_prompt_length:], out.prompts_cut + 1
        if len(prompt) >= max_length:
            raise DataError(f"{name}: row {i}: the prompt alone has {len(prompt)} tokens and fills --max-length "
                            f"{max_length}; raise --max-length, set --max-prompt-length, or shorten the prompt")
        row = {"prompt_ids": prompt}
        for k in keys:
            completion = full[k][start:]
            room = max_length - len(prompt)
            out.completions_cut += len(completion) > room
            row[f"{k}_ids"] = completion[:room]
            if not row[f"{k}_ids"]:
                raise DataError(f"{name}: row {i}: {k} has no tokens of its own after the prompt")
        if not paired:
            row["label"] = bool(record["label"])
        out.rows.append(row)
    return out


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def _sequences(prompts: list[list[int]], completions: list[list[int]], pad_id: int, prefix: str = "") -> dict:
    ids = [p + c for p, c in zip(prompts, completions)]
    return {prefix + "input_ids": _pad(ids, pad_id), prefix + "attention_mask": _pad([[1] * len(s) for s in ids], 0),
            prefix + "completion_mask": _pad([[0] * len(p) + [1] * len(c) for p, c in zip(prompts, completions)], 0)}


def collate_pairs(rows: list[dict], pad_id: int) -> dict:
    """One tensor of the batch's chosen sequences followed by its rejected ones, right-padded (TRL's layout), with
    completion_mask marking the completion tokens; precomputed reference log-probabilities when the rows hold them."""
    prompts = [r["prompt_ids"] for r in rows] * 2
    batch = _sequences(prompts, [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows], pad_id)
    if "ref_chosen_logps" in rows[0]:
        batch["ref_logps"] = torch.tensor([r["ref_chosen_logps"] for r in rows]
                                          + [r["ref_rejected_logps"] for r in rows])
    return batch


def collate_unpaired(rows: list[dict], pad_id: int, max_length: int | None = None, previous: dict | None = None) -> dict:
    """KTO's batch: the rows' prompt + completion sequences and labels, and (KL_...) mismatched pairs for the KL
    estimate: each prompt with the completion before it, (x_1, y_0), (x_2, y_1), ..., as TRL builds them. y_0 is
    `previous`'s completion: the row before this process's first in the global batch (fit.Batches), so that the
    pairs span the global batch as one process's would; without it, the batch's own last completion."""
    prompts, completions = [r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows]
    rotated = [(previous or rows[-1])["completion_ids"]] + completions[:-1]
    if max_length is not None:  # a mismatched pair may be longer than either row: cut it as TRL's collator does
        rotated = [c[:max(0, max_length - len(p))] for p, c in zip(prompts, rotated)]
    return {**_sequences(prompts, completions, pad_id), **_sequences(prompts, rotated, pad_id, "KL_"),
            "label": torch.tensor([r["label"] for r in rows], dtype=torch.bool)}
