"""Training data: read a table (CSV, TSV, JSON Lines, Parquet or a Hugging Face dataset), check it, map labels,
tokenise for sequence classification or causal language modelling, and batch it.

Every check raises `DataError` with a message meant for the user, before any model is loaded.
"""

from __future__ import annotations

import csv
import json
import math
from importlib import resources
from pathlib import Path

import pandas as pd
import torch

from ..errors import DataError

SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
DEMO_FILE = "news_headlines.csv"
DEMO_EVAL_ROWS = 96


def read_table(source: str | Path) -> pd.DataFrame:
    """A table from a .csv/.tsv/.jsonl/.json/.parquet file, or from a Hugging Face dataset name ("name" or
    "name:split", split "train" by default). TSV is read without quote handling: SST-2-style sentences hold
    stray quote characters."""
    path = Path(source)
    kind = SUFFIXES.get(path.suffix.lower())
    if path.is_dir():
        raise DataError(f"{source} is a directory; give a .csv, .tsv, .jsonl or .parquet file")
    if not path.exists():
        if kind or str(source).startswith(("/", ".", "~")):
            raise DataError(f"data file not found: {source}")
        return _read_hub_dataset(str(source))
    if kind is None:
        raise DataError(f"{source}: unknown file type {path.suffix!r}; use .csv, .tsv, .jsonl or .parquet")
    try:
        if kind == "csv":
            df = pd.read_csv(path)
        elif kind == "tsv":
            df = pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE)
        elif kind == "jsonl":
            df = pd.read_json(path, lines=True)
        else:
            df = pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        raise DataError(f"{source} is empty") from None
    except (ValueError, OSError, pd.errors.ParserError) as e:
        raise DataError(f"could not read {source} as {kind}: {e}") from None
    if len(df) == 0:
        raise DataError(f"{source} has no rows (columns: {', '.join(map(str, df.columns)) or 'none'})")
    return df


def _read_hub_dataset(name: str) -> pd.DataFrame:
    name, _, split = name.partition(":")
    try:
        import datasets

        return datasets.load_dataset(name, split=split or "train").to_pandas()
    except Exception as e:  # the network, an unknown name, a bad split: all mean "not usable as data"
        raise DataError(f"{name!r} is not a data file and could not be loaded as a Hugging Face dataset: "
                        f"{type(e).__name__}: {e}") from None


def demo_table() -> pd.DataFrame:
    """The news headlines shipped with lorakit (columns text, label; topic names as labels)."""
    with resources.as_file(resources.files("lorakit") / "demo" / DEMO_FILE) as path:
        return read_table(path)


def demo_split(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The demo headlines in a fixed seeded split: (train, eval), eval holding DEMO_EVAL_ROWS rows."""
    df = demo_table().sample(frac=1.0, random_state=seed).reset_index(drop=True)
    return df.iloc[DEMO_EVAL_ROWS:].reset_index(drop=True), df.iloc[:DEMO_EVAL_ROWS].reset_index(drop=True)


def split_columns(value: str | list[str] | None) -> list[str]:
    """'title,description' -> ['title', 'description']."""
    if value is None:
        return []
    items = value if isinstance(value, list) else str(value).split(",")
    return [c.strip() for c in items if c.strip()]


def check_columns(df: pd.DataFrame, columns: list[str], source: str) -> None:
    """Raise DataError naming the missing columns and the columns found."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{source}: no column {', '.join(repr(c) for c in missing)}; "
                        f"columns found: {', '.join(map(str, df.columns))}")


def texts(df: pd.DataFrame, columns: list[str]) -> list[str]:
    """One string per row: the given columns joined with a space (missing values as empty strings)."""
    parts = df[columns].fillna("").astype(str)
    return [" ".join(p.strip() for p in row if p.strip()) for row in parts.itertuples(index=False)]


# ---- labels ----

def _is_integer_labels(values: pd.Series) -> bool:
    return pd.api.types.is_integer_dtype(values) or (
        pd.api.types.is_float_dtype(values) and bool((values.dropna() % 1 == 0).all()))


def _check_no_empty_labels(values: pd.Series, source: str) -> None:
    # Rows are counted from 1, the first data row, as every other message about a row counts them.
    empty = values.isna().to_numpy().nonzero()[0]
    if len(empty):
        rows = ", ".join(str(i + 1) for i in empty[:5]) + (" ..." if len(empty) > 5 else "")
        raise DataError(f"{source}: {len(empty)} empty label{'s' if len(empty) > 1 else ''}, in row(s) {rows}")


