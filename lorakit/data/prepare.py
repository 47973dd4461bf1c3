"""Causal-LM training examples through Hugging Face `datasets`: a table (a file, a dataset name or a DataFrame) is
read into Arrow, not Python lists, mapped to {input_ids, attention_mask, labels} in `num_proc` processes, and cached
on disk between runs.

The format is recognised by the columns (conversations.FORMATS: messages, conversations, instruction/output); any
other table is prompt/text data, tokenised as data.causal_examples does (loss on the text and EOS, not the prompt).

Caching: `datasets` keeps the result of `map` beside the Arrow copy of a file, under a fingerprint. We give that
fingerprint ourselves (`fingerprint`): a hash of the source's fingerprint (datasets derives it from the file's
path, size and modification time), the tokenizer (its full serialisation, special tokens and chat template), every
setting that shapes the examples, and the source code of the modules that build them. Any change to one of these
tokenises again; nothing else does (num_proc is left out: it does not change the result).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DataError
from .conversations import FORMAT_NAMES, IGNORE, chat_labels, conversation, detect_format, set_chat_template
from .tables import SUFFIXES, causal_examples, check_columns, read_table, texts

OVERLONG = ("truncate", "drop")  # what happens to an example longer than max_length
# How `datasets` reads each file kind of data.SUFFIXES (TSV without quote handling, as data.read_table reads it).
BUILDERS = {"csv": ("csv", {}), "tsv": ("csv", {"sep": "\t", "quoting": csv.QUOTE_NONE}), "jsonl": ("json", {}),
            "parquet": ("parquet", {})}


@dataclass
class Prepared:
    """Tokenised examples and what happened on the way."""

    dataset: object  # datasets.Dataset with input_ids, attention_mask, labels
    format: str  # openai | sharegpt | alpaca | text
    rows: int  # rows read
    too_long: int  # rows longer than max_length: truncated or dropped, as `overlong` says
    unlearnable: int  # rows dropped because truncation left no labelled token
    max_length: int
    overlong: str

    def summary(self) -> str:
        """One line for the user, e.g. "openai data: 1000 rows, dropped 12 of 1000 rows longer than 128 tokens"."""
        verb = "truncated" if self.overlong == "truncate" else "dropped"
        text = f"{self.format} data: {len(self.dataset)} examples from {self.rows} rows"
        if self.too_long:
            text += f"; {verb} {self.too_long} of {self.rows} rows longer than {self.max_length} tokens"
        if self.unlearnable:
            text += (f"; dropped {self.unlearnable} rows with no target token within the first {self.max_length} "
                     f"tokens")
        return text


def load_rows(source, cache_dir: str | None = None, streaming: bool = False):
    """A datasets.Dataset of `source`: a DataFrame, a .csv/.tsv/.jsonl/.json/.parquet file (read by `datasets` into
    an on-disk Arrow file, not into memory) or a Hugging Face dataset name ("name" or "name:split"). With
    `streaming`, a datasets.IterableDataset of the file or dataset instead: rows read as it is iterated."""
    import datasets

    if isinstance(source, pd.DataFrame):
        return datasets.Dataset.from_pandas(source, preserve_index=False)
    path = Path(source)
    kind = SUFFIXES.get(path.suffix.lower())
    if path.is_file() and kind:
        (builder, kwargs), files, split = BUILDERS[kind], str(path), "train"
    elif path.exists() or kind or str(source).startswith(("/", ".", "~")):
        read_table(source)  # raises read_table's error: a directory, a missing file, an unknown file type
    else:
        builder, _, split = str(source).partition(":")
        kwargs, files = {}, None
    try:
        ds = datasets.load_dataset(builder, data_files=files, split=split or "train", cache_dir=cache_dir,
                                   streaming=streaming, **kwargs)
    except Exception as e:  # a parse error, the network, an unknown name: all mean "not usable as data"
        raise DataError(f"could not read {source}: {type(e).__name__}: {e}") from None
    if not streaming and len(ds) == 0:
        raise DataError(f"{source} has no rows (columns: {', '.join(ds.column_names) or 'none'})")
    return ds


def check_text_columns(ds, columns: list[str], source: str) -> None:
    """Raise DataError unless every column in `columns` exists and holds scalars (text, numbers), naming the first
    row of a column that holds lists or dicts: their Python repr is no training text."""
    import datasets

    check_columns(pd.DataFrame(columns=ds.column_names), columns, source)
    for col in columns:
        if not isinstance(ds.features[col], datasets.Value):
            row, value = next((i, v) for i, v in enumerate(ds[col], 1) if v is not None)
            raise DataError(f"{source}: row {row}: column {col!r} holds {type(value).__name__}s ({value!r:.60}), not "
                            f"text; conversations are read from a 'messages' (role/content) or 'conversations' "
                            f"(from/value) column, recognised without --text-column")


def tokenizer_key(tokenizer) -> str:
    """Everything of `tokenizer` that can change the ids it produces, as one string."""
    from datasets.fingerprint import Hasher

    backend = getattr(tokenizer, "backend_tokenizer", None)  # vocabulary, merges, added tokens, normaliser, ...
    return json.dumps([type(tokenizer).__name__, backend.to_str() if backend else Hasher.hash(tokenizer),
                       getattr(tokenizer, "chat_template", None), sorted(map(str, tokenizer.all_special_tokens))])


def fingerprint(base: str, tokenizer, settings: dict) -> str:
    """The cache key of a tokenised dataset: source fingerprint, tokenizer, settings and the code that tokenises."""
    h = hashlib.sha256()
    # The modules whose code tokenises: conversations.py, data.py and this one.
    modules = {sys.modules[f.__module__] for f in (chat_labels, causal_examples, no_progress_bars)}
    code = [Path(m.__file__).read_bytes() for m in sorted(modules, key=lambda m: m.__name__)]
    parts = [base.encode(), tokenizer_key(tokenizer).encode(), json.dumps(settings, sort_keys=True).encode(), *code]
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:32]


def _encode_chat(batch: dict, indices: list[int], tokenizer, fmt_name: str) -> list[dict]:
    fmt = FORMAT_NAMES[fmt_name]
    records = [dict(zip(batch, values)) for values in zip(*batch.values())]
    return [chat_labels(tokenizer, conversation(fmt, r, i + 1), i + 1) for r, i in zip(records, indices)]


def _encode_text(batch: dict, tokenizer, text_columns: list[str], prompt_column: str | None,
                 max_length: int) -> list[dict]:
    df = pd.DataFrame({c: batch[c] for c in text_columns + ([prompt_column] if prompt_column else [])})
    text = texts(df, text_columns)
    prompts = texts(df, [prompt_column]) if prompt_column else None
    rows = causal_examples(tokenizer, text, prompts, sys.maxsize)
    for i, row in enumerate(rows):
        if len(row["input_ids"]) > max_length:  # truncated as causal_examples does: the EOS stays
            cut = causal_examples(tokenizer, text[i:i + 1], prompts[i:i + 1] if prompts else None, max_length)[0]
            rows[i] = {**cut, "length": len(row["input_ids"])}
    return rows


def _encode(batch: dict, indices: list[int], tokenizer, fmt_name: str, text_columns: list[str],
            prompt_column: str | None, max_length: int) -> dict:
    """A batched map function: rows -> input_ids, attention_mask, labels (cut to max_length), length (before the
    cut), learnable (labelled tokens after it)."""
    if fmt_name == "text":
        rows = _encode_text(batch, tokenizer, text_columns, prompt_column, max_length)
    else:
        rows = _encode_chat(batch, indices, tokenizer, fmt_name)
    out = {"input_ids": [], "attention_mask": [], "labels": [], "length": [], "learnable": []}
    for row in rows:
        out["length"].append(row.get("length", len(row["input_ids"])))
        for key in ("input_ids", "attention_mask", "labels"):
            out[key].append(row[key][:max_length])
        out["learnable"].append(sum(label != IGNORE for label in out["labels"][-1][1:]))  # the first predicts nothing
    return out


def encoder(tokenizer, fmt_name: str, text_columns: list[str], prompt_column: str | None, max_length: int):
    """The batched function that tokenises rows of format `fmt_name` (a dict of column lists, and their indices:
    row i is named row i + 1 in errors) into input_ids, attention_mask, labels (cut to max_length), length (before
    the cut) and learnable (labelled tokens after it)."""
    return partial(_encode, tokenizer=tokenizer, fmt_name=fmt_name, text_columns=text_columns,
                   prompt_column=prompt_column, max_length=max_length)


def kept(lengths: np.ndarray, learnable: np.ndarray, max_length: int, overlong: str) -> tuple[np.ndarray, ...]:
    """(which rows are kept, which were too long, which were left with no target token): a row longer than
    max_length is dropped with overlong "drop"; one with no labelled token left is dropped either way."""
    long = lengths > max_length
    dropped = long if overlong == "drop" else np.zeros_like(long)
    empty = (learnable == 0) & ~dropped  # a dropped long row counts as too long only
    return ~(dropped | empty), long, empty


def prepare(source, tokenizer, max_length: int, overlong: str = "truncate", text_columns: list[str] | None = None,
            prompt_column: str | None = None, num_proc: int | None = None, cache_dir: str | None = None,
            name: str | None = None, one_of_several: bool = False) -> Prepared:
    """Tokenised causal-LM examples of `source` (see load_rows). Conversations and Alpaca rows are recognised by
    their columns and rendered with the tokenizer's chat template (set it first with conversations.set_chat_template);
    other tables use `text_columns` (default ["text"], joined with a space) and `prompt_column`. Rows longer than
    `max_length` tokens are cut to it ("truncate") or left out ("drop"); rows left with no labelled token are left
    out either way. Every row is checked; errors name the row (from 1). A source `one_of_several` (a run mixing
    conversations with prompt/text data) reads `prompt_column` only if it is prompt/text data."""
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
    name = name or (str(source) if not isinstance(source, pd.DataFrame) else "the table")
    ds = load_rows(source, cache_dir)
    fmt = detect_format(ds.column_names)
    text_columns = list(text_columns or ["text"])
    if fmt is None:
        check_text_columns(ds, text_columns + ([prompt_column] if prompt_column else []), name)
    elif prompt_column and not one_of_several:
        raise DataError(f"{name} holds {fmt.name} data (columns {', '.join(fmt.columns)}); its prompts come from "
                        f"the conversation, so --prompt-column {prompt_column} has no use")
    else:
        set_chat_template(tokenizer)  # no template, or one unfit for training: said once, before any row
        prompt_column = None
    fmt_name = fmt.name if fmt else "text"
    settings = {"format": fmt_name, "max_length": max_length, "text_columns": text_columns,
                "prompt_column": prompt_column}
    encode = encoder(tokenizer, fmt_name, text_columns, prompt_column, max_length)
    key = fingerprint(ds._fingerprint, tokenizer, settings)  # datasets has no public name for a dataset's fingerprint
    try:
        out = ds.map(encode, batched=True, with_indices=True, num_proc=num_proc, remove_columns=ds.column_names,
                     new_fingerprint=key, desc="lorakit: tokenising")
    except DataError as e:
        raise DataError(f"{name}: {e}") from None
    lengths, learnable = (out.data.column(c).to_numpy() for c in ("length", "learnable"))  # Arrow, no Python lists
    keep, long, empty = kept(lengths, learnable, max_length, overlong)
    if not keep.all():
        out = out.select(keep.nonzero()[0])
    return Prepared(out.remove_columns(["length", "learnable"]), fmt_name, len(ds), int(long.sum()), int(empty.sum()),
                    max_length, overlong)


@contextlib.contextmanager
def no_progress_bars():
    """`datasets`' progress bars off inside (a tokenising bar in front of a command's own output is noise)."""
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()
