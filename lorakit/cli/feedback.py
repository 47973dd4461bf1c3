"""How the command line answers a user's mistake: the library's user-facing errors as one line and an exit code,
never a traceback (a traceback is for lorakit's own defects)."""

from __future__ import annotations

import contextlib

import typer

from ..errors import ConfigError, DataError, Interrupted, TrainingError


@contextlib.contextmanager
def user_errors():
    """Turn the library's user-facing errors into a clean message and a non-zero exit, with no traceback."""
    try:
        yield
    except Interrupted as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(130)
    except (ConfigError, DataError, TrainingError, FileNotFoundError, ValueError) as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(1) from None
