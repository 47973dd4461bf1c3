"""The preference objectives, each a function of per-sequence log-probabilities (logps.py). Every function returns
per-example losses (a mean over them is the batch's loss) and the rewards that the metrics report.

Notation: for a prompt x with a chosen completion y_w and a rejected one y_l, π is the policy being trained, π_ref the
reference, log π(y|x) the sum of the completion tokens' log-probabilities, and

    h = [log π(y_w|x) − log π_ref(y_w|x)] − [log π(y_l|x) − log π_ref(y_l|x)]      (the margin of log-ratios)

The formulas follow the papers as TRL implements them (trl 1.16): DPO (Rafailov et al. 2023), conservative DPO
(Mitchell 2023), IPO (Azar et al. 2023, with TRL's per-token normalisation), ORPO (Hong et al. 2024), KTO (Ethayarajh
et al. 2024).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sigmoid_dpo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO: −log σ(β·h). With π = π_ref (a fresh adapter) h = 0 and the loss is exactly ln 2."""
    return -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))


def cdpo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float,
              label_smoothing: float) -> torch.Tensor:
    """Conservative DPO: the preference label is taken as flipped with probability ε (label_smoothing):

        −(1 − ε)·log σ(β·h) − ε·log σ(−β·h)

    ε = 0 is DPO. (trl 1.16's sigmoid loss has no ε; its `aot` loss reduces to this one for a single pair.)"""
    h = beta * (chosen_logratios - rejected_logratios)
    return -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)


def ipo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, chosen_tokens: torch.Tensor,
             rejected_tokens: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO: (h' − 1/(2β))², with each log-ratio divided by its completion's token count (TRL's normalisation,
    confirmed with the IPO authors) so that β does not depend on completion lengths:

        h' = Δ_w / |y_w| − Δ_l / |y_l|,   Δ = log π(y|x) − log π_ref(y|x)

    β is the paper's τ."""
    margin = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(min=1)
    return (margin - 1 / (2 * beta)) ** 2


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, accurate on both sides of −ln 2 (Mächler 2012): log1p(−e^x) far from 0,
    log(−expm1(x)) near it."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, chosen_nll: torch.Tensor,
              beta: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ORPO (no reference): α·NLL(y_w) − β·log σ(log odds(y_w) − log odds(y_l)), per pair, where the odds of a
    completion are p/(1 − p) with p its mean per-token probability, so that

        log odds(y_w) − log odds(y_l) = (ℓ_w − ℓ_l) − [log(1 − e^ℓ_w) − log(1 − e^ℓ_l)],   ℓ = mean token log-prob

    β is TRL's `beta` (the paper's λ, weight of the odds-ratio term), α the NLL's weight (1 in the paper and TRL).
    Returns (per-pair losses, per-pair log odds ratio)."""
    chosen, rejected = chosen_mean_logps.float(), rejected_mean_logps.float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    return alpha * chosen_nll - beta * F.logsigmoid(log_odds), log_odds


def kto_loss(logratios: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float,
             desirable_weight: float, undesirable_weight: float) -> torch.Tensor:
    """KTO, per example (unpaired): with z = β·(log π(y|x) − log π_ref(y|x)) and the reference point z_0 = β·KL,

        desirable y:    λ_D · (1 − σ(z − β·KL))
        undesirable y:  λ_U · (1 − σ(β·KL − z))

    KL is the batch's estimate of KL(π‖π_ref) from mismatched pairs (x_i, y_{i−1}) (logps.kl_estimate), detached
    and clamped at 0 as in TRL. λ_D, λ_U: desirable_weight, undesirable_weight."""
    z = beta * (logratios - kl)
    return torch.where(desirable, desirable_weight * (1 - torch.sigmoid(z)),
                       undesirable_weight * (1 - torch.sigmoid(-z)))
