"""A causal LM's loss that never holds the whole logits: the output head and the cross-entropy run a chunk of target
tokens at a time, and each chunk's logits are freed before the next one is made.

The plain loss of a Hugging Face causal LM makes logits of (tokens × vocabulary), in fp32 for the softmax: at
4 × 1024 tokens and a 32,000-word vocabulary that is 0.5 GB, kept for backward with its log-softmax and followed by a
gradient as large. Here the head (a plain Linear, tied to the input embeddings or not, with or without a bias, with
the model's logit scale and soft cap applied) and the cross-entropy are one autograd function
(`linear_cross_entropy`): its forward makes one chunk's logits, takes their log-sum-exp and target logit, and,
when gradients are wanted, turns them straight into that chunk's share of the gradients of the hidden states (and of
the head's weight and bias where they train), so backward only scales what forward computed. Only the rows that have
a target reach the head: prompt and padding tokens cost nothing.

Computing the gradients in forward (as Liger Kernel's fused linear cross-entropy does) rather than recomputing each
chunk's logits in backward (as cut-cross-entropy and torchtune's chunked loss do) saves one (tokens × hidden ×
vocabulary) matrix multiply per step (about 6% of a Llama-134M step's FLOPs with checkpointing), for holding the
hidden states' gradient (as large as the hidden states, which the recomputing variant must keep instead) from forward
to backward. The loss is a scalar, so backward's incoming gradient is a number that scales them.

Hand-written because neither torch nor transformers has it on the CPU: Liger and cut-cross-entropy are Triton kernels
for CUDA. Where a run uses Liger (--kernels, runtime/kernels.py), its fused linear cross-entropy takes this one's place
(`fused`), after the same choice of rows.

`loss_model(model, chunk_tokens)` wraps a causal LM so that `wrapper(**batch).loss` is this loss: the backbone (the
model's `base_model`) gives the hidden states, and the wrapper checks once, on a few tokens, that the model's own
logits are the head's output as it computes them; models whose logits are anything else keep their own loss, and the
reason is returned.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..data.conversations import IGNORE
from ..nn.autocasting import autocast_dtype

# Config keys of transformers' causal LMs that change the head's output, as a factor on the logits
# (Cohere: multiplied by logit_scale; Granite: divided by logits_scaling) and a soft cap (Gemma 2 and 3:
# cap · tanh(logits / cap)). The probe in `loss_model` checks that they are read right for every model.
LOGIT_SCALES = {"logit_scale": lambda v: v, "logits_scaling": lambda v: 1 / v}
SOFTCAPS = ("final_logit_softcapping",)
PROBE_TOKENS = 8
# A fused linear cross-entropy: (hidden rows, weight, bias, targets, product dtype or None, soft cap or None) -> mean
FusedLoss = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", torch.Tensor, "torch.dtype | None",
                      "float | None"], torch.Tensor]


@dataclass(frozen=True)
class Logits:
    """How a chunk's logits are made from hidden states h: cap · tanh(scale · (h·Wᵀ + b) / cap), without the tanh
    when cap is None, the product computed in `dtype` (autocast's, else the weight's) and the rest in fp32."""

    scale: float = 1.0
    cap: float | None = None
    dtype: torch.dtype | None = None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, chunk_tokens: int = 512, logits: Logits = Logits()) -> torch.Tensor:
    """Mean cross-entropy of the logits `hidden`·`weight`ᵀ + `bias` (transformed as `logits` says) against
    `targets`, over the rows of `hidden` (n × hidden size; every row has a target), made `chunk_tokens` rows at a
    time. The same value and gradients as the full computation; n = 0 gives 0 with zero gradients."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_tokens, logits)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens, logits):
        want = ctx.needs_input_grad[:3]  # hidden, weight, bias
        dtype = logits.dtype or weight.dtype
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        n = len(targets)
        grads = (torch.zeros_like(hidden) if want[0] else None,
                 torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want[1] else None,
                 torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want[2] else None)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):  # each product in `dtype`, as autocast would
            for start in range(0, n, chunk_tokens):
                rows = slice(start, start + chunk_tokens)
                total += _chunk(hidden[rows].to(dtype), w, b, targets[rows], logits, grads, rows)
        # 1/n once on the gradients rather than on every chunk's logits
        grad_h, grad_w, grad_b = (None if g is None else g.div_(max(n, 1)) for g in grads)
        ctx.save_for_backward(grad_h, _as(grad_w, weight), _as(grad_b, bias))
        return total / max(n, 1)

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = (None if g is None else g * grad_out.to(g.dtype) for g in ctx.saved_tensors)
        return grad_h, grad_w, grad_b, None, None, None


