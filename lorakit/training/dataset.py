"""The data of a run: the tables its settings name (or the shipped demo), every file, column, row and label checked
and tokenised for its task before any model is loaded.

Classification reads pandas tables. Causal-LM data goes through prepare.py (Hugging Face `datasets`: conversations
rendered with the chat template, Alpaca rows, or prompt/text columns; tokenised in --num-proc processes and cached
between runs), then through packing.py with --packing.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pandas as pd

from ..data import tables as data
from ..data.conversations import detect_format, set_chat_template
from ..data.packing import PackedCollator, attention_mode, pack
from ..data.prepare import Prepared, prepare
from ..errors import ConfigError, DataError
from ..io.models import load_tokenizer, resolve_model
from ..runtime.distributed import World, barrier
from .preference import run as preference
from .settings import TrainConfig
from .tasks import CAUSAL_LM, task_named

DEMO_SOURCES = ("demo headlines (train)", "demo headlines (eval)")


@dataclass
class Tables:
    """A run's training and eval tables with their text columns and label names (classify)."""

    train: pd.DataFrame
    eval: pd.DataFrame | None
    text_columns: list[str]
    eval_text_columns: list[str]
    labels: list[str] | None
    sources: tuple[str, str | None]  # names for messages: the files, or the demo's halves


@dataclass
class RunData:
    """A run's tokenised examples and the tokenizer that made them."""

    train: object  # a list of examples, or a datasets.Dataset (causal-lm): rows of dicts by index
    eval: object  # the same, empty without eval data
    labels: list[str] | None  # classify: label names in id order
    tokenizer: object
    chat: bool = False  # conversations rendered with the tokenizer's chat template, saved with the adapter


def load_data(cfg: TrainConfig, world: World = World(), say=print) -> RunData:
    """The examples of run `cfg`, tokenised; every file, column, row and label checked (DataError / ConfigError)."""
    if task_named(cfg.task).labelled:
        tables = load_tables(cfg)
        say_empty_texts(tables, say)
        tokenizer = load_tokenizer(resolve_model(cfg.model))
        train, evaluation = run_examples(tables, cfg, tokenizer)
        return RunData(train, evaluation, tables.labels, tokenizer)
    if task_named(cfg.task).preference:
        tokenizer = load_tokenizer(resolve_model(cfg.model))
        train, evaluation, chat = preference.load_rows(cfg, tokenizer, say)
        return RunData(train, evaluation, None, tokenizer, chat)
    return causal_data(cfg, load_tokenizer(resolve_model(cfg.model)), world, say)


def load_tables(cfg: TrainConfig) -> Tables:
    """The tables of run `cfg`, every column and label checked (DataError / ConfigError)."""
    if cfg.data is None:
        train_df, eval_df = data.demo_split(cfg.seed)
        sources = DEMO_SOURCES
        text_cols = eval_cols = ["text"]
    else:
        train_df = data.read_table(cfg.data)
        eval_df = data.read_table(cfg.eval_data) if cfg.eval_data else None
        sources = (cfg.data, cfg.eval_data)
        text_cols = data.split_columns(cfg.text_column)
        eval_cols = data.split_columns(cfg.eval_text_column) or text_cols
        if not text_cols:
            raise ConfigError("--text-column is empty")
    check_table(train_df, text_cols + other_columns(cfg), sources[0])
    if eval_df is not None:
        check_table(eval_df, eval_cols + other_columns(cfg), sources[1])
    labels = None
    if task_named(cfg.task).labelled:
        labels = data.label_names(train_df[cfg.label_column], sources[0])
        if len(labels) < 2:
            raise data.DataError(f"{sources[0]}: column {cfg.label_column!r} holds a single label {labels}; "
                                 f"classification needs at least 2")
        if eval_df is not None:
            data.encode_labels(eval_df[cfg.label_column], labels, sources[1])
    return Tables(train_df, eval_df, text_cols, eval_cols, labels, sources)


def say_empty_texts(tables: Tables, say) -> None:
    """Say how many rows of each table have an empty text (rows counted from 1, the first data row): they train on
    nothing but the head's bias, which is rarely what was meant."""
    for df, columns, source in ((tables.train, tables.text_columns, tables.sources[0]),
                                (tables.eval, tables.eval_text_columns, tables.sources[1])):
        if df is None:
            continue
        empty = [i + 1 for i, text in enumerate(data.texts(df, columns)) if not text]
        if empty:
            rows = ", ".join(map(str, empty[:5])) + (" ..." if len(empty) > 5 else "")
            say(f"{source}: {len(empty)} of {len(df)} rows have an empty text (row(s) {rows})")


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


def run_examples(tables: Tables, cfg: TrainConfig, tokenizer) -> tuple[list[dict], list[dict]]:
    """(training examples, eval examples: none without eval data), tokenised for classification."""
    train = examples(tables.train, tables.text_columns, cfg, tokenizer, tables.labels, cfg.data or "demo")
    if tables.eval is None:
        return train, []
    return train, examples(tables.eval, tables.eval_text_columns, cfg, tokenizer, tables.labels,
                           cfg.eval_data or "demo")


# ---- causal-lm ----

def causal_data(cfg: TrainConfig, tokenizer, world: World = World(), say=print) -> RunData:
    """Causal-LM examples of run `cfg` through prepare() (packed with --packing), its summary said. Under torchrun
    the main process tokenises first and the others then read its cache."""
    if cfg.chat_template:
        set_chat_template(tokenizer, cfg.chat_template)
    sources = (cfg.data, cfg.eval_data) if cfg.data else data.demo_split(cfg.seed)
    names = (cfg.data, cfg.eval_data) if cfg.data else DEMO_SOURCES
    text_columns = data.split_columns(cfg.text_column)
    with main_first(world):
        train = causal_examples(sources[0], names[0], text_columns, cfg, tokenizer)
        evaluation = None if sources[1] is None else causal_examples(
            sources[1], names[1], data.split_columns(cfg.eval_text_column) or text_columns, cfg, tokenizer)
        rows = pack(train.dataset, cfg.max_length) if cfg.packing else train.dataset
    packed = f"; packed into {len(rows)} row{'s' * (len(rows) != 1)} of up to {cfg.max_length} tokens" if cfg.packing else ""
    say(f"training data: {train.summary()}{packed}")
    if evaluation is not None:
        say(f"eval data: {evaluation.summary()}")
    chat = train.format != "text"
    if cfg.chat_template and not chat:
        raise ConfigError(f"--chat-template is for conversation data; {names[0]} holds plain text")
    return RunData(rows, evaluation.dataset if evaluation is not None else [], None, tokenizer, chat)


def causal_examples(source, name: str, text_columns: list[str], cfg: TrainConfig, tokenizer) -> Prepared:
    """prepare() with the run's settings; a DataError if no example is left."""
    prepared = prepare(source, tokenizer, cfg.max_length, cfg.overlong, text_columns, cfg.prompt_column,
                       num_proc=cfg.num_proc, name=name)
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
