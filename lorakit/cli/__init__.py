"""The `lorakit` command line (main) and its interactive chat (chat): the top floor, which may import every wing."""

from .main import app

__all__ = ["app"]
