"""Per-sequence completion log-probabilities, of the policy and of the reference.

A preference batch holds the chosen rows then the rejected rows in one tensor (data.collate_pairs), so a single
forward scores both. The reference is the same model: with its adapter switched off (`lorakit.disable_adapters`), or
with the frozen reference adapter active (`--ref-adapter`, run.py), under no_grad; one base model in memory.
"""

from __future__ import annotations

import contextlib

import torch

from ...adapters.inject import set_adapter
from ...adapters.merging import disable_adapters
from ...adapters.parts import active_adapters, configs, unwrap
from ...runtime.precision import autocast

REF_ADAPTER = "ref"  # the frozen reference adapter's name beside the trained one (--ref-adapter)


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """(rows, positions − 1): log π(token t | tokens < t) for each completion token t, 0 elsewhere. Token t is
    predicted by the logits at t − 1; gather and logsumexp avoid a vocabulary-sized log-softmax copy."""
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:].unsqueeze(-1)
    picked = logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return picked * completion_mask[:, 1:]


def sequence_logps(model, batch: dict, precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row sums of completion-token log-probabilities, the logits) of `model` on a batch holding input_ids,
    attention_mask and completion_mask."""
    with autocast(precision, batch["input_ids"].device):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return token_logps(logits, batch["input_ids"], batch["completion_mask"]).sum(-1), logits


@contextlib.contextmanager
def as_reference(model):
    """Inside the block `model` is the reference policy: the frozen reference adapter if it has one, else the base
    model (every adapter off)."""
    root = unwrap(model)
    if REF_ADAPTER not in configs(root):
        with disable_adapters(root):
            yield model
        return
    trained = active_adapters(root)
    set_adapter(root, REF_ADAPTER)
    try:
        yield model
    finally:
        set_adapter(root, list(trained))


@torch.no_grad()
def reference_logps(model, batch: dict, precision: str = "fp32", prefix: str = "") -> torch.Tensor:
    """Per-row completion log-probabilities under the reference (`prefix` "KL_": of KTO's mismatched pairs)."""
    inputs = {k: batch[prefix + k] for k in ("input_ids", "attention_mask", "completion_mask")}
    with as_reference(model):
        return sequence_logps(model, inputs, precision)[0]


def precompute_reference(model, rows: list[dict], collate, batch_size: int, precision: str = "fp32") -> list[dict]:
    """`rows` with each pair's reference log-probabilities (ref_chosen_logps, ref_rejected_logps), computed once in
    eval mode so that training needs no reference forward (--precompute-ref)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk).items()}
        chosen, rejected = reference_logps(model, batch, precision).chunk(2)
        out += [{**row, "ref_chosen_logps": float(c), "ref_rejected_logps": float(r)}
                for row, c, r in zip(chunk, chosen.tolist(), rejected.tolist())]
    model.train(was_training)
    return out