def label_names(values: pd.Series, source: str) -> list[str]:
    """Label names in id order, from a training label column: the distinct values sorted (integers numerically, so
    that ids 0..K-1 keep their ids), as strings."""
    _check_no_empty_labels(values, source)
    if _is_integer_labels(values):
        return [str(i) for i in sorted({int(v) for v in values})]
    return sorted({str(v) for v in values})


def encode_labels(values: pd.Series, names: list[str], source: str) -> list[int]:
    """Label ids for `values` under the label map `names`; raises DataError listing labels not in the map."""
    _check_no_empty_labels(values, source)
    keys = [str(int(v)) if _is_integer_labels(values) else str(v) for v in values]
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(keys) - set(index))
    if unknown:
        raise DataError(f"{source}: labels {unknown[:10]} are not in the training label map {names}")
    return [index[k] for k in keys]


# ---- tokenisation ----

def classification_examples(tokenizer, text: list[str], labels: list[int] | None, max_length: int) -> list[dict]:
    """Tokenised examples {input_ids, attention_mask, [token_type_ids], [labels]}, truncated to max_length."""
    enc = tokenizer(text, truncation=True, max_length=max_length)
    rows = [dict(zip(enc.keys(), values)) for values in zip(*enc.values())]
    if labels is not None:
        for row, label in zip(rows, labels):
            row["labels"] = label
    return rows


def causal_examples(tokenizer, text: list[str], prompts: list[str] | None, max_length: int) -> list[dict]:
    """Tokenised examples {input_ids, attention_mask, labels} for causal LM training: prompt tokens (if any), then
    the text's tokens and EOS. labels = input_ids with -100 on the prompt, so the loss covers the completion only.
    Truncated to max_length from the end of the completion (the EOS is kept)."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; causal-lm training appends one to every example")
    rows = []
    for i, completion in enumerate(text):
        prompt_ids = tokenizer(prompts[i])["input_ids"] if prompts else []
        # Special tokens (e.g. Llama's BOS) go at the very start only: with the prompt if there is one.
        body = tokenizer(completion, add_special_tokens=not prompts)["input_ids"]
        if body[-1:] == [tokenizer.eos_token_id]:
            body = body[:-1]
        body = body + [tokenizer.eos_token_id]
        room = max_length - len(prompt_ids)
        if room < 1:  # the prompt alone fills the window: keep its end, so the completion still has one token
            prompt_ids, room = prompt_ids[len(prompt_ids) - max_length + 1:], 1
        body = body[: room - 1] + body[-1:] if len(body) > room else body
        ids = prompt_ids + body
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(prompt_ids) + body})
    return rows


def label_collator(tokenizer):
    """A batch builder for labelled examples: pads input ids to the longest example."""
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer, return_tensors="pt")


def token_collator(tokenizer):
    """A batch builder for language-model examples: pads to the longest, labels with -100 (ignored by the loss)."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, return_tensors="pt")


def ensure_pad_token(tokenizer) -> None:
    """Causal LM tokenizers often have no pad token; padding positions are masked anyway, so EOS serves."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def count_tokens(examples: list[dict]) -> int:
    """Number of (unpadded) tokens in `examples`."""
    return sum(len(e["input_ids"]) for e in examples)


# ---- order of examples ----

def epoch_order(n: int, global_batch: int, seed: int, epoch: int, drawn: list[int] | None = None) -> list[int]:
    """A seeded permutation of range(n) for `epoch` (or `drawn`, the epoch's examples when they are drawn otherwise:
    sources.mixed_order), padded by wrapping around to a multiple of global_batch (as torch's DistributedSampler
    pads), so that every process gets equal batches and 2 processes × batch B see exactly the batches of 1 process
    × batch 2B."""
    if drawn is None:
        drawn = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    order, n = drawn, len(drawn)
    padded = math.ceil(n / global_batch) * global_batch
    return (order * math.ceil(padded / n))[:padded]


def micro_batch(order: list[int], step: int, batch_size: int, rank: int, world: int) -> list[int]:
    """Indices of micro-step `step` (within the epoch) for process `rank` of `world`, each taking `batch_size`."""
    start = step * batch_size * world + rank * batch_size
    return order[start: start + batch_size]


def load_labels(directory: str | Path) -> list[str] | None:
    """The label names saved in `directory`/labels.json, or None."""
    file = Path(directory) / "labels.json"
    return json.loads(file.read_text()) if file.is_file() else None