def _chunk(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, t: torch.Tensor, logits: Logits,
           grads: tuple, rows: slice) -> torch.Tensor:
    """One chunk: its summed loss; adds its (unscaled) gradients to `grads` (hidden, weight, bias; None: not
    wanted). Its logits live only in here."""
    z = torch.addmm(b, h, w.t()) if b is not None else h @ w.t()
    y, dy_dz = _transform(z.float(), logits)
    del z
    log_p = torch.log_softmax(y, dim=-1)  # one fused pass (logsumexp and a subtraction take five)
    del y
    loss = -log_p.gather(1, t[:, None]).sum()
    grad_h, grad_w, grad_b = grads
    if grad_h is None and grad_w is None and grad_b is None:
        return loss
    g = _logit_grad(log_p, t, dy_dz).to(h.dtype)  # log_p is overwritten
    if grad_h is not None:
        grad_h[rows] = g @ w
    if grad_w is not None and h.dtype == torch.float32:
        grad_w.addmm_(g.t(), h)
    elif grad_w is not None:  # the product in the compute dtype, the sum over chunks in fp32
        grad_w += g.t() @ h
    if grad_b is not None:
        grad_b += g.sum(0, dtype=torch.float32)
    return loss


def _transform(z: torch.Tensor, logits: Logits) -> tuple[torch.Tensor, torch.Tensor | float]:
    """(the model's logits from the head's output z, their derivative by z: a number, or a tensor with a cap)."""
    y = z * logits.scale if logits.scale != 1.0 else z
    if logits.cap is None:
        return y, logits.scale
    capped = torch.tanh(y / logits.cap)
    return capped * logits.cap, (1 - capped * capped) * logits.scale


def _logit_grad(log_p: torch.Tensor, t: torch.Tensor, dy_dz) -> torch.Tensor:
    """d(summed loss)/dz of one chunk, (softmax(y) − one-hot(t)) · dy/dz, computed in log_p's memory."""
    g = log_p.exp_()
    g[torch.arange(len(t), device=t.device), t] -= 1
    return g.mul_(dy_dz) if not isinstance(dy_dz, float) or dy_dz != 1.0 else g


