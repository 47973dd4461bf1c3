"""The data of a run: the tables its settings name (or the shipped demo), every file, column, row and label checked
and tokenised for its task before any model is loaded.

Classification reads pandas tables. Causal-LM data goes through prepare.py (Hugging Face `datasets`: conversations
rendered with the chat template, Alpaca rows, or prompt/text columns; tokenised in --num-proc processes and cached
between runs), then through packing.py with --packing.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from functools import partial
from typing import Callable

import pandas as pd

from ..data import tables as data
from ..data.conversations import detect_format, set_chat_template
from ..data.packing import PackedCollator, attention_mode, pack
from ..data.prepare import Prepared, prepare
from ..data.sources import mixed_order, parse_weights, source_list, split_indices
from ..data.streams import mixed, stream
from ..errors import ConfigError, DataError
from ..io.models import load_tokenizer, resolve_model
from ..runtime.distributed import World, barrier
from .preference import run as preference
from .fit import seeded_batches
from .settings import TrainConfig
from .streams import Streamed
from .tasks import CAUSAL_LM, task_named

DEMO_SOURCES = ("demo headlines (train)", "demo headlines (eval)")


@dataclass
class Tables:
    """A run's training tables (one per source) and eval table, with their text columns and label names
    (classify)."""

    parts: list[pd.DataFrame]  # the training tables, one per --data source
    names: list[str]  # their sources, for messages (the files, or the demo's half)
    eval: pd.DataFrame | None
    eval_name: str | None
    text_columns: list[str]
    eval_text_columns: list[str]
    labels: list[str] | None


@dataclass
class RunData:
    """A run's tokenised examples and the tokenizer that made them."""

    train: object  # a list of examples, or a datasets.Dataset (causal-lm): rows of dicts by index
    eval: object  # the same, empty without eval data
    labels: list[str] | None  # classify: label names in id order
    tokenizer: object
    chat: bool = False  # conversations rendered with the tokenizer's chat template, saved with the adapter
    draw: Callable[[int], list[int]] | None = None  # --data-weights: an epoch's examples (sources.mixed_order)


def load_data(cfg: TrainConfig, world: World = World(), say=print) -> RunData:
    """The examples of run `cfg`, tokenised; every file, column, row and label checked (DataError / ConfigError)."""
    if task_named(cfg.task).labelled:
        tables = load_tables(cfg, say)
        say_empty_texts(tables, say)
        tokenizer = load_tokenizer(resolve_model(cfg.model))
        parts, evaluation = run_examples(tables, cfg, tokenizer)
        return RunData(concatenated(parts), evaluation, tables.labels, tokenizer, draw=mixer(parts, cfg))
    if task_named(cfg.task).preference:
        tokenizer = load_tokenizer(resolve_model(cfg.model))
        parts, evaluation, chat = preference.load_rows(cfg, tokenizer, say)
        parts, held = split_off(parts, source_list(cfg.data), cfg, say)
        return RunData(concatenated(parts), concatenated(held) if held else evaluation, None, tokenizer, chat,
                       mixer(parts, cfg))
    return causal_data(cfg, load_tokenizer(resolve_model(cfg.model)), world, say)


def load_tables(cfg: TrainConfig, say=None) -> Tables:
    """The tables of run `cfg`, every column and label checked (DataError / ConfigError); with --eval-split, the
    eval table is held out of the training tables (and `say` told so)."""
    if cfg.data is None:
        train_df, eval_df = data.demo_split(cfg.seed)
        parts, names, eval_name = [train_df], [DEMO_SOURCES[0]], DEMO_SOURCES[1]
        text_cols = eval_cols = ["text"]
    else:
        names = source_list(cfg.data)
        parts = [data.read_table(source) for source in names]
        eval_df = data.read_table(cfg.eval_data) if cfg.eval_data else None
        eval_name = cfg.eval_data
        text_cols = data.split_columns(cfg.text_column)
        eval_cols = data.split_columns(cfg.eval_text_column) or text_cols
        if not text_cols:
            raise ConfigError("--text-column is empty")
    for part, name in zip(parts, names):
        check_table(part, text_cols + other_columns(cfg), name)
    if eval_df is not None:
        check_table(eval_df, eval_cols + other_columns(cfg), eval_name)
    parts, held = split_off(parts, names, cfg, say)
    if held:
        eval_df, eval_name, eval_cols = concatenated(held), held_name(names, cfg.eval_split), text_cols
    labels = training_labels([part[cfg.label_column] for part in parts], names)
    if eval_df is not None:
        data.encode_labels(eval_df[cfg.label_column], labels, eval_name)
    return Tables(parts, names, eval_df, eval_name, text_cols, eval_cols, labels)


