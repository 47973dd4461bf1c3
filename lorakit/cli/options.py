"""`lorakit train`'s flags, made from TrainConfig's fields: each setting is declared once (its default, help line and
help panel in training/settings.py) and becomes a flag here. A flag left out is None, so that the config file, the
resumed run's settings or the demo's decide it; booleans come as --x/--no-x, so that a flag can turn off what a
config file turned on."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path
from typing import Optional

import typer

from ..training.settings import RENAMED, TrainConfig

# typer's option type for each field type (TrainConfig's annotations are strings under `from __future__ import
# annotations`; get_type_hints resolves them). --targets is read as a string ("query,value" or "all-linear").
OPTION_TYPES = {bool: Optional[bool], int: Optional[int], float: Optional[float], str: Optional[str]}


def _option_type(hint) -> type:
    types = [t for t in typing.get_args(hint) or (hint,) if t is not type(None)]
    return OPTION_TYPES.get(types[0], Optional[str]) if len(types) == 1 else Optional[str]


def _default_text(value) -> str:
    return "" if value is None or value is False else f" (default: {value})"


def train_parameters() -> list[inspect.Parameter]:
    """--config, then one keyword parameter with its typer.Option per TrainConfig field, in its help panel."""
    hints = typing.get_type_hints(TrainConfig)
    params = [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path], default=typer.Option(
        None, "--config", help="YAML file of settings (keys as the flags, dashes or underscores); flags given on the "
        "command line win.", rich_help_panel="Config"))]
    for field in dataclasses.fields(TrainConfig):
        meta, kind = field.metadata, _option_type(hints[field.name])
        flag = meta.get("flag") or "--" + field.name.replace("_", "-")
        names = [f"{flag}/--no-{flag[2:]}"] if kind is Optional[bool] else [flag]
        option = typer.Option(None, *names, help=meta["help"] + _default_text(field.default),
                              rich_help_panel=meta["group"], metavar="" if kind is Optional[bool] else None)
        params.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind))
    for old, new in RENAMED.items():  # former flags still work (settings.setting_names says so)
        params.append(inspect.Parameter(old, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[bool],
                                        default=typer.Option(None, f"--{old}", hidden=True)))
    return params


def given(values: dict) -> dict:
    """The flags given on the command line (None: not given), --config left out."""
    return {k: v for k, v in values.items() if k != "config" and v is not None}


def with_train_flags(command):
    """`command(config, flags)` as a typer command taking --config and every TrainConfig flag."""
    def run(**values):
        return command(values.get("config"), given(values))

    run.__signature__ = inspect.Signature(train_parameters())
    run.__doc__, run.__name__ = command.__doc__, command.__name__
    return run
