"""Causal-LM examples from streamed sources (--streaming): a hub dataset or a large .jsonl/.csv/.parquet file read
through `datasets.load_dataset(..., streaming=True)` as it is iterated, never whole.

Each source is a `Stream`: its rows, numbered from 1 in file order (errors name the source and the row), pass after
pass, each pass shuffled through `datasets`' buffer of STREAM_BUFFER rows (seeded: --seed and the pass number), then
tokenised row by row as prepare.py tokenises a table (the same formats, loss masks, truncation and drops). So the
rows read are at most those trained on plus the buffer. Several sources are concatenated (one pass of each in turn)
or, with weights, interleaved: each example comes from source i with probability w_i / sum(w), drawn from a
random.Random(seed); a source that ends starts its next pass. The examples are a pure function of the sources and
the seed: a resumed run replays the stream to where it stopped.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd

from ..errors import DataError
from .conversations import detect_format, set_chat_template
from .prepare import encoder, kept, load_rows
from .tables import check_columns

STREAM_BUFFER = 1000  # rows in the shuffle buffer of each streamed source
ROW = "__lorakit_row__"  # the column a stream's rows carry their row number in (from 0)


@dataclass
class Stream:
    """One streamed source, ready to tokenise: its rows (an IterableDataset), format and settings."""

    name: str
    rows: object  # datasets.IterableDataset, each row with ROW
    encode: object  # prepare.encoder's function
    max_length: int
    overlong: str
    seed: int
    format: str

    def examples(self, epoch: int) -> Iterator[dict]:
        """The tokenised examples of one pass (number `epoch`), shuffled; DataError naming the source and row."""
        rows = self.rows.shuffle(seed=self.seed, buffer_size=STREAM_BUFFER)
        rows.set_epoch(epoch)
        for row in rows:
            number = row.pop(ROW)
            try:
                out = self.encode({k: [v] for k, v in row.items()}, [number])
            except DataError as e:
                raise DataError(f"{self.name}: {e}") from None
            keep, _, _ = kept(np.array(out["length"]), np.array(out["learnable"]), self.max_length, self.overlong)
            if keep[0]:
                yield {k: out[k][0] for k in ("input_ids", "attention_mask", "labels")}

    def endless(self) -> Iterator[dict]:
        """Pass after pass; DataError if a pass gives no example (nothing could ever be trained on)."""
        for epoch in itertools.count():
            empty = True
            for example in self.examples(epoch):
                empty = False
                yield example
            if empty:
                raise DataError(f"{self.name}: no example in the stream (every row too long or without a target "
                                f"token); raise --max-length or use --overlong truncate")


def open_stream(source: str):
    """A source's rows as a datasets.IterableDataset (read as iterated), each with its row number in ROW."""
    ds = load_rows(source, streaming=True)
    return ds.map(lambda row, i: {**row, ROW: i}, with_indices=True)


def stream(source: str, tokenizer, max_length: int, overlong: str, text_columns: list[str],
           prompt_column: str | None, seed: int, one_of_several: bool = False) -> Stream:
    """The Stream of `source`: its format recognised from its first row's columns (as prepare() recognises a
    table's), the columns it needs checked there."""
    rows = open_stream(source)
    first = next(iter(rows), None)
    if first is None:
        raise DataError(f"{source} has no rows")
    columns = [c for c in first if c != ROW]
    fmt = detect_format(columns)
    if fmt is None:
        check_columns(pd.DataFrame(columns=columns), text_columns + ([prompt_column] if prompt_column else []),
                      source)
    elif prompt_column and not one_of_several:
        raise DataError(f"{source} holds {fmt.name} data (columns {', '.join(fmt.columns)}); its prompts come from "
                        f"the conversation, so --prompt-column {prompt_column} has no use")
    else:
        set_chat_template(tokenizer)
        prompt_column = None
    fmt_name = fmt.name if fmt else "text"
    encode = encoder(tokenizer, fmt_name, text_columns, prompt_column, max_length)
    return Stream(source, rows, _checked(encode, fmt is None, text_columns, prompt_column), max_length, overlong,
                  seed, fmt_name)


def _checked(encode, text: bool, text_columns: list[str], prompt_column: str | None):
    """`encode`, refusing first a prompt/text row whose columns hold lists or dicts (their repr is no text)."""
    if not text:
        return encode
    columns = text_columns + ([prompt_column] if prompt_column else [])

    def run(batch: dict, indices: list[int]) -> dict:
        for column in columns:
            for value, i in zip(batch[column], indices):
                if isinstance(value, (list, dict)):
                    raise DataError(f"row {i + 1}: column {column!r} holds a {type(value).__name__}, not text")
        return encode(batch, indices)

    return run


def mixed(streams: list[Stream], weights: list[float] | None, seed: int) -> Iterator[dict]:
    """The examples of several streams: one pass of each in turn (no weights), or each example drawn from stream i
    with probability w_i / sum(w) (random.Random(seed)), a stream that ends starting its next pass."""
    if weights is None:
        for epoch in itertools.count():
            given = 0
            for s in streams:
                for example in s.examples(epoch):
                    given += 1
                    yield example
            if not given:
                raise DataError(f"no example in the streams of {', '.join(s.name for s in streams)} (every row too "
                                f"long or without a target token); raise --max-length or use --overlong truncate")
    rng, endless = random.Random(seed), [s.endless() for s in streams]
    while True:
        yield next(endless[rng.choices(range(len(streams)), weights=weights)[0]])