def _as(grad: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    return None if grad is None else grad.to(like.dtype)


# ---- a causal LM whose loss is chunked ----

@dataclass(frozen=True)
class Head:
    """What the chunked loss needs of a causal LM: its backbone (hidden states out), its head and the logit
    transform its forward applies."""

    backbone: nn.Module
    linear: nn.Linear
    logits: Logits


def find_head(model: nn.Module) -> Head | str:
    """The backbone, head and logit transform of causal LM `model` (found by type: get_output_embeddings() and
    transformers' base_model), or the reason the chunked loss cannot run on it."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not nn.Linear:  # a LoRA-adapted, quantized or custom head computes something else
        return f"its output head is {type(head).__name__}, not a plain torch.nn.Linear"
    backbone = getattr(model, "base_model", None)
    if not isinstance(backbone, nn.Module) or backbone is model:
        return f"{type(model).__name__} has no backbone module apart from its head (transformers' base_model)"
    config = getattr(model, "config", None)
    scale = 1.0
    for key, factor in LOGIT_SCALES.items():
        if getattr(config, key, None) is not None:
            scale *= factor(float(getattr(config, key)))
    caps = [float(getattr(config, key)) for key in SOFTCAPS if getattr(config, key, None)]
    return Head(backbone, head, Logits(scale, caps[0] if caps else None))


def causal_lm_loss(hidden: torch.Tensor, labels: torch.Tensor, head: Head, chunk_tokens: int,
                   fused: FusedLoss | None = None) -> torch.Tensor:
    """A causal LM's loss from its final hidden states (batch × tokens × hidden size): the mean cross-entropy of
    token t's logits against label t + 1, over the labels other than -100 (as transformers' loss shifts them), made
    chunk_tokens target tokens at a time in autocast's dtype where autocast is on. `fused`: another fused
    linear cross-entropy (Liger's, --kernels) in its place, where the logits have no scale and some tokens a target."""
    ignored = labels.new_full((len(labels), 1), IGNORE)
    targets = torch.cat([labels[:, 1:], ignored], dim=1).reshape(-1)
    rows = (targets != IGNORE).nonzero().squeeze(1)
    logits = Logits(head.logits.scale, head.logits.cap, autocast_dtype(hidden.device.type))
    flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
    if fused is not None and logits.scale == 1.0 and len(rows):
        return fused(flat, head.linear.weight, head.linear.bias, targets[rows], logits.dtype, logits.cap)
    return linear_cross_entropy(flat, head.linear.weight, head.linear.bias, targets[rows], chunk_tokens, logits)


class ChunkedLoss(nn.Module):
    """A causal LM whose forward with labels returns the chunked loss and no logits (`loss_model` builds it);
    without labels it is the model's own forward. The model is its submodule `model`, so DDP wraps it as usual."""

    def __init__(self, model: nn.Module, head: Head, chunk_tokens: int, fused: FusedLoss | None = None):
        super().__init__()
        self.model, self.head, self.chunk_tokens, self.fused = model, head, chunk_tokens, fused
        self.no_cache = "use_cache" in inspect.signature(head.backbone.forward).parameters

    def forward(self, labels: torch.Tensor | None = None, **inputs):
        from transformers.modeling_outputs import CausalLMOutput

        if labels is None:
            return self.model(**inputs)
        hidden = _hidden(self.head.backbone, inputs, self.no_cache)
        return CausalLMOutput(loss=causal_lm_loss(hidden, labels, self.head, self.chunk_tokens, self.fused))


def loss_model(model: nn.Module, chunk_tokens: int, sharded: bool = False,
               fused: FusedLoss | None = None) -> tuple[nn.Module, str | None]:
    """(`model` wrapped so that its loss is chunked, None), or (`model` itself, why not) when chunk_tokens is 0,
    the model is sharded with FSDP (its units gather their weights in their own forward, which the chunked loss
    bypasses), its head is not a plain Linear, or its logits are not what the head and the known transforms give.
    `fused`: the fused linear cross-entropy to use instead of lorakit's (causal_lm_loss)."""
    if chunk_tokens <= 0:
        return model, None
    if sharded:
        return model, "an FSDP-sharded model gathers its head's weight only inside the head's own forward"
    head = find_head(model)
    if isinstance(head, str):
        return model, head
    mismatch = _probe(model, head)
    if mismatch:
        return model, mismatch
    return ChunkedLoss(model, head, chunk_tokens, fused), None


def _hidden(backbone: nn.Module, inputs: dict, no_cache: bool) -> torch.Tensor:
    # No KV cache: a training forward has no use for one (the model's own forward would build it for nothing).
    return backbone(**inputs, **({"use_cache": False} if no_cache else {}))[0]


@torch.no_grad()
def _probe(model: nn.Module, head: Head) -> str | None:
    """None if the model's logits on a few tokens are its head's output with the known transform; else why not."""
    was_training = model.training
    model.eval()
    try:
        ids = torch.arange(PROBE_TOKENS, device=head.linear.weight.device)[None] % head.linear.out_features
        own = model(input_ids=ids).logits.float()
        hidden = _hidden(head.backbone, {"input_ids": ids}, "use_cache" in inspect.signature(head.backbone.forward)
                         .parameters)
        ours = _transform(head.linear(hidden).float(), head.logits)[0]
    finally:
        model.train(was_training)
    if own.shape != ours.shape:
        return f"its logits {tuple(own.shape)} are not shaped as its head's output {tuple(ours.shape)}"
    tolerance = 1e-4 * float(own.abs().max()) + 1e-5
    if not torch.allclose(own, ours, rtol=1e-4, atol=tolerance):
        return (f"its logits are not its head's output (max difference {(own - ours).abs().max().item():.3g}): the "
                f"model's forward transforms them in a way lorakit does not know")
    return None
