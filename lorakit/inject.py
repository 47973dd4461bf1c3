"""Model-level LoRA: inject adapters into chosen layers, switch, disable, merge, unload, delete.

Every function here takes the model (a torch.nn.Module, usually a Hugging Face model) and works in place.
The adapters' configs live on the model as `model.lora_configs` ({name: LoraConfig}); the layers hold the
weights (see layers.py).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import logging
import warnings

import torch
from torch import nn

from .config import DEFAULT_TARGETS, LoraConfig, layer_index_ok, name_matches, replace
from .layers import LoraLayer, SavedModule, layer_dims, layer_kind

log = logging.getLogger("lorakit")


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


# PEFT's task models add these names to modules_to_save (peft_model.py, PeftModelForSequenceClassification and
# friends): the task head is trained in full and saved with the adapter, and PEFT expects it in the file.
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


def default_task_type(model: nn.Module) -> str | None:
    """PEFT's task type for a Hugging Face model class ("SEQ_CLS" for *ForSequenceClassification, ...), else None."""
    cls = type(unwrap(model)).__name__
    for suffix, task in (("ForSequenceClassification", "SEQ_CLS"), ("ForCausalLM", "CAUSAL_LM"),
                         ("LMHeadModel", "CAUSAL_LM"), ("ForTokenClassification", "TOKEN_CLS"),
                         ("ForQuestionAnswering", "QUESTION_ANS"), ("ForConditionalGeneration", "SEQ_2_SEQ_LM")):
        if cls.endswith(suffix):
            return task
    return None


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


# ---- planning: everything that can be wrong is found here, before the model changes ----

def _candidate_modules(model: nn.Module) -> dict[str, nn.Module]:
    # Every module a target may name; nothing inside a LoRA layer or a SavedModule (not the base model's).
    out, skip = {}, ()
    for name, module in model.named_modules():
        if not name or name.startswith(skip):
            continue
        if isinstance(module, (LoraLayer, SavedModule)):
            skip += (name + ".",)
        out[name] = module
    return out


def _is_output_head(model: nn.Module, name: str, module: nn.Module) -> bool:
    # "all-linear" leaves the task head alone: the output embeddings, and top-level heads by their usual names.
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return module is head or name.split(".")[0] in ("lm_head", "classifier", "score", "qa_outputs")


def plan_targets(model: nn.Module, config: LoraConfig) -> dict[str, tuple[int, float]]:
    """{module path: (rank, scale)} for every layer `config` adapts in `model`, checked: each target exists and is
    a supported layer type, and each rank fits its layer. Raises ValueError naming what is wrong."""
    model = unwrap(model)
    targets = config.targets if config.targets is not None else default_targets(model)
    candidates = _candidate_modules(model)
    saved = set(config.modules_to_save or [])
    if targets == "all-linear":
        matched = [n for n, m in candidates.items() if layer_kind(m) in ("linear", "conv1d")
                   and not _is_output_head(model, n, m) and not (saved and name_matches(n, list(saved)))]
    else:
        matched = [n for n in candidates if name_matches(n, targets)]
    if config.exclude is not None:
        matched = [n for n in matched if not name_matches(n, config.exclude)]
    matched = [n for n in matched if layer_index_ok(n, config)]
    if not matched:
        raise ValueError(_no_match_message(targets, candidates))
    plan = {}
    for name in matched:
        module = candidates[name]
        if layer_kind(module) is None:
            raise ValueError(f"target {name!r} is a {type(module).__name__}; LoRA adapts Linear, Conv1D, Embedding "
                             f"and Conv2d layers (name a layer inside it instead)")
        r = config.rank_for(name)
        d_in, d_out = layer_dims(module)
        if r > min(d_in, d_out):
            raise ValueError(f"rank {r} is too large for {name!r} ({type(module).__name__} with d_in={d_in}, "
                             f"d_out={d_out}): r must be at most {min(d_in, d_out)}")
        plan[name] = (r, config.scale_for(name))
    return plan


def _no_match_message(targets, candidates: dict) -> str:
    names = sorted({n.rsplit(".", 1)[-1] for n in candidates} | set(candidates))
    wanted = [targets] if isinstance(targets, str) else targets
    close = sorted({c for t in wanted for c in difflib.get_close_matches(t.rsplit(".", 1)[-1], names, n=5, cutoff=0.5)})
    layer_names = sorted({n.rsplit(".", 1)[-1] for n, m in candidates.items() if layer_kind(m)})
    return (f"target modules {targets!r} match no module of the model. Closest names: {close or 'none'}. "
            f"Adaptable layer names here: {layer_names[:30]}")


def plan_saved_modules(model: nn.Module, config: LoraConfig, strict: bool = True) -> list[str]:
    """Module paths that `config.modules_to_save` names; with strict, each entry must match at least one module."""
    if not config.modules_to_save:
        return []
    candidates = _candidate_modules(unwrap(model))
    found = []
    for wanted in config.modules_to_save:
        hits = [n for n, m in candidates.items() if name_matches(n, [wanted])]
        hits = [n for n in hits if not any(n.startswith(h + ".") for h in hits)]  # outermost only
        if not hits and strict:
            raise ValueError(_no_match_message([wanted], candidates).replace("target modules", "modules_to_save"))
        found += hits
    return found


