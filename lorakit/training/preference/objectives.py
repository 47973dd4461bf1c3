"""The preference tasks as a table: one record per objective, and the hook fit() calls for a batch's loss.

Each objective turns the scores of a batch (Scores: policy and reference log-probabilities) into per-example losses
and metrics; `batch_loss` computes the scores and returns (mean loss, metrics) as fit.Loop.loss_of expects. Metric
names are TRL's: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies (the share of pairs whose
chosen reward is the higher), logps/chosen, logps/rejected (and nll_loss, log_odds for ORPO; kl for KTO).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from ...runtime.precision import autocast
from .data import PAIRED, UNPAIRED, collate_pairs, collate_unpaired
from .logps import reference_logps, sequence_logps
from .losses import cdpo_loss, ipo_loss, kto_loss, orpo_loss, sigmoid_dpo_loss


@dataclass(frozen=True)
class Settings:
    """The objectives' hyperparameters (TRL's names and defaults)."""

    beta: float = 0.1
    label_smoothing: float = 0.0  # cDPO's ε
    orpo_alpha: float = 1.0  # ORPO: the weight of the chosen completions' NLL
    desirable_weight: float = 1.0  # KTO: λ_D
    undesirable_weight: float = 1.0  # KTO: λ_U
    precision: str = "fp32"
    max_length: int | None = None  # KTO: the mismatched KL pairs are cut to it


@dataclass
class Scores:
    """A batch's per-row completion log-probabilities: the policy's (with gradients) and the reference's."""

    logps: torch.Tensor
    ref: torch.Tensor | None
    tokens: torch.Tensor  # completion tokens per row
    logits: torch.Tensor
    batch: dict


def _rewards(chosen: torch.Tensor, rejected: torch.Tensor, logps: torch.Tensor) -> dict:
    chosen, rejected = chosen.detach(), rejected.detach()
    policy_chosen, policy_rejected = logps.detach().chunk(2)
    return {"rewards/chosen": chosen.mean().item(), "rewards/rejected": rejected.mean().item(),
            "rewards/margins": (chosen - rejected).mean().item(),
            "rewards/accuracies": (chosen > rejected).float().mean().item(),
            "logps/chosen": policy_chosen.mean().item(), "logps/rejected": policy_rejected.mean().item()}


def _logratios(s: Scores) -> tuple[torch.Tensor, torch.Tensor]:
    chosen, rejected = s.logps.chunk(2)
    ref_chosen, ref_rejected = s.ref.chunk(2)
    return chosen - ref_chosen, rejected - ref_rejected


def dpo(s: Scores, cfg: Settings) -> tuple[torch.Tensor, dict]:
    """Sigmoid DPO (cDPO with label_smoothing > 0); rewards β·log-ratios."""
    chosen, rejected = _logratios(s)
    losses = (cdpo_loss(chosen, rejected, cfg.beta, cfg.label_smoothing) if cfg.label_smoothing
              else sigmoid_dpo_loss(chosen, rejected, cfg.beta))
    return losses, _rewards(cfg.beta * chosen, cfg.beta * rejected, s.logps)


def ipo(s: Scores, cfg: Settings) -> tuple[torch.Tensor, dict]:
    """IPO on per-token log-ratios; rewards β·log-ratios, as TRL reports them."""
    chosen, rejected = _logratios(s)
    chosen_tokens, rejected_tokens = s.tokens.chunk(2)
    return (ipo_loss(chosen, rejected, chosen_tokens, rejected_tokens, cfg.beta),
            _rewards(cfg.beta * chosen, cfg.beta * rejected, s.logps))


def orpo(s: Scores, cfg: Settings) -> tuple[torch.Tensor, dict]:
    """ORPO from mean token log-probabilities; its NLL is the mean over the chosen completions' tokens (the
    paper's L_SFT; TRL's also counts the prompt tokens). Rewards β·mean log-probability, as TRL reports them."""
    means = s.logps / s.tokens.clamp(min=1)
    chosen, rejected = means.chunk(2)
    chosen_tokens = s.tokens.chunk(2)[0]
    nll = -s.logps.chunk(2)[0].sum() / chosen_tokens.sum().clamp(min=1)
    losses, log_odds = orpo_loss(chosen, rejected, nll, cfg.beta, cfg.orpo_alpha)
    metrics = _rewards(cfg.beta * chosen, cfg.beta * rejected, s.logps)
    return losses, {**metrics, "nll_loss": nll.item(), "log_odds": log_odds.detach().mean().item()}


