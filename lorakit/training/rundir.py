"""The run directory of `lorakit train`, and every file in it:

    adapter_config.json, adapter_model.safetensors   the adapter in PEFT's layout (a classification head included)
    labels.json        label names in id order (classify)
    train_config.yaml  the resolved settings; `lorakit train --config` reads it back
    log.jsonl          one line per logged step (step, epoch, loss, lr, tokens_per_s) and per evaluation (step, eval)
    metrics.json       final metrics, parameter counts, seconds, peak memory
    training.png       training loss and the eval metric against step
    checkpoints/step-N/  trainable tensors (safetensors) + optimizer, scheduler, RNG state and the RunState
    chat_template.jinja  the chat template of a run trained on conversations; predict and chat apply it
    tensorboard/, wandb/ --report-to's files

Every file is written atomically (a temp file renamed into place), so a killed run leaves whole files only.
A checkpoint always holds whole tensors, as one process holds them: a run sharded with FSDP gathers its shards to
save (rank 0 writes) and cuts them again on resume, so one format serves every mode and a checkpoint resumes in any
number of processes, sharded or not.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from ..adapters.files import CONFIG_NAME, WEIGHTS_NAME, atomic_directory, atomic_write
from ..adapters.parts import unwrap
from ..errors import ConfigError
from ..runtime.distributed import is_main_process
from ..runtime.sharding import full, gathered_optimizer_state, shard_like, sharded_optimizer_state
from .fit import RunState
from .settings import CONFIG_FILE, TrainConfig, check_resumable, saved_settings
from .tracking import TENSORBOARD_DIR, WANDB_DIR

LOG_FILE, METRICS_FILE, PLOT_FILE, LABELS_FILE, CHECKPOINTS = (
    "log.jsonl", "metrics.json", "training.png", "labels.json", "checkpoints")
CHAT_TEMPLATE_FILE = "chat_template.jinja"
RUN_FILES = (CONFIG_FILE, LOG_FILE, METRICS_FILE, PLOT_FILE, LABELS_FILE, CHECKPOINTS, CONFIG_NAME, WEIGHTS_NAME,
             CHAT_TEMPLATE_FILE, TENSORBOARD_DIR, WANDB_DIR)


def fresh_run_dir(root: str | Path = "runs") -> Path:
    """runs/<YYYYmmdd-HHMMSS>, with a suffix if that exists already."""
    base = Path(root) / datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def holds_run(path: Path) -> bool:
    """True if `path` holds files of a lorakit run (or an adapter)."""
    return path.is_dir() and any((path / f).exists() for f in RUN_FILES)


def check_output(cfg: TrainConfig) -> None:
    """Refuse an output directory that holds another run unless resuming or overwriting; refuse --resume without a
    checkpoint, or with settings that differ from the run's."""
    if cfg.output is None:
        return
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output {out} is a file, not a directory")
    if cfg.resume:
        if latest_checkpoint(out) is None:
            raise ConfigError(f"--resume: no checkpoint in {out / CHECKPOINTS} to resume from")
        saved = saved_settings(out)
        if saved is not None:
            check_resumable(cfg, saved)
    elif holds_run(out) and not cfg.overwrite:
        raise ConfigError(f"--output {out} holds another run; pass --resume to continue it or --overwrite to "
                          f"replace it")


def clear_run(out: Path) -> None:
    """Remove the files of a previous run from `out` (only lorakit's own files)."""
    for name in RUN_FILES:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def write_json(path: Path, value) -> None:
    """JSON file, written atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(value, indent=2) + "\n"))


def start_files(out: Path, settings: dict, labels: list[str] | None, resumed_at: int | None) -> None:
    """The files a run writes before training: its settings, its labels, and its log (a resumed run's log kept up
    to the checkpoint's step, so that the steps it repeats are logged once)."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / CONFIG_FILE, lambda tmp: Path(tmp).write_text(yaml.safe_dump(settings, sort_keys=False)))
    if labels:
        write_json(out / LABELS_FILE, labels)
    kept = [] if resumed_at is None else [r for r in read_log(out / LOG_FILE) if r["step"] <= resumed_at]
    atomic_write(out / LOG_FILE, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in kept)))


# ---- log.jsonl ----

def append_log(path: Path, record: dict) -> None:
    """Add one record to log.jsonl."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_log(path: Path) -> list[dict]:
    """The records of log.jsonl (none if absent)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_loss(records: list[dict]) -> float | None:
    """The last logged training loss."""
    losses = [r["loss"] for r in records if "loss" in r]
    return losses[-1] if losses else None


def first_eval(records: list[dict]) -> dict | None:
    """The evaluation before training (step 0), if the run made one."""
    evals = [r["eval"] for r in records if r.get("step") == 0 and "eval" in r]
    return evals[0] if evals else None


