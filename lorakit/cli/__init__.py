"""The `lorakit` command line: main (the app and most commands), chat, export and rank (their commands, registered
by main), options (flags made from settings), feedback (errors as messages). The top floor: it may import every
wing."""

from .main import app

__all__ = ["app"]