def kto(s: Scores, cfg: Settings) -> tuple[torch.Tensor, dict]:
    """KTO with the batch's KL estimate as reference point (Scores.batch holds kl)."""
    desirable = s.batch["label"]
    logratios = s.logps - s.ref
    losses = kto_loss(logratios, desirable, s.batch["kl"], cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)
    rewards = cfg.beta * logratios.detach()
    metrics = {"kl": s.batch["kl"].item()}
    for name, rows in (("chosen", desirable), ("rejected", ~desirable)):
        if rows.any():
            metrics[f"rewards/{name}"] = rewards[rows].mean().item()
            metrics[f"logps/{name}"] = s.logps.detach()[rows].mean().item()
    if desirable.any() and (~desirable).any():
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return losses, metrics


@dataclass(frozen=True)
class Objective:
    """One preference task: the fields its rows hold, whether it compares with a reference policy, how its rows
    are batched, how many targets (pairs or examples) a batch holds, and its losses."""

    name: str
    fields: tuple[str, ...]
    reference: bool
    losses: Callable[[Scores, Settings], tuple[torch.Tensor, dict]]
    label_smoothing: bool = False  # takes --label-smoothing (cDPO)

    @property
    def paired(self) -> bool:
        return self.fields == PAIRED

    def collate(self, pad_id: int, max_length: int | None = None) -> Callable[[list[dict]], dict]:
        return partial(collate_pairs, pad_id=pad_id) if self.paired else partial(
            collate_unpaired, pad_id=pad_id, max_length=max_length)

    def tokens(self, row: dict) -> int:
        """The tokens a row puts through the policy: prompt and completion, of both sides of a pair."""
        sides = ("chosen_ids", "rejected_ids") if self.paired else ("completion_ids",)
        return sum(len(row["prompt_ids"]) + len(row[side]) for side in sides)

    def count(self, batch: dict) -> int:
        """The batch's targets, over which its loss is a mean: pairs, or KTO's examples."""
        return batch["input_ids"].shape[0] // 2 if self.paired else batch["input_ids"].shape[0]


OBJECTIVES = {o.name: o for o in (Objective("dpo", PAIRED, True, dpo, label_smoothing=True), Objective("ipo", PAIRED, True, ipo),
                                  Objective("orpo", PAIRED, False, orpo), Objective("kto", UNPAIRED, True, kto))}
PREFERENCE_TASKS = tuple(OBJECTIVES)


def _kl_estimate(model, batch: dict, cfg: Settings) -> torch.Tensor:
    """KTO's KL(π‖π_ref) estimate: the batch mean of log π − log π_ref over its mismatched pairs, detached and
    clamped at 0 (TRL)."""
    with torch.no_grad():
        kl_batch = {k: batch["KL_" + k] for k in ("input_ids", "attention_mask", "completion_mask")}
        policy = sequence_logps(model, kl_batch, cfg.precision)[0]
    reference = reference_logps(model, batch, cfg.precision, prefix="KL_")
    return (policy - reference).mean().clamp(min=0)


def batch_loss(objective: Objective, cfg: Settings, model, batch: dict) -> tuple[torch.Tensor, dict]:
    """fit.Loop.loss_of for a preference task: the batch's mean loss over its pairs (or KTO's examples) and its
    metrics. The policy's log-probabilities come first, then the reference's (as TRL orders them); precomputed
    reference log-probabilities (batch["ref_logps"]) are used when the batch has them."""
    if not objective.paired:  # KTO: a KL estimate from mismatched prompts and completions
        batch = {**batch, "kl": _kl_estimate(model, batch, cfg)}
    logps, logits = sequence_logps(model, batch, cfg.precision)
    ref = None
    if objective.reference:
        ref = batch["ref_logps"] if "ref_logps" in batch else reference_logps(model, batch, cfg.precision)
    tokens = batch["completion_mask"][:, 1:].sum(-1)
    losses, metrics = objective.losses(Scores(logps, ref, tokens, logits, batch), cfg)
    return losses.mean(), metrics


@torch.no_grad()
def evaluate(model, rows, collate, objective: Objective, cfg: Settings, batch_size: int = 32) -> dict:
    """Eval loss and metrics over `rows`, each batch weighted by its pairs (examples): the same numbers as one
    batch holding them all, but for KTO's KL estimate, which is per batch."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums, weights = {}, {}
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate([rows[i] for i in range(start, min(start + batch_size,
                                                                                          len(rows)))]).items()}
        n = objective.count(batch)
        with autocast(cfg.precision, device):
            loss, metrics = batch_loss(objective, cfg, model, batch)
        for k, v in {"loss": loss.item(), **metrics}.items():
            sums[k], weights[k] = sums.get(k, 0.0) + v * n, weights.get(k, 0) + n
    model.train(was_training)
    return {k: sums[k] / weights[k] for k in sums}
