"""A trained run loaded for use: its base model (by default the one the adapter names) with the adapter, or a merged
export, on the device training would use, with its task and label names: what eval, predict, chat and merge start
from."""

from __future__ import annotations

from pathlib import Path

import torch

from ..adapters.attach import attach
from ..adapters.files import CONFIG_NAME, read_adapter
from ..data.tables import load_labels
from ..errors import ConfigError
from ..io.models import load_model, resolve_model
from ..runtime.precision import compute_dtype
from .tasks import task_of


def labels_of(model_path: str, adapter: str | None) -> list[str] | None:
    """Label names saved with the adapter (labels.json), else in the model config (a merged export), else None."""
    for directory in ([adapter] if adapter else []) + [model_path]:
        names = load_labels(directory)
        if names:
            return names
    from transformers import AutoConfig

    id2label = getattr(AutoConfig.from_pretrained(model_path), "id2label", None) or {}
    names = [id2label[i] for i in sorted(id2label)]
    return names if names and names != [f"LABEL_{i}" for i in range(len(names))] else None


def load_trained(model: str | None, adapter: str | None, task: str | None = None,
                 labels: list[str] | None = None, dtype: str = "auto", precision: str = "auto"):
    """(model, tokenizer, task record, labels) for eval, predict and merge, on the device training would use: base
    (`model`, by default the adapter's base model) held in `dtype`, plus the adapter in `adapter` if given (a QLoRA
    adapter's base quantized while loading, as in training); a merged export loads as a plain model. The adapter's
    files are read once, and checked before the base model loads."""
    read = _read_adapter(adapter)
    config = read[0] if read else None
    path = _base_model(model, config, adapter)
    task = task_of(path, config, task)
    labels = labels_of(path, adapter) or labels
    if task.labelled and not labels:
        raise ConfigError("no label names known: pass an adapter trained by lorakit (it saves labels.json), "
                          "a merged export, or --data with a label column")
    device = default_device()
    quantize = config.quantize if config else None
    net, tokenizer = load_model(path, task, labels, dtype, quantize, compute_dtype(precision, device), device)
    if read:
        try:
            attach(net, *read, where=adapter)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return net.to(device).eval(), tokenizer, task, labels


def _base_model(model: str | None, config, adapter: str | None) -> str:
    # --model, else the base model the adapter names; a named one that is not there says to pass --model.
    if model is not None:
        return resolve_model(model)
    named = config.base_model_name_or_path if config else None
    if named is None:
        raise ConfigError("--model is needed (the adapter does not name its base model)")
    try:
        return resolve_model(named)
    except ConfigError as e:
        raise ConfigError(f"{adapter} was trained on {named}, which cannot be loaded here ({e}); pass --model with "
                          f"the base model's directory or hub id") from None


def _read_adapter(adapter: str | None):
    # (config, tensors) of the adapter directory, or None without one; ConfigError for a directory that is not one.
    if not adapter:
        return None
    if not (Path(adapter) / CONFIG_NAME).is_file():
        raise ConfigError(f"{adapter} is not an adapter directory: it has no {CONFIG_NAME}")
    try:
        return read_adapter(adapter)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None


def default_device() -> torch.device:
    """The device a single-process run uses: the first GPU when there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