def training_labels(columns: list[pd.Series], names: list[str]) -> list[str]:
    """The label names of the training tables' label columns together (each checked for empty labels, its source
    named); a DataError if they hold fewer than 2."""
    for column, name in zip(columns, names):
        data.label_names(column, name)
    labels = data.label_names(concatenated(columns), names[0] if len(names) == 1 else "the --data sources")
    if len(labels) < 2:
        raise data.DataError(f"{' and '.join(names)}: column {columns[0].name!r} holds a single label {labels}; "
                             f"classification needs at least 2")
    return labels


def say_empty_texts(tables: Tables, say) -> None:
    """Say how many rows of each table have an empty text (rows counted from 1, the first data row): they train on
    nothing but the head's bias, which is rarely what was meant."""
    tables_named = [(df, tables.text_columns, name) for df, name in zip(tables.parts, tables.names)]
    for df, columns, source in tables_named + [(tables.eval, tables.eval_text_columns, tables.eval_name)]:
        if df is None:
            continue
        empty = [i + 1 for i, text in enumerate(data.texts(df, columns)) if not text]
        if empty:
            rows = ", ".join(map(str, empty[:5])) + (" ..." if len(empty) > 5 else "")
            say(f"{source}: {len(empty)} of {len(df)} rows have an empty text (row(s) {rows})")


# ---- several sources: held-out eval rows, concatenation, weights ----

@functools.singledispatch
def select_rows(part, indices: list[int]):
    """The rows of `part` at `indices`, as the same kind of table: a datasets.Dataset here."""
    return part.select(indices)


@select_rows.register
def _(part: pd.DataFrame, indices: list[int]):
    return part.iloc[indices].reset_index(drop=True)


@select_rows.register
def _(part: list, indices: list[int]):
    return [part[i] for i in indices]


