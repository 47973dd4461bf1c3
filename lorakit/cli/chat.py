"""`lorakit chat`: an interactive conversation with a chat-trained causal-LM adapter in the terminal. The whole
conversation is kept and sent through the chat template on every turn; answers stream as they are generated.

Commands at the prompt: /reset (start over, keeping the system prompt), /history (the conversation as JSON),
/exit (or Ctrl-D).
"""

from __future__ import annotations

import json
from typing import Callable

from ..serving.generation import Sampling, stream

PROMPT, ANSWER = "you> ", "assistant> "


def chat_loop(model, tokenizer, sampling: Sampling, system: str | None = None,
              read: Callable[[str], str] = input, write: Callable[..., None] = print) -> list[dict]:
    """Read user turns with `read(prompt)` until /exit or end of input, answer each with the whole conversation so
    far, writing the answer piece by piece with `write`; returns the conversation."""
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    while True:
        try:
            line = read(PROMPT).strip()
        except EOFError:
            write("")
            return history
        if line == "/exit":
            return history
        if line == "/reset":
            history = list(start)
            write("(conversation cleared)")
        elif line == "/history":
            write(json.dumps(history, ensure_ascii=False))
        elif line:
            history.append({"role": "user", "content": line})
            history.append({"role": "assistant", "content": _answer(model, tokenizer, history, sampling, write)})


def _answer(model, tokenizer, history: list[dict], sampling: Sampling, write) -> str:
    write(ANSWER, end="", flush=True)
    reply = stream(model, tokenizer, history, sampling, lambda piece: write(piece, end="", flush=True), chat=True)
    write("", flush=True)
    return reply.strip()