# ---- changing the model ----

def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, new)


def inject(model: nn.Module, config: LoraConfig, name: str = "default") -> nn.Module:
    """Add adapter `name` to the layers `config` targets, freeze every other parameter, make it the active
    adapter, and return the model (changed in place). The output is unchanged until B is trained (B = 0).
    With modules_to_save=None a task model's head (TASK_HEADS) trains too, as in PEFT; [] keeps it frozen."""
    root = unwrap(model)
    check_new_name(root, name)
    plan = plan_targets(root, config)
    if config.modules_to_save is None:  # as in PEFT, a task model's head trains and is saved (unless a LoRA target)
        heads = task_heads(root, config.task_type or default_task_type(root))
        heads = [h for h in heads if not any(p == h or p.startswith(h + ".") for p in plan)]
        config = replace(config, modules_to_save=heads or None)
    saved = plan_saved_modules(root, config)
    overlap = [p for p in plan if any(p == s or p.startswith(s + ".") for s in saved)]
    if overlap:
        raise ValueError(f"modules {overlap} are both LoRA targets and inside modules_to_save; choose one")
    _add(root, config, name, plan, saved)
    set_adapter(root, name)
    _mark_trainable(root, name)
    return model


def check_new_name(model: nn.Module, name: str) -> None:
    """Raise unless `name` can name a new adapter on `model`."""
    if name in configs(model):
        raise ValueError(f"adapter {name!r} already exists on this model; delete_adapter() it or pick another name")
    if not isinstance(name, str) or not name.isidentifier() or hasattr(nn.ParameterDict(), name):
        raise ValueError(f"adapter name {name!r} must be a Python identifier that is not a dict method name")


def _add(root: nn.Module, config: LoraConfig, name: str, plan: dict, saved: list[str]) -> None:
    for path, (r, scale) in plan.items():
        layer = root.get_submodule(path)
        if not isinstance(layer, LoraLayer):
            layer = LoraLayer(layer)
            _replace(root, path, layer)
        if config.quantize == "nf4":
            layer.quantize_base()
        layer.add_adapter(name, r, scale, config.dropout, config.init, config.use_dora)
    for path in saved:
        wrapper = root.get_submodule(path)
        if not isinstance(wrapper, SavedModule):
            wrapper = SavedModule(wrapper)
            _replace(root, path, wrapper)
        wrapper.modules_to_save[name] = copy.deepcopy(wrapper.original_module)
    root.lora_configs = {**configs(root), name: config}


def _mark_trainable(root: nn.Module, name: str) -> None:
    # Only adapter `name` trains: its A, B, its modules_to_save copies and, per config.bias, biases.
    for p in root.parameters():
        p.requires_grad_(False)
    bias = root.lora_configs[name].bias
    for layer in lora_layers(root).values():
        if name in layer.lora_A:
            layer.lora_A[name].requires_grad_(True)
            layer.lora_B[name].requires_grad_(True)
            if name in layer.lora_magnitude_vector:
                layer.lora_magnitude_vector[name].requires_grad_(True)
            if bias == "lora_only" and layer.bias is not None:
                layer.bias.requires_grad_(True)
    for wrapper in saved_modules(root).values():
        if name in wrapper.modules_to_save:
            wrapper.modules_to_save[name].requires_grad_(True)
    if bias == "all":
        for pname, p in root.named_parameters():
            if pname.endswith("bias") and ".original_module." not in pname:
                p.requires_grad_(True)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each parameter counted once."""
    params = list(unwrap(model).parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def set_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Make `names` the active adapter(s); their updates are summed in forward. If the model is merged, the old
    adapters are unmerged and the new ones merged, so the model stays merged (zero added latency)."""
    root = unwrap(model)
    names = (names,) if isinstance(names, str) else tuple(names)
    unknown = [n for n in names if n not in configs(root)]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; this model has {sorted(configs(root))}")
    was_merged = is_merged(root)
    if was_merged:
        unmerge(root)
    root.lora_active = names
    for layer in lora_layers(root).values():
        layer.set_active(names)
    for wrapper in saved_modules(root).values():
        wrapper.active = next((n for n in names if n in wrapper.modules_to_save), None)
    if was_merged:
        merge(root)