def concatenated(parts: list):
    """The tables of `parts` one after another, as one of their kind (DataFrames, lists, datasets.Datasets)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if isinstance(first, (pd.DataFrame, pd.Series)):
        return pd.concat(parts, ignore_index=True)
    if isinstance(first, list):
        return [row for part in parts for row in part]
    import datasets

    return datasets.concatenate_datasets(parts)


def split_off(parts: list, names: list[str], cfg: TrainConfig, say=None) -> tuple[list, list | None]:
    """(training parts, held-out parts: None without --eval-split). The share is held out of each source
    (sources.split_indices); a DataError when a source would have no training rows left, or no source gives any."""
    if not cfg.eval_split:
        return parts, None
    kept, held = [], []
    for i, (part, name) in enumerate(zip(parts, names)):
        train_rows, eval_rows = split_indices(len(part), cfg.eval_split, cfg.seed, i)
        if not train_rows:
            raise DataError(f"{name}: --eval-split {cfg.eval_split} holds out all its {len(part)} examples, leaving "
                            f"none to train on; use a smaller share")
        kept.append(select_rows(part, train_rows))
        held.append(select_rows(part, eval_rows))
    if not sum(map(len, held)):
        sizes = ", ".join(f"{name}: {len(part)}" for part, name in zip(parts, names))
        raise DataError(f"--eval-split {cfg.eval_split} holds out no example ({sizes} examples; a source gives "
                        f"round(share × its size)); use a larger share or give --eval-data")
    if say:
        say(f"eval data: {held_name(names, cfg.eval_split)}: {sum(map(len, held))} examples, not trained on")
    return kept, held


def held_name(names: list[str], share: float) -> str:
    """What held-out eval data is called in messages."""
    return f"--eval-split {share} of {' and '.join(names)}"


def mixer(parts: list, cfg: TrainConfig) -> Callable[[int], list[int]] | None:
    """With --data-weights, the draw of each epoch's examples from the sources (sources.mixed_order); else None:
    the sources concatenated, each counting by its size."""
    weights = parse_weights(cfg.data_weights, len(parts)) if cfg.data is not None else None
    return None if weights is None else partial(mixed_order, [len(p) for p in parts], weights, cfg.seed)


def check_table(df: pd.DataFrame, columns: list[str], source: str) -> None:
    """Raise DataError for a missing column (saying so when the table is conversation data, which a language model
    trains on), or a column holding lists or dicts (their Python repr is no text)."""
    try:
        data.check_columns(df, columns, source)
    except DataError as e:
        found = detect_format(df.columns)
        if found is None:
            raise
        raise DataError(f"{e}; these are {found.name} conversations: train a language model on them with --task "
                        f"{CAUSAL_LM.name}") from None
    for col in columns:
        found = df[col].map(lambda v: isinstance(v, (list, dict)))
        if found.any():
            row = int(found.to_numpy().nonzero()[0][0])
            raise data.DataError(f"{source}: row {row + 1}: column {col!r} holds a {type(df[col].iloc[row]).__name__}, "
                                 f"not text")


def other_columns(cfg: TrainConfig) -> list[str]:
    """The columns besides the text that run `cfg` reads: the label (a labelled task) or the prompt, if any."""
    if task_named(cfg.task).labelled:
        return [cfg.label_column]
    return [cfg.prompt_column] if cfg.prompt_column else []


def examples(df: pd.DataFrame, cols: list[str], cfg: TrainConfig, tokenizer, labels: list[str] | None,
             source: str) -> list[dict]:
    """Tokenised classification examples of `df`."""
    ids = data.encode_labels(df[cfg.label_column], labels, source)
    return data.classification_examples(tokenizer, data.texts(df, cols), ids, cfg.max_length)


def run_examples(tables: Tables, cfg: TrainConfig, tokenizer) -> tuple[list[list[dict]], list[dict]]:
    """(training examples, one list per source; eval examples: none without eval data), tokenised for
    classification."""
    train = [examples(part, tables.text_columns, cfg, tokenizer, tables.labels, name)
             for part, name in zip(tables.parts, tables.names)]
    if tables.eval is None:
        return train, []
    return train, examples(tables.eval, tables.eval_text_columns, cfg, tokenizer, tables.labels, tables.eval_name)


# ---- causal-lm ----

def causal_data(cfg: TrainConfig, tokenizer, world: World = World(), say=print) -> RunData:
    """Causal-LM examples of run `cfg` through prepare(), each source on its own (its format recognised, its rows
    checked and numbered), then held out (--eval-split), concatenated and packed (--packing); the summary said.
    Under torchrun the main process tokenises first and the others then read its cache."""
    if cfg.chat_template:
        set_chat_template(tokenizer, cfg.chat_template)
    if cfg.streaming:
        return streamed_data(cfg, tokenizer, world, say)
    sources, eval_source = causal_sources(cfg)
    names = [name for _, name in sources]
    text_columns = data.split_columns(cfg.text_column)
    with main_first(world):
        parts = [causal_examples(source, name, text_columns, cfg, tokenizer, len(sources) > 1)
                 for source, name in sources]
        evaluation = None if eval_source is None else causal_examples(
            *eval_source, data.split_columns(cfg.eval_text_column) or text_columns, cfg, tokenizer)
        kept, held = split_off([part.dataset for part in parts], names, cfg, say)
        train = concatenated(kept)
        rows = pack(train, cfg.max_length) if cfg.packing else train
    say_training_data(parts, names, len(train), cfg, f"; packed into {len(rows)} row{'s' * (len(rows) != 1)} "
                                                     f"of up to {cfg.max_length} tokens" if cfg.packing else "", say)
    if evaluation is not None:
        say(f"eval data: {evaluation.summary()}")
    chat = any(part.format != "text" for part in parts)
    if cfg.chat_template and not chat:
        raise ConfigError(f"--chat-template is for conversation data; {' and '.join(names)} hold(s) plain text")
    return RunData(rows, concatenated(held) if held else evaluation.dataset if evaluation is not None else [], None,
                   tokenizer, chat, mixer(kept, cfg))


def streamed_data(cfg: TrainConfig, tokenizer, world: World, say) -> RunData:
    """--streaming: the training examples as a stream (data/streams.py: each source's format recognised from its
    first row, its rows checked as they come), the eval data read whole."""
    names, text_columns = source_list(cfg.data), data.split_columns(cfg.text_column)
    sources = [stream(source, tokenizer, cfg.max_length, cfg.overlong, text_columns, cfg.prompt_column, cfg.seed,
                      len(names) > 1) for source in names]
    weights = parse_weights(cfg.data_weights, len(names))
    with main_first(world):
        evaluation = None if cfg.eval_data is None else causal_examples(
            cfg.eval_data, cfg.eval_data, data.split_columns(cfg.eval_text_column) or text_columns, cfg, tokenizer)
    formats = ", ".join(f"{s.name} ({s.format})" for s in sources)
    mix = f", mixed {':'.join(f'{w:g}' for w in weights)}" if weights else ", one after another" if len(
        sources) > 1 else ""
    say(f"training data: streamed from {formats}{mix}")
    if evaluation is not None:
        say(f"eval data: {evaluation.summary()}")
    chat = any(s.format != "text" for s in sources)
    if cfg.chat_template and not chat:
        raise ConfigError(f"--chat-template is for conversation data; {' and '.join(names)} hold(s) plain text")
    examples = Streamed(partial(mixed, sources, weights, cfg.seed))
    return RunData(examples, evaluation.dataset if evaluation is not None else [], None, tokenizer, chat)


def causal_sources(cfg: TrainConfig) -> tuple[list[tuple[object, str]], tuple[object, str] | None]:
    """([(training source, its name)], (eval source, its name) or None): the --data files or datasets, or the demo's
    halves."""
    if cfg.data is None:
        train, evaluation = data.demo_split(cfg.seed)
        return [(train, DEMO_SOURCES[0])], (evaluation, DEMO_SOURCES[1])
    return [(source, source) for source in source_list(cfg.data)], (cfg.eval_data, cfg.eval_data) if (
        cfg.eval_data) else None


def say_training_data(parts: list[Prepared], names: list[str], examples: int, cfg: TrainConfig, packed: str,
                      say) -> None:
    """The training data's summary: one line for one source; for several, a line per source and one for the mix."""
    if len(parts) == 1:
        say(f"training data: {parts[0].summary()}{packed}")
        return
    for part, name in zip(parts, names):
        say(f"training data: {name}: {part.summary()}")
    weights = parse_weights(cfg.data_weights, len(parts))
    mix = f"mixed {':'.join(f'{w:g}' for w in weights)} per epoch" if weights else "concatenated"
    say(f"training data: {examples} examples from {len(parts)} sources, {mix}{packed}")


