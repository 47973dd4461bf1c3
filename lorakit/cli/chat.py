"""`lorakit chat`: an interactive conversation with a chat-trained causal-LM adapter in the terminal. The whole
conversation is kept and sent through the chat template on every turn; answers stream as they are generated.

Commands at the prompt (COMMANDS): /reset (start over, keeping the system prompt), /history (the conversation so
far, one turn per line), /exit (or Ctrl-D). Any other line starting with "/" is answered with the commands, never
sent to the model.
"""

from __future__ import annotations

from typing import Callable

from ..serving.generation import Sampling, stream

PROMPT, ANSWER = "you> ", "assistant> "
SPEAKERS = {"system": "system> ", "user": PROMPT, "assistant": ANSWER}


def _reset(history: list[dict], start: list[dict], write) -> list[dict]:
    write("(conversation cleared)")
    return list(start)


def _history(history: list[dict], start: list[dict], write) -> list[dict]:
    for turn in history:
        write(f"{SPEAKERS.get(turn['role'], turn['role'] + '> ')}{turn['content']}")
    if not history:
        write("(no conversation yet)")
    return history


# /command -> (what it does to the conversation, its help line); /exit ends the loop itself.
COMMANDS = {"/reset": (_reset, "start over"), "/history": (_history, "show the conversation"),
            "/exit": (None, "leave (or Ctrl-D)")}


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
        if line.startswith("/"):
            history = _command(line, history, start, write)
        elif line:
            history.append({"role": "user", "content": line})
            history.append({"role": "assistant", "content": _answer(model, tokenizer, history, sampling, write)})


def _command(line: str, history: list[dict], start: list[dict], write) -> list[dict]:
    action, _ = COMMANDS.get(line.split()[0], (None, None))
    if action is None:
        write(f"unknown command {line.split()[0]!r}; commands: " + ", ".join(f"{name} ({text})" for name, (_, text)
                                                                        in COMMANDS.items()))
        return history
    return action(history, start, write)


def _answer(model, tokenizer, history: list[dict], sampling: Sampling, write) -> str:
    write(ANSWER, end="", flush=True)
    reply = stream(model, tokenizer, history, sampling, lambda piece: write(piece, end="", flush=True), chat=True)
    write("", flush=True)
    return reply.strip()
