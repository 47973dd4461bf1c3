"""Evaluation: accuracy, macro-F1 and loss of a classifier; loss and perplexity of a causal LM. Every metric is a
Python number computed from counts and sums; rounding is left to whoever displays it."""

from __future__ import annotations

import math

import torch

from .precision import autocast

# The metric shown in the plot and the summary, per task.
MAIN_METRIC = {"classify": "accuracy", "causal-lm": "loss", "dpo": "loss", "ipo": "loss", "orpo": "loss", "kto": "loss"}
# Which way each metric improves: True if higher is better (--keep-best, --early-stopping).
HIGHER_IS_BETTER = {"accuracy": True, "macro_f1": True, "loss": False, "perplexity": False}
MAX_LOG_PERPLEXITY = 50.0  # exp(50) ~ 5e21: an untrained model's perplexity, reported without overflowing


def main_metric(task: str) -> str:
    """The eval metric shown in the plot and the summary."""
    return MAIN_METRIC[task]


def better(metric: str, new: float, old: float) -> bool:
    """True if `new` is strictly better than `old` for `metric`."""
    return new > old if HIGHER_IS_BETTER[metric] else new < old


def accuracy(pred: torch.Tensor, true: torch.Tensor) -> float:
    """Share of `pred` equal to `true`: correct / total, an exact Python float."""
    return int((pred == true).sum()) / len(true)


def macro_f1(pred: torch.Tensor, true: torch.Tensor) -> float:
    """Macro-averaged F1 over the labels present in `true` or `pred` (scikit-learn's definition)."""
    scores = []
    for c in torch.unique(torch.cat([pred, true])):
        tp = int(((pred == c) & (true == c)).sum())
        fp = int(((pred == c) & (true != c)).sum())
        fn = int(((pred != c) & (true == c)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


@torch.no_grad()
def evaluate(model, rows, collate, task: str, batch_size: int = 32, precision: str = "fp32") -> dict:
    """Classify: accuracy, macro_f1, loss (mean per example). Causal LM: loss (mean per target token) and
    perplexity = exp(loss). `rows`: a list of examples or a datasets.Dataset."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    preds, trues, loss_sum, count = [], [], 0.0, 0
    for start in range(0, len(rows), batch_size):
        chunk = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
        batch = {k: v.to(device) for k, v in collate(chunk).items()}
        with autocast(precision, device):
            out = model(**batch)
        if task == "classify":
            preds.append(out.logits.float().argmax(-1).cpu())
            trues.append(batch["labels"].cpu())
            n = len(batch["labels"])
        else:
            n = int((batch["labels"][:, 1:] != -100).sum())  # the loss averages over shifted target tokens
        loss_sum += float(out.loss) * n if n else 0.0  # no target: the model's mean is NaN
        count += n
    model.train(was_training)
    loss = loss_sum / max(count, 1)
    if task == "causal-lm":
        return {"loss": loss, "perplexity": math.exp(min(loss, MAX_LOG_PERPLEXITY))}
    pred, true = torch.cat(preds), torch.cat(trues)
    return {"accuracy": accuracy(pred, true), "macro_f1": macro_f1(pred, true), "loss": loss}


def describe(metrics: dict) -> str:
    """"accuracy 0.8980, macro_f1 0.8975, loss 0.3124": metrics rounded for display."""
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
