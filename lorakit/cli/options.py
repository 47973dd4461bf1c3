"""`lorakit train`'s flags, made from TrainConfig's fields: each setting is declared once (its default, help line and
help panel in training/settings.py) and becomes a flag here. A flag left out is None, so that the config file, the
resumed run's settings or the demo's decide it; booleans come as --x/--no-x, so that a flag can turn off what a
config file turned on (the other commands' booleans too: `switch`)."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path
from typing import Optional

import typer

from ..errors import ConfigError
from ..training.settings import RENAMED, TrainConfig

# typer's option type for each field type (TrainConfig's annotations are strings under `from __future__ import
# annotations`; get_type_hints resolves them). --targets is read as a string ("query,value" or "all-linear").
OPTION_TYPES = {bool: Optional[bool], int: Optional[int], float: Optional[float], str: Optional[str]}


def _option_type(hint) -> type:
    types = [t for t in typing.get_args(hint) or (hint,) if t is not type(None)]
    return OPTION_TYPES.get(types[0], Optional[str]) if len(types) == 1 else Optional[str]


def _default_text(value) -> str:
    return "" if value is None or value is False else f" (default: {value})"


def field_parameters(cls) -> list[inspect.Parameter]:
    """One keyword parameter with its typer.Option per field of dataclass `cls` (fields made with settings.setting):
    left out, a flag is None; booleans are --x/--no-x; a dict field is a repeatable NAME=VALUE flag, and so is a
    field declared with `many` (--data a.jsonl --data b.jsonl: a list)."""
    hints = typing.get_type_hints(cls)
    params = []
    for field in dataclasses.fields(cls):
        meta = field.metadata
        repeated = typing.get_origin(hints[field.name]) is dict or meta.get("many")
        kind = list[str] if repeated else _option_type(hints[field.name])
        flag = meta.get("flag") or "--" + field.name.replace("_", "-")
        names = [f"{flag}/--no-{flag[2:]}"] if kind is Optional[bool] else [flag]
        option = typer.Option(None, *names, help=meta["help"] + _default_text(field.default), envvar=meta["envvar"],
                              rich_help_panel=meta["group"], metavar=_metavar(kind),
                              show_envvar=meta["envvar"] is not None)
        params.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=Optional[kind] if kind is list[str] else kind))
    return params


def switch(flag: str, help: str):
    """A hand-written command's boolean flag, off by default, as train's and serve's are made: --x/--no-x, shown
    without a value in --help (typer would show "<bool>")."""
    return typer.Option(False, f"{flag}/--no-{flag[2:]}", help=help, metavar="")


def _metavar(kind) -> str | None:
    # A boolean flag takes no value; a repeatable one takes one value each time it is given (not "<list[str]>").
    return {Optional[bool]: "", list[str]: "<str>"}.get(kind)


def train_parameters() -> list[inspect.Parameter]:
    """--config, then every TrainConfig field's flag, then the former flags (settings.RENAMED), hidden."""
    config = typer.Option(None, "--config", help="YAML file of settings (keys as the flags, dashes or underscores); "
                          "flags given on the command line win.", rich_help_panel="Config")
    params = [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path], default=config)]
    params += field_parameters(TrainConfig)
    for old in RENAMED:  # former flags still work (settings.setting_names says so)
        params.append(inspect.Parameter(old, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[bool],
                                        default=typer.Option(None, f"--{old}", hidden=True)))
    return params


def pairs(items: list[str], flag: str) -> dict[str, str]:
    """["news=runs/news", ...] -> {"news": "runs/news"}; ConfigError naming the flag for an item without NAME=."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ConfigError(f"{flag} {item!r}: expected NAME=DIR")
        out[name] = value
    return out


def given(values: dict) -> dict:
    """The flags given on the command line (None: not given)."""
    return {k: v for k, v in values.items() if v is not None}


def with_flags(parameters: list[inspect.Parameter]):
    """Decorate `command(flags: dict)` into a typer command taking `parameters`: it gets the flags given."""
    def wrap(command):
        def run(**values):
            return command(given(values))

        run.__signature__ = inspect.Signature(parameters)
        run.__doc__, run.__name__ = command.__doc__, command.__name__
        return run
    return wrap
