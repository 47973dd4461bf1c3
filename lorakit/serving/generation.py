"""Generation with a causal language model (and its adapter): batched prompts, the chat template for chat-trained
adapters, greedy or sampled decoding, stopping at the template's end-of-turn token, and streaming text as it comes.
Built on transformers' `generate` and its streamer interface.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch

from ..data.conversations import IGNORE, PROBE, chat_labels, render, set_chat_template


@dataclass
class Sampling:
    """How to pick tokens: greedy with temperature 0, else sampling at `temperature` from the top-p nucleus."""

    max_new_tokens: int = 40
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None  # sampling is repeatable with a seed

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def generate_kwargs(self) -> dict:
        """The arguments of transformers' generate() for these settings."""
        if self.temperature == 0:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return {"max_new_tokens": self.max_new_tokens, "do_sample": True, "temperature": self.temperature,
                "top_p": self.top_p}


def use_chat_template(tokenizer, adapter: str | None, file: str | None = None) -> bool:
    """Give `tokenizer` the chat template to put prompts in: the one in `file` (checked as training checks it), else
    the one the adapter's run was trained with (its chat_template.jinja). Returns False, leaving the tokenizer as
    it is, when there is neither: the adapter was trained on plain text."""
    from ..training.rundir import saved_chat_template

    if file is not None:
        set_chat_template(tokenizer, file)
        return True
    saved = saved_chat_template(adapter)
    if saved is None:
        return False
    tokenizer.chat_template = saved
    return True


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end the model's answer: EOS and, with a chat template, the token closing an assistant turn
    (found by rendering a probe conversation, as training labels it)."""
    ids = {tokenizer.eos_token_id} - {None}
    if getattr(tokenizer, "chat_template", None):
        labels = chat_labels(tokenizer, PROBE, row=0)["labels"]
        ids.add([t for t in labels if t != IGNORE][-1])  # the last target token of a turn is its end
    return sorted(ids)


def prompt_text(tokenizer, prompt: str | list[dict], chat: bool) -> str:
    """What the model is given: a conversation (or a lone user message) through the chat template with the
    assistant's turn opened, or the plain prompt as it is."""
    if not chat:
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return render(tokenizer, messages, row=0, add_generation_prompt=True)


def prompt_tokens(tokenizer, prompt: str | list[dict], chat: bool) -> int:
    """How many tokens the model is given for `prompt`, encoded as generation encodes it (`_encode`)."""
    return len(tokenizer(prompt_text(tokenizer, prompt, chat), add_special_tokens=not chat)["input_ids"])


def generate(model, tokenizer, prompts: list, sampling: Sampling, chat: bool = False, batch_size: int = 8) -> list[str]:
    """The generated text for each prompt (text, or a list of messages with chat=True), in batches of `batch_size`
    (left-padded, as decoder-only models need); stops at end-of-turn."""
    texts = [prompt_text(tokenizer, p, chat) for p in prompts]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out = []
    try:
        for start in range(0, len(texts), batch_size):
            enc = _encode(tokenizer, texts[start: start + batch_size], chat, model)
            ids = generate_ids(model, tokenizer, enc, sampling)
            out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out


def stream(model, tokenizer, prompt, sampling: Sampling, on_text: Callable[[str], None], chat: bool = False) -> str:
    """Generate for one prompt, calling on_text(piece) with the text as it is decoded; returns the whole text."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            if text:
                on_text(text)

    enc = _encode(tokenizer, [prompt_text(tokenizer, prompt, chat)], chat, model)
    ids = generate_ids(model, tokenizer, enc, sampling,
                       streamer=Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True))
    return tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def _encode(tokenizer, texts: list[str], chat: bool, model) -> dict:
    # A chat template writes its own BOS; a plain prompt gets the tokenizer's special tokens.
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in enc.items()}


def with_template(tokenizer, template: str | None):
    """`tokenizer` with `template` as its chat template, as a shallow copy (a server's shared tokenizer is left as
    it is); `tokenizer` itself when there is no template."""
    if template is None:
        return tokenizer
    view = copy.copy(tokenizer)
    view.chat_template = template
    return view


OnStep = Callable[[list[int]], list[bool]]


def _each_step(on_step: OnStep):
    """transformers' per-step hook (a stopping criterion: the one hook that sees every row) calling on_step with the
    token each row just got; the rows it names stop, and get padding from then on."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class EachStep(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
            return torch.tensor(on_step(input_ids[:, -1].tolist()), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([EachStep()])


@torch.no_grad()
def generate_ids(model, tokenizer, enc: dict, sampling: Sampling, streamer=None,
                 stop_ids: list[int] | None = None, on_step: OnStep | None = None) -> torch.Tensor:
    """The one decoding call of predict, chat and the server: prompt and generated ids for the (left-padded) batch
    `enc`, stopping at `stop_ids` (default: the tokenizer's end of turn). `on_step`, if given, is called after every
    step with each row's new token and returns, per row, whether that row stops (the server's streams, stop strings
    and clients that left)."""
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    was_training = model.training
    model.eval()
    each_step = _each_step(on_step) if on_step is not None else None
    try:
        return model.generate(**enc, **sampling.generate_kwargs(), streamer=streamer, stopping_criteria=each_step,
                              eos_token_id=stop_ids or end_of_turn_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
    finally:
        model.train(was_training)