def is_merged(model: nn.Module) -> bool:
    """True when any adapter is folded into the base weights."""
    return any(layer.merged for layer in lora_layers(model).values())


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Inside the block the model behaves as the base model: no LoRA update, original modules_to_save modules.
    Merged adapters are unmerged for the block and merged again after it. (Biases trained with bias='all' or
    'lora_only' stay trained: they are base parameters.)"""
    root = unwrap(model)
    was_merged = is_merged(root)
    if was_merged:
        unmerge(root)
    modules = list(lora_layers(root).values()) + list(saved_modules(root).values())
    for m in modules:
        m.disabled = True
        if isinstance(m, LoraLayer):
            m.restore_pissa_base(+1)
            m._refresh()
    try:
        yield model
    finally:
        for m in modules:
            m.disabled = False
            if isinstance(m, LoraLayer):
                m.restore_pissa_base(-1)
                m._refresh()
        if was_merged:
            merge(root)


def merge(model: nn.Module) -> None:
    """Fold scale · B @ A of the active adapters into the base weights (idempotent). Forward then costs what the
    base model costs. Raises, with nothing merged, if an adapter would make a weight non-finite."""
    _merge_active(model)


def _merge_active(model: nn.Module) -> None:
    root = unwrap(model)
    pending = [(path, layer, name) for path, layer in lora_layers(root).items()
               for name in layer.active if name not in layer.merged]
    owners = {}  # parameter id -> every module holding it (more than one: tied weights)
    for param_name, p in root.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(param_name.rpartition(".")[0])
    for path, layer, name in pending:  # check everything first, so that a refusal changes nothing
        tied = [o for o in owners.get(id(layer.weight), []) if o != path]
        if tied:
            raise ValueError(f"cannot merge adapter {name!r} into {path!r}: its weight is shared with {tied} "
                             f"(tied weights), which would change too; keep it unmerged")
        if not layer.merge_stays_finite(name):
            raise ValueError(f"merging adapter {name!r} into {path!r} gives non-finite weights; the adapter is broken")
    for path, layer, name in pending:
        quantized = layer.weight_nf4 is not None
        error = layer.merge(name)
        if quantized:
            log.info("merged adapter %r into NF4 layer %r: dequantized to %s; max |merged W - (dequantized W + "
                     "scale·BA)| = %.3g", name, path, layer.weight.dtype, error)


def unmerge(model: nn.Module) -> None:
    """Take every merged adapter back out of the base weights (W ← W − scale · B @ A)."""
    for layer in lora_layers(model).values():
        for name in list(layer.merged):
            layer.unmerge(name)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` everywhere (unmerging it first). Layers left with no adapter become plain layers again."""
    root = unwrap(model)
    if name not in configs(root):
        raise ValueError(f"unknown adapter {name!r}; this model has {sorted(configs(root))}")
    for path, layer in lora_layers(root).items():
        if name in layer.lora_A:
            layer.delete_adapter(name)
            if not layer.lora_A:
                _replace(root, path, _restore_base(layer))
    for path, wrapper in saved_modules(root).items():
        if name in wrapper.modules_to_save:
            del wrapper.modules_to_save[name]
            if wrapper.active == name:
                wrapper.active = None
            if not len(wrapper.modules_to_save):
                _replace(root, path, wrapper.original_module)
    root.lora_configs = {k: v for k, v in configs(root).items() if k != name}
    root.lora_active = tuple(a for a in active_adapters(root) if a != name)


def _restore_base(layer: LoraLayer) -> nn.Module:
    layer.dequantize_base()  # a plain layer needs a plain weight
    base = layer.base_layer
    base.weight = layer.weight  # the same Parameter, unless someone re-assigned it on the LoRA layer
    if layer.bias is not None:
        base.bias = layer.bias
    return base


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove every lorakit module and return a plain model. merge=True folds the active adapters into the weights
    and keeps their modules_to_save copies (the trained heads); merge=False restores the base model exactly
    (merged adapters are taken out first, original modules_to_save modules put back)."""
    root = unwrap(model)
    if merge:
        _merge_active(root)
    else:
        unmerge(root)
    for path, layer in lora_layers(root).items():
        for n in [n for n in layer.pissa_init if n not in layer.merged]:  # merged PiSSA already gives W0 + ΔW
            layer._shift_weight(*layer.pissa_init[n], layer.scaling[n], +1.0)
        _replace(root, path, _restore_base(layer))
    for path, wrapper in saved_modules(root).items():
        keep = wrapper.current() if merge else wrapper.original_module
        _replace(root, path, keep)
    for attr in ("lora_configs", "lora_active"):
        if attr in root.__dict__:
            delattr(root, attr)
    return model


def enable_input_grads(model: nn.Module) -> None:
    """Make the input embeddings' output require grad, so that gradient checkpointing with a frozen base still
    back-propagates into the adapters (the usual pitfall of checkpointing a model whose first layers are frozen)."""
    root = unwrap(model)
    embeddings = root.get_input_embeddings() if hasattr(root, "get_input_embeddings") else None
    if embeddings is None:
        warnings.warn("model has no get_input_embeddings(); gradient checkpointing may see no gradient", stacklevel=2)
        return
    embeddings.register_forward_hook(lambda module, args, output: output.requires_grad_(True))


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{parameter name: tensor} of every trainable parameter (what a training checkpoint needs)."""
    return {n: p.detach() for n, p in unwrap(model).named_parameters() if p.requires_grad}