def causal_examples(source, name: str, text_columns: list[str], cfg: TrainConfig, tokenizer,
                    one_of_several: bool = False) -> Prepared:
    """prepare() with the run's settings; a DataError if no example is left. With several sources, --prompt-column
    and --text-column are those of the prompt/text sources among them (conversations have their own)."""
    prepared = prepare(source, tokenizer, cfg.max_length, cfg.overlong, text_columns, cfg.prompt_column,
                       num_proc=cfg.num_proc, name=name, one_of_several=one_of_several)
    if len(prepared.dataset) == 0:
        raise data.DataError(f"{name}: no example left ({prepared.summary()}); raise --max-length or use "
                             f"--overlong truncate")
    return prepared


@contextlib.contextmanager
def main_first(world: World):
    """The main process runs the body first (writing `datasets`' cache), the others after it (reading it)."""
    if not world.main:
        barrier(world)
    yield
    if world.main:
        barrier(world)


def train_collator(run_data: RunData, model, cfg: TrainConfig):
    """The training batch builder: packed rows (attention kept inside each example, the model's KV cache turned off
    as packing needs) or examples padded to the longest."""
    if cfg.packing:
        return PackedCollator(run_data.tokenizer.pad_token_id, attention_mode(model))
    if task_named(cfg.task).preference:
        return preference.collator(cfg, run_data.tokenizer.pad_token_id)
    return task_named(cfg.task).collator(run_data.tokenizer)


def training_batches(run_data: RunData, model, cfg: TrainConfig, world: World = World(), **task_parts):
    """fit()'s batches: a stream's in stream order (--streaming), else seeded epochs (weighted with --data-weights).
    `task_parts`: a task's own `tokens` and `previous` (seeded_batches; preference.batch_parts)."""
    collate = train_collator(run_data, model, cfg)
    if cfg.streaming:
        return run_data.train.batches(collate, cfg.batch_size, world)
    return seeded_batches(run_data.train, collate, cfg.batch_size, cfg.seed, world, run_data.draw, **task_parts)
