"""A model's parts: its LoRA layers and saved modules (by type), and the modules a LoraConfig targets and
saves in full, found and checked before the model changes. Module names are matched only in the planning functions,
as PEFT matches them (see config.name_matches).
"""

from __future__ import annotations

import difflib
from typing import Iterator

from torch import nn

from ..nn.kinds import kind_of
from ..nn.layers import LoraLayer, SavedModule
from .config import DEFAULT_TARGETS, LoraConfig, layer_index_ok, name_matches

HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs")  # transformers' names for task heads
# PEFT's task models add these names to modules_to_save (peft_model.py, PeftModelForSequenceClassification and
# friends): the task head is trained in full and saved with the adapter, and PEFT expects it in the file.
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}
TASK_TYPES = (("ForSequenceClassification", "SEQ_CLS"), ("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
              ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"),
              ("ForConditionalGeneration", "SEQ_2_SEQ_LM"))  # Hugging Face class-name endings -> PEFT task type


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) if isinstance(model, nn.parallel.DistributedDataParallel) else None
        inner = inner or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def default_targets(model: nn.Module) -> list[str]:
    """The architecture's default LoRA targets (attention query and value), from `model.config.model_type`."""
    model_type = getattr(getattr(unwrap(model), "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise ValueError(f"no default LoRA targets for model type {model_type!r}: pass targets=[...] "
                         f"(module names or suffixes) or targets='all-linear'")
    return list(DEFAULT_TARGETS[model_type])


def default_task_type(model: nn.Module) -> str | None:
    """PEFT's task type for a Hugging Face model class ("SEQ_CLS" for *ForSequenceClassification, ...), else None."""
    cls = type(unwrap(model)).__name__
    return next((task for suffix, task in TASK_TYPES if cls.endswith(suffix)), None)


def task_heads(model: nn.Module, task_type: str | None) -> list[str]:
    """The heads PEFT's `task_type` trains and saves: those of its TASK_HEADS names that are modules of `model`."""
    return [n for n in TASK_HEADS.get(task_type, ()) if isinstance(getattr(unwrap(model), n, None), nn.Module)]


def configs(model: nn.Module) -> dict[str, LoraConfig]:
    """{adapter name: LoraConfig} of the adapters on `model` (empty if none)."""
    return getattr(unwrap(model), "lora_configs", {})


def active_adapters(model: nn.Module) -> tuple[str, ...]:
    """Names of the adapters applied in forward."""
    return getattr(unwrap(model), "lora_active", ())


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """{module path: LoraLayer} for every adapted layer."""
    return {n: m for n, m in unwrap(model).named_modules() if isinstance(m, LoraLayer)}


def saved_modules(model: nn.Module) -> dict[str, SavedModule]:
    """{module path: SavedModule} for every modules_to_save wrapper."""
    return {n: m for n, m in unwrap(model).named_modules() if isinstance(m, SavedModule)}


def base_biases(model: nn.Module) -> dict[str, nn.Parameter]:
    """{module path: bias} for every module of the base model with a bias parameter (LoRA layers hold their base's;
    modules_to_save copies are not the base model's)."""
    return {path: m.bias for path, m in base_modules(unwrap(model))
            if not isinstance(m, SavedModule) and isinstance(getattr(m, "bias", None), nn.Parameter)}


def base_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(path, module) for every module of the base model: a LoRA layer or a SavedModule is listed, its insides
    (adapters, saved copies) are not."""
    for name, child in model.named_children():
        path = f"{prefix}{name}"
        yield path, child
        if not isinstance(child, (LoraLayer, SavedModule)):
            yield from base_modules(child, path + ".")


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put `new` where the submodule at `path` was."""
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, new)


def base_of(module: nn.Module) -> nn.Module:
    """The layer a LoRA layer wraps, or the module itself."""
    return module.base_layer if isinstance(module, LoraLayer) else module


def is_output_head(model: nn.Module, path: str, module: nn.Module) -> bool:
    """The output embeddings, or a top-level task head: "all-linear" and QLoRA leave these alone."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return module is head or path.split(".")[0] in HEAD_NAMES


def plan_targets(model: nn.Module, config: LoraConfig) -> dict[str, tuple[int, float]]:
    """{module path: (rank, scale)} for every layer `config` adapts in `model`, checked: each target exists and is
    a supported layer type, and each rank fits its layer. Raises ValueError naming what is wrong."""
    model = unwrap(model)
    targets = config.targets if config.targets is not None else default_targets(model)
    candidates = dict(base_modules(model))
    if targets == "all-linear":
        saved = list(config.modules_to_save or [])
        matched = [n for n, m in candidates.items() if getattr(kind_of(base_of(m)), "linear", False)
                   and not is_output_head(model, n, m) and not (saved and name_matches(n, saved))]
    else:
        matched = [n for n in candidates if name_matches(n, targets)]
    if config.exclude is not None:
        matched = [n for n in matched if not name_matches(n, config.exclude)]
    matched = [n for n in matched if layer_index_ok(n, config)]
    if not matched:
        raise ValueError(_no_match_message(targets, candidates))
    return {name: _checked_rank(name, candidates[name], config) for name in matched}


def _checked_rank(name: str, module: nn.Module, config: LoraConfig) -> tuple[int, float]:
    base = base_of(module)
    kind = kind_of(base)
    if kind is None:
        raise ValueError(f"target {name!r} is a {type(module).__name__}; LoRA adapts Linear, Conv1D, Embedding "
                         f"and Conv2d layers (name a layer inside it instead)")
    if config.lora_bias and not kind.biased:  # PEFT refuses it too: its Embedding's B is a bare tensor
        raise ValueError(f"lora_bias is not supported on {type(base).__name__} layers such as {name!r}; exclude them "
                         f"or target other layers")
    r = config.rank_for(name)
    d_in, d_out = kind.dims(base)
    if r > min(d_in, d_out):
        raise ValueError(f"rank {r} is too large for {name!r} ({type(base).__name__} with d_in={d_in}, "
                         f"d_out={d_out}): r must be at most {min(d_in, d_out)}")
    return r, config.scale_for(name)


def _no_match_message(targets, candidates: dict) -> str:
    names = sorted({n.rsplit(".", 1)[-1] for n in candidates} | set(candidates))
    wanted = [targets] if isinstance(targets, str) else targets
    close = sorted({c for t in wanted for c in difflib.get_close_matches(t.rsplit(".", 1)[-1], names, n=5, cutoff=0.5)})
    layer_names = sorted({n.rsplit(".", 1)[-1] for n, m in candidates.items() if kind_of(base_of(m))})
    return (f"target modules {targets!r} match no module of the model. Closest names: {close or 'none'}. "
            f"Adaptable layer names here: {layer_names[:30]}")


def plan_saved_modules(model: nn.Module, config: LoraConfig, strict: bool = True) -> list[str]:
    """Module paths that `config.modules_to_save` names; with strict, each entry must match at least one module."""
    if not config.modules_to_save:
        return []
    candidates = dict(base_modules(unwrap(model)))
    found = []
    for wanted in config.modules_to_save:
        hits = [n for n in candidates if name_matches(n, [wanted])]
        hits = [n for n in hits if not any(n.startswith(h + ".") for h in hits)]  # outermost only
        if not hits and strict:
            raise ValueError(_no_match_message([wanted], candidates).replace("target modules", "modules_to_save"))
        found += hits
    return found
