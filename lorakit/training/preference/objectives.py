"""The preference tasks as a table: one record per objective, and the hook fit() calls for a batch's loss.

Each objective turns the scores of a batch (Scores: policy and reference log-probabilities) into per-example losses
and metrics; `batch_loss` computes the scores and returns (mean loss, metric totals) as fit.Loop.loss_of expects,
and `metric_means` makes the totals means (fit.Loop.metric_means). Metric names are TRL's: rewards/chosen,
rewards/rejected, rewards/margins, rewards/accuracies (the share of pairs whose chosen reward is the higher),
logps/chosen, logps/rejected (and nll_loss, log_odds for ORPO; kl for KTO).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from ...runtime.distributed import World, sum_over_processes
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


def _total(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) of a metric's per-pair (per-row) values: what adds up over processes."""
    values = values.detach().float()
    return values.sum(), torch.tensor(float(values.numel()), device=values.device)


def _rewards(chosen: torch.Tensor, rejected: torch.Tensor, logps: torch.Tensor) -> dict:
    policy_chosen, policy_rejected = logps.chunk(2)
    return {"rewards/chosen": _total(chosen), "rewards/rejected": _total(rejected),
            "rewards/accuracies": _total(chosen > rejected), "logps/chosen": _total(policy_chosen),
            "logps/rejected": _total(policy_rejected)}


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
    """ORPO from mean token log-probabilities. Its NLL (the paper's L_SFT) is per pair: the chosen completion's mean
    token NLL, so that, counted per pair as every preference loss is, accumulation and processes give the loss of
    one batch (the paper and TRL average over the batch's tokens, and TRL counts the prompt's too). Rewards β·mean
    log-probability, as TRL reports them."""
    means = s.logps / s.tokens.clamp(min=1)
    chosen, rejected = means.chunk(2)
    nll = -chosen
    losses, log_odds = orpo_loss(chosen, rejected, nll, cfg.beta, cfg.orpo_alpha)
    metrics = _rewards(cfg.beta * chosen, cfg.beta * rejected, s.logps)
    return losses, {**metrics, "nll_loss": _total(nll), "log_odds": _total(log_odds)}


def kto(s: Scores, cfg: Settings) -> tuple[torch.Tensor, dict]:
    """KTO with the batch's KL estimate as reference point (Scores.batch holds kl)."""
    desirable = s.batch["label"]
    logratios = s.logps - s.ref
    losses = kto_loss(logratios, desirable, s.batch["kl"], cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)
    rewards = cfg.beta * logratios
    metrics = {"kl": _total(s.batch["kl"])}  # the same on every process: its mean over them is itself
    for name, rows in (("chosen", desirable), ("rejected", ~desirable)):
        metrics[f"rewards/{name}"], metrics[f"logps/{name}"] = _total(rewards[rows]), _total(s.logps[rows])
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


def _kl_estimate(model, batch: dict, cfg: Settings, world: World) -> torch.Tensor:
    """KTO's KL(π‖π_ref) estimate: the mean of log π − log π_ref over the global batch's mismatched pairs (its sum
    and count added over the processes, as TRL gathers it), detached and clamped at 0 (TRL)."""
    with torch.no_grad():
        kl_batch = {k: batch["KL_" + k] for k in ("input_ids", "attention_mask", "completion_mask")}
        policy = sequence_logps(model, kl_batch, cfg.precision)[0]
    reference = reference_logps(model, batch, cfg.precision, prefix="KL_")
    total, count = sum_over_processes(torch.stack(_total(policy - reference)), world)
    return (total / count).clamp(min=0)


def metric_means(totals: dict[str, tuple[float, float]]) -> dict:
    """Each metric's mean from its (sum, count) over the rows they were added over (fit adds them over a step's
    micro-batches and processes, in one all-reduce beside the loss); rewards/margins is chosen's mean minus
    rejected's (a pair's margin, or KTO's). A metric with no rows (KTO: no desirable rows) is left out."""
    means = {k: s / c for k, (s, c) in totals.items() if c}
    if "rewards/chosen" in means and "rewards/rejected" in means:
        means["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
    return means


def batch_loss(objective: Objective, cfg: Settings, model, batch: dict,
               world: World = World()) -> tuple[torch.Tensor, dict]:
    """fit.Loop.loss_of for a preference task: the batch's mean loss over its pairs (or KTO's examples) and its
    metrics' totals, {name: tensor([sum, count])} over this batch's rows (`metric_means` makes them means; fit
    adds them up first). `world`: the processes whose global batch KTO's KL estimate is taken over. The policy's
    log-probabilities come first, then the reference's (as TRL orders them); precomputed reference
    log-probabilities (batch["ref_logps"]) are used when the batch has them."""
    if not objective.paired:  # KTO: a KL estimate from mismatched prompts and completions
        batch = {**batch, "kl": _kl_estimate(model, batch, cfg, world)}
    logps, logits = sequence_logps(model, batch, cfg.precision)
    ref = None
    if objective.reference:
        ref = batch["ref_logps"] if "ref_logps" in batch else reference_logps(model, batch, cfg.precision)
    tokens = batch["completion_mask"][:, 1:].sum(-1)
    losses, totals = objective.losses(Scores(logps, ref, tokens, logits, batch), cfg)
    return losses.mean(), {k: torch.stack(v) for k, v in totals.items()}


@torch.no_grad()
def evaluate(model, rows, collate, objective: Objective, cfg: Settings, batch_size: int = 32) -> dict:
    """Eval loss and metrics over `rows` (the loss of each batch weighted by its pairs or examples, the metrics
    added up over every row): the same numbers as one batch holding them all, but for KTO's KL estimate, which is
    per batch."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    totals = {"loss": torch.zeros(2, device=device)}
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate([rows[i] for i in range(start, min(start + batch_size,
                                                                                          len(rows)))]).items()}
        n = objective.count(batch)
        with autocast(cfg.precision, device):
            loss, metrics = batch_loss(objective, cfg, model, batch)
        weighted = torch.stack([loss.detach().float() * n, torch.tensor(float(n), device=device)])
        for k, v in {"loss": weighted, **metrics}.items():
            totals[k] = totals.get(k, 0) + v.float()
    model.train(was_training)
    return metric_means({k: tuple(v.tolist()) for k, v in totals.items()})
