"""`lorakit chat` (registered by cli/main.py): an interactive conversation with a chat-trained causal-LM adapter in
the terminal. The whole conversation is kept and sent through the chat template on every turn; answers stream as
they are generated.

A conversation longer than the model takes (`max_length` tokens as rendered) loses its oldest exchanges, the system
prompt kept, saying so; a single message too long for it is not sent.

Commands at the prompt (COMMANDS): /reset (start over, keeping the system prompt), /history (the conversation so
far, one turn per line), /exit (or Ctrl-D). Any other line starting with "/" is answered with the commands, never
sent to the model.
"""

from __future__ import annotations

from typing import Callable, Optional

import typer

from ..errors import ConfigError
from ..io.models import positions
from ..serving.generation import Sampling, prompt_tokens, stream, use_chat_template
from ..training.tasks import CAUSAL_LM
from ..training.trained import load_trained
from .feedback import user_errors

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
              read: Callable[[str], str] = input, write: Callable[..., None] = print,
              max_length: int | None = None) -> list[dict]:
    """Read user turns with `read(prompt)` until /exit or end of input, answer each with the conversation so far
    (its last `max_length` tokens' worth of exchanges, when given), writing the answer piece by piece with `write`;
    returns the conversation."""
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
            history = _fit(history + [{"role": "user", "content": line}], len(start), tokenizer, max_length, write)
            if history[-1]["role"] == "user":
                history.append({"role": "assistant", "content": _answer(model, tokenizer, history, sampling, write)})


def _command(line: str, history: list[dict], start: list[dict], write) -> list[dict]:
    action, _ = COMMANDS.get(line.split()[0], (None, None))
    if action is None:
        write(f"unknown command {line.split()[0]!r}; commands: " + ", ".join(f"{name} ({text})" for name, (_, text)
                                                                        in COMMANDS.items()))
        return history
    return action(history, start, write)


def _fit(history: list[dict], kept: int, tokenizer, max_length: int | None, write) -> list[dict]:
    """`history` (ending with the new user turn) without its oldest exchanges until its prompt fits `max_length`
    tokens; the first `kept` turns (the system prompt) stay. A user turn that does not fit alone is taken back."""
    if max_length is None:
        return history
    alone = prompt_tokens(tokenizer, history[:kept] + history[-1:], chat=True)
    if alone > max_length:
        write(f"(that message takes {alone} tokens with the chat template; the model is given at most {max_length} "
              "(--max-length): not sent)")
        return history[:-1]
    dropped = 0
    while prompt_tokens(tokenizer, history, chat=True) > max_length:
        history = history[:kept] + history[kept + 2:]  # the oldest exchange: a user turn and its answer
        dropped += 2
    if dropped:
        write(f"(the oldest {dropped} turns no longer fit --max-length {max_length} and were dropped)")
    return history


def _answer(model, tokenizer, history: list[dict], sampling: Sampling, write) -> str:
    write(ANSWER, end="", flush=True)
    reply = stream(model, tokenizer, history, sampling, lambda piece: write(piece, end="", flush=True), chat=True)
    write("", flush=True)
    return reply.strip()


def chat(
    adapter: Optional[str] = typer.Option(None, help="Adapter directory (a run of lorakit train on conversations)."),
    model: Optional[str] = typer.Option(None, help="Base model (default: the adapter's base model)"),
    system: Optional[str] = typer.Option(None, help="A system prompt, kept at the start of the conversation."),
    max_new_tokens: int = typer.Option(256, help="Most tokens of one answer (at most half the model's positions when "
                                       "more would fill them)."),
    temperature: float = typer.Option(0.0, help="Sampling temperature; 0: greedy."),
    top_p: float = typer.Option(1.0, help="Sample from the likeliest tokens holding this much probability."),
    seed: Optional[int] = typer.Option(None, help="Seed of the sampling."),
    chat_template: Optional[str] = typer.Option(None, help="A Jinja chat template file (default: the adapter's, "
                                                "else the tokenizer's own)."),
    max_length: Optional[int] = typer.Option(None, min=1, help="Most tokens of the conversation given to the model; the "
                                             "oldest exchanges are dropped to fit (default: the model's positions "
                                             "less --max-new-tokens)."),
):
    """Chat with a causal-LM adapter in the terminal; the conversation is kept and answers stream as they come.
    At the prompt: /reset starts over, /history prints the conversation, /exit (or Ctrl-D) leaves."""
    with user_errors():
        if adapter is None and model is None:
            raise ConfigError("give --adapter DIR (or --model M to chat with a base model)")
        Sampling(max_new_tokens, temperature, top_p, seed)  # checked before the model loads
        net, tokenizer, task, _ = load_trained(model, adapter, None if adapter else CAUSAL_LM.name)
        if not task.generates:
            raise ConfigError(f"{adapter} is a {task.name} adapter; lorakit chat needs a language model's")
        if not use_chat_template(tokenizer, adapter, chat_template) and not tokenizer.chat_template:
            raise ConfigError("no chat template: the adapter was not trained on conversations and the tokenizer has "
                              "none; pass --chat-template FILE")
        answer, length = _chat_lengths(net, max_new_tokens, max_length)
        typer.echo("chat: /reset starts over, /history shows the conversation, /exit or Ctrl-D leaves")
        chat_loop(net, tokenizer, Sampling(answer, temperature, top_p, seed), system=system, max_length=length)


def _chat_lengths(net, max_new_tokens: int, max_length: int | None) -> tuple[int, int | None]:
    """chat's answer and conversation lengths within the model's positions, saying where they are cut: an answer that
    would fill them gets half, the conversation what the answer leaves (at most --max-length)."""
    most = positions(net)
    if most is None:
        return max_new_tokens, max_length
    if max_new_tokens >= most:
        typer.echo(f"--max-new-tokens {max_new_tokens} would fill the model's {most} positions: answers are kept to "
                   f"{most // 2} tokens", err=True)
        max_new_tokens = most // 2
    room = most - max_new_tokens
    if max_length is not None and max_length > room:
        typer.echo(f"--max-length {max_length}: the model has {most} positions and an answer takes up to "
                   f"{max_new_tokens}: conversations are kept to {room} tokens", err=True)
    return max_new_tokens, room if max_length is None else min(max_length, room)
