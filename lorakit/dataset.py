"""The data of a run: the tables its settings name (or the shipped demo), every column and label checked before any
model is loaded, then tokenised for its task."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from . import data
from .settings import ConfigError, TrainConfig


@dataclass
class Tables:
    """A run's training and eval tables with their text columns and label names (classify)."""

    train: pd.DataFrame
    eval: pd.DataFrame | None
    text_columns: list[str]
    eval_text_columns: list[str]
    labels: list[str] | None
    sources: tuple[str, str | None]  # names for messages: the files, or the demo's halves


def load_tables(cfg: TrainConfig) -> Tables:
    """The tables of run `cfg`, every column and label checked (DataError / ConfigError)."""
    if cfg.data is None:
        train_df, eval_df = data.demo_split(cfg.seed)
        sources = ("demo headlines (train)", "demo headlines (eval)")
        text_cols = eval_cols = ["text"]
    else:
        train_df = data.read_table(cfg.data)
        eval_df = data.read_table(cfg.eval_data) if cfg.eval_data else None
        sources = (cfg.data, cfg.eval_data)
        text_cols = data.split_columns(cfg.text_column)
        eval_cols = data.split_columns(cfg.eval_text_column) or text_cols
        if not text_cols:
            raise ConfigError("--text-column is empty")
    data.check_columns(train_df, text_cols + other_columns(cfg), sources[0])
    if eval_df is not None:
        data.check_columns(eval_df, eval_cols + other_columns(cfg), sources[1])
    labels = None
    if cfg.task == "classify":
        labels = data.label_names(train_df[cfg.label_column], sources[0])
        if len(labels) < 2:
            raise data.DataError(f"{sources[0]}: column {cfg.label_column!r} holds a single label {labels}; "
                                 f"classification needs at least 2")
        if eval_df is not None:
            data.encode_labels(eval_df[cfg.label_column], labels, sources[1])
    return Tables(train_df, eval_df, text_cols, eval_cols, labels, sources)


def other_columns(cfg: TrainConfig) -> list[str]:
    """The columns besides the text that run `cfg` reads: the label (classify) or the prompt (causal-lm, if any)."""
    if cfg.task == "classify":
        return [cfg.label_column]
    return [cfg.prompt_column] if cfg.prompt_column else []


def examples(df: pd.DataFrame, cols: list[str], cfg: TrainConfig, tokenizer, labels: list[str] | None,
             source: str) -> list[dict]:
    """Tokenised examples of `df` for the run's task."""
    text = data.texts(df, cols)
    if cfg.task == "classify":
        ids = data.encode_labels(df[cfg.label_column], labels, source)
        return data.classification_examples(tokenizer, text, ids, cfg.max_length)
    prompts = data.texts(df, [cfg.prompt_column]) if cfg.prompt_column else None
    return data.causal_examples(tokenizer, text, prompts, cfg.max_length)


def run_examples(tables: Tables, cfg: TrainConfig, tokenizer) -> tuple[list[dict], list[dict]]:
    """(training examples, eval examples: none without eval data), tokenised."""
    train = examples(tables.train, tables.text_columns, cfg, tokenizer, tables.labels, cfg.data or "demo")
    if tables.eval is None:
        return train, []
    return train, examples(tables.eval, tables.eval_text_columns, cfg, tokenizer, tables.labels,
                           cfg.eval_data or "demo")