def panels(records: list[dict], metric: str) -> list[tuple[str, list[tuple[str, list, list]]]]:
    """What training.png draws, top to bottom: [(y label, [(series label, steps, values)])]. Training and eval loss
    share one loss axis (curves on two axes look alike whatever their values); the eval metric, when it is not the
    loss, gets its own panel; the learning rate is the bottom one."""
    train = [r for r in records if "loss" in r and "eval" not in r]
    evals = [r for r in records if "eval" in r]
    series = lambda rows, value: ([r["step"] for r in rows], [value(r) for r in rows])  # noqa: E731
    loss = [("training loss", *series(train, lambda r: r["loss"]))]
    if any("loss" in r["eval"] for r in evals):
        loss.append(("eval loss", *series([r for r in evals if "loss" in r["eval"]], lambda r: r["eval"]["loss"])))
    out = [("loss", loss)]
    scored = [r for r in evals if metric in r["eval"]]
    if metric != "loss" and scored:
        out.append((f"eval {metric}", [(f"eval {metric}", *series(scored, lambda r: r["eval"][metric]))]))
    rated = [r for r in train if "lr" in r]
    if rated:
        out.append(("learning rate", [("learning rate", *series(rated, lambda r: r["lr"]))]))
    return out


def plot(records: list[dict], path: Path, metric: str, best_step: int | None = None) -> None:
    """training.png: the panels of `panels`, sharing the step axis, with the step --keep-best kept marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = panels(records, metric)
    fig, axes = plt.subplots(len(drawn), 1, sharex=True, figsize=(7, 2.2 + 1.6 * len(drawn)), squeeze=False)
    for ax, (ylabel, lines) in zip(axes[:, 0], drawn):
        for label, steps, values in lines:
            ax.plot(steps, values, "o-" if label.startswith("eval") else "-", label=label, markersize=3)
        if best_step is not None:
            ax.axvline(best_step, color="tab:green", linestyle="--", linewidth=1, label=f"best step ({best_step})")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize="small")
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title("lorakit train")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


# ---- checkpoints ----

def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint directory of run `out`, or None."""
    found = sorted((out / CHECKPOINTS).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None


def save_checkpoint(out: Path, model, opt, sched, state: RunState, keep: int = 1) -> Path:
    """checkpoints/step-<step>: built in a temp directory, then renamed into place; then only the newest `keep`
    checkpoints and the best one (state.best_step) are kept. Sharded with FSDP, every process must call this (the
    shards are gathered); only rank 0 writes."""
    root = out / CHECKPOINTS
    final = root / f"step-{state.step}"
    # Gathered before anything only the main process does: a collective under FSDP.
    tensors = {n: full(p.detach()).cpu().contiguous() for n, p in unwrap(model).named_parameters() if p.requires_grad}
    optimizer = gathered_optimizer_state(opt)
    if not is_main_process():
        return final
    root.mkdir(parents=True, exist_ok=True)

    def fill(tmp: Path) -> None:
        save_file(tensors, tmp / "trainable.safetensors")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save({"optimizer": optimizer, "scheduler": sched.state_dict(), "rng": rng, **state.saved()},
                   tmp / "state.pt")

    atomic_directory(final, fill)
    prune_checkpoints(root, keep, state.best_step)
    return final


def prune_checkpoints(root: Path, keep: int, best: int | None) -> None:
    """Remove all but the newest `keep` checkpoints and checkpoint `best`, and any leftover of a killed save."""
    steps = sorted(int(p.name.removeprefix("step-")) for p in root.glob("step-*") if p.name[5:].isdigit())
    kept = {f"step-{s}" for s in steps[-keep:]} | ({f"step-{best}"} if best is not None else set())
    for old in root.iterdir():
        if old.name not in kept:
            shutil.rmtree(old, ignore_errors=True)


def restore_trainable(path: Path, model) -> None:
    """Put the trainable tensors of checkpoint `path` into `model` (--keep-best: the best step's adapter); a model
    sharded with FSDP takes its own shard of each."""
    _put_trainable(model, load_file(path / "trainable.safetensors"))


def _put_trainable(model, tensors: dict) -> None:
    params = dict(unwrap(model).named_parameters())
    unwrap(model).load_state_dict({n: shard_like(t, params[n]) for n, t in tensors.items()}, strict=False)


# ---- the chat template of a run trained on conversations ----

def save_chat_template(out: Path, template: str) -> None:
    """RUN/chat_template.jinja: the template the run's conversations were rendered with."""
    atomic_write(out / CHAT_TEMPLATE_FILE, lambda tmp: Path(tmp).write_text(template))


def saved_chat_template(directory: str | Path | None) -> str | None:
    """The chat template a run was trained with, or None (no run directory, or not trained on conversations)."""
    file = Path(directory) / CHAT_TEMPLATE_FILE if directory else None
    return file.read_text() if file and file.is_file() else None


def load_checkpoint(path: Path, model, opt, sched) -> RunState:
    """Restore trainable tensors, optimizer, scheduler and RNG from checkpoint `path`; returns its RunState. A model
    sharded with FSDP takes its own shard of every tensor (each process reads the files; no communication)."""
    tensors = load_file(path / "trainable.safetensors")
    params = {n: p for n, p in unwrap(model).named_parameters() if p.requires_grad}
    missing, unexpected = set(params) - set(tensors), set(tensors) - set(params)
    if missing or unexpected:
        raise ConfigError(f"checkpoint {path} does not fit this model: missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}")
    _put_trainable(model, tensors)
    saved = torch.load(path / "state.pt", weights_only=True)
    opt.load_state_dict(sharded_optimizer_state(saved["optimizer"], opt))
    sched.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"]["cpu"])
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    return RunState.restored(saved, checkpoint=path)
