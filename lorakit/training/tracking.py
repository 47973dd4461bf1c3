"""--report-to: a run's log records sent to TensorBoard or Weights & Biases as well as to log.jsonl. Both are
optional extras (`pip install 'lorakit[tensorboard]'`, `'lorakit[wandb]'`), imported only when asked for.

A log record is a logged step {step, epoch, loss, lr, tokens_per_s} or an evaluation {step, eval: {metric: value}};
each becomes scalars named "train/loss", "train/lr", ..., "eval/accuracy", ... at its step.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

TENSORBOARD_DIR, WANDB_DIR = "tensorboard", "wandb"  # under the run directory


def scalars(record: dict) -> dict[str, float]:
    """The scalars of one log record, by name."""
    if "eval" in record:
        return {f"eval/{k}": v for k, v in record["eval"].items()}
    return {f"train/{k}": v for k, v in record.items() if k != "step"}


class TensorBoard:
    """Event files in RUN/tensorboard (torch.utils.tensorboard). A resumed run purges the events after its
    checkpoint's step, so that the steps it repeats show once."""

    def __init__(self, out: Path, settings: dict, resumed_at: int | None):
        from torch.utils.tensorboard import SummaryWriter

        purge = resumed_at + 1 if resumed_at is not None else None
        self.writer = SummaryWriter(log_dir=str(out / TENSORBOARD_DIR), purge_step=purge)
        if purge is None:
            self.writer.add_text("settings", f"```\n{json.dumps(settings, indent=2, default=str)}\n```")

    def log(self, record: dict) -> None:
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, record["step"])

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A Weights & Biases run named after the run directory, with its settings as the config, its files in
    RUN/wandb (wandb's own choice of subfolder under `dir`). WANDB_PROJECT (default "lorakit"), WANDB_MODE (e.g.
    offline) and the other WANDB_* variables apply. A resumed lorakit run reports to a new W&B run."""

    def __init__(self, out: Path, settings: dict, resumed_at: int | None):
        import os

        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lorakit"), name=out.name, dir=str(out),
                              config=settings)

    def log(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


# --report-to -> (reporter class, the package it needs: also the name of the extra that installs it)
REPORTERS = {"none": None, "tensorboard": (TensorBoard, "tensorboard"), "wandb": (WandB, "wandb")}


def check_reporter(name: str) -> None:
    """Raise ConfigError if --report-to `name` needs a package that is not installed."""
    from ..errors import ConfigError

    entry = REPORTERS.get(name)
    if entry and importlib.util.find_spec(entry[1]) is None:
        raise ConfigError(f"--report-to {name} needs the {entry[1]} package: pip install 'lorakit[{entry[1]}]'")


def open_reporter(name: str, out: Path, settings: dict, resumed_at: int | None = None):
    """The reporter for --report-to `name` (None for "none")."""
    entry = REPORTERS[name]
    return entry[0](out, settings, resumed_at) if entry else None
