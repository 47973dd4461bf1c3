"""LoraConfig: what to adapt and how, validated on construction, and its PEFT JSON form."""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass, field

BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = ("kaiming", "gaussian", "zeros", "random", "pissa")
QUANTIZE_MODES = (None, "nf4")

# Attention projections adapted by default, per Hugging Face `config.model_type` (as in the LoRA paper: query and value).
QUERY_VALUE, Q_V_PROJ, FUSED_QKV = ["query", "value"], ["q_proj", "v_proj"], ["query_key_value"]
DEFAULT_TARGETS = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra", "albert", "vit"), QUERY_VALUE),
    **dict.fromkeys(("gptj", "gpt_neo", "opt", "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2",
                     "phi", "bart"), Q_V_PROJ),
    **dict.fromkeys(("gpt_neox", "bloom", "falcon"), FUSED_QKV),
    "mpnet": ["q", "v"], "t5": ["q", "v"], "deberta": ["in_proj"], "deberta-v2": ["query_proj", "value_proj"],
    "distilbert": ["q_lin", "v_lin"], "gpt2": ["c_attn"], "phi3": ["qkv_proj"],
}


@dataclass
class LoraConfig:
    """Hyperparameters of one LoRA adapter. ΔW = (alpha / r) · B @ A, B: (d_out, r), A: (r, d_in).

    targets: module names matched exactly or as a dotted suffix ("query" matches "...attention.self.query"),
    a regex string matched against the full module name, or "all-linear" (every Linear/Conv1D but the output
    head); None means the architecture's default (see DEFAULT_TARGETS).
    """

    r: int = 8  # rank of the update
    alpha: float = 16  # scale numerator: scale = alpha / r (alpha / sqrt(r) with use_rslora)
    dropout: float = 0.0  # dropout on the LoRA branch's input only
    targets: list[str] | str | None = None
    exclude: list[str] | str | None = None  # same matching rules as targets; wins over them
    bias: str = "none"  # "none" | "all" (every bias trains) | "lora_only" (biases of adapted layers train)
    # Modules trained in full and saved with the adapter. None: a task model's head, as PEFT does (see inject);
    # []: none, the head stays frozen and the file carries no task_type.
    modules_to_save: list[str] | None = None
    init: str = "kaiming"  # A: kaiming-uniform | gaussian (std 1/r) | zeros; B = 0. "random": B random too (tests)
    rank_pattern: dict[str, int] = field(default_factory=dict)  # {regex on module name: r}
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # {regex on module name: alpha}
    layers_to_transform: list[int] | int | None = None  # only these layer indices (".layer.3." style names)
    layers_pattern: list[str] | str | None = None  # name of the layer list ("layer", "h", "layers"); None: any
    use_rslora: bool = False  # rank-stabilised scale alpha / sqrt(r)
    use_dora: bool = False
    lora_bias: bool = False  # B carries a trainable bias (PEFT's lora_B.bias), scaled like B·A; zero at init
    quantize: str | None = None  # "nf4": 4-bit NormalFloat frozen base weights (QLoRA)
    base_model_name_or_path: str | None = None  # metadata written to adapter_config.json
    task_type: str | None = None  # PEFT task type ("SEQ_CLS", "CAUSAL_LM", ...), metadata
    extra: dict = field(default_factory=dict)  # PEFT fields lorakit does not interpret, kept for the round trip

    def __post_init__(self):
        if isinstance(self.targets, (tuple, set)):
            self.targets = sorted(self.targets) if isinstance(self.targets, set) else list(self.targets)
        if isinstance(self.modules_to_save, (tuple, set, str)):
            self.modules_to_save = [self.modules_to_save] if isinstance(self.modules_to_save, str) else list(self.modules_to_save)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        _check(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r >= 1, f"r must be an integer >= 1, got {self.r!r}")
        _check(isinstance(self.alpha, (int, float)) and self.alpha > 0, f"alpha must be a number > 0, got {self.alpha!r}")
        _check(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout!r}")
        _check(self.bias in BIAS_MODES, f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        _check(self.init in INIT_MODES, f"init must be one of {INIT_MODES}, got {self.init!r}")
        _check(self.quantize in QUANTIZE_MODES, f"quantize must be one of {QUANTIZE_MODES}, got {self.quantize!r}")
        _check(isinstance(self.lora_bias, bool), f"lora_bias must be true or false, got {self.lora_bias!r}")
        _check(not (self.lora_bias and self.use_dora), "lora_bias is not supported with DoRA (PEFT refuses it too: "
               "DoRA rescales W + ΔW per row, where a bias on B has no defined place)")
        _check(not (self.lora_bias and self.init in ("gaussian", "pissa")), f"lora_bias needs init 'kaiming', "
               f"'zeros' or 'random' (PEFT refuses lora_bias with init_lora_weights={self.init!r}), got {self.init!r}")
        _check(not (self.quantize and self.init == "pissa"), "PiSSA on a quantized base is not supported: PiSSA "
               "rewrites the base weight as a residual, which a quantized weight cannot hold exactly")
        for name in ("targets", "exclude"):
            value = getattr(self, name)
            ok = value is None or isinstance(value, str) or (isinstance(value, list) and all(isinstance(t, str) and t for t in value))
            _check(ok and value != [], f"{name} must be a list of module names, a regex string or None, got {value!r}")
            if isinstance(value, str) and value != "all-linear":
                _check_regex(value, name)
        _check(self.modules_to_save is None or all(isinstance(m, str) and m for m in self.modules_to_save),
               f"modules_to_save must be a list of module names ([] for none) or None, got {self.modules_to_save!r}")
        for key, rank in self.rank_pattern.items():
            _check_regex(key, "rank_pattern")
            _check(isinstance(rank, int) and rank >= 1, f"rank_pattern[{key!r}] must be an integer >= 1, got {rank!r}")
        for key, alpha in self.alpha_pattern.items():
            _check_regex(key, "alpha_pattern")
            _check(isinstance(alpha, (int, float)) and alpha > 0, f"alpha_pattern[{key!r}] must be > 0, got {alpha!r}")
        if self.layers_to_transform is not None:
            _check(all(isinstance(i, int) and i >= 0 for i in self.layers_to_transform),
                   f"layers_to_transform must be non-negative integers, got {self.layers_to_transform!r}")

    def rank_for(self, module_name: str) -> int:
        """The rank of `module_name`: the first matching rank_pattern entry, else r."""
        return next((v for k, v in self.rank_pattern.items() if _pattern_matches(k, module_name)), self.r)

    def scale_for(self, module_name: str) -> float:
        """alpha / r for `module_name` (alpha / sqrt(r) with use_rslora), after rank and alpha patterns."""
        r = self.rank_for(module_name)
        alpha = next((v for k, v in self.alpha_pattern.items() if _pattern_matches(k, module_name)), self.alpha)
        return alpha / (r ** 0.5 if self.use_rslora else r)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"LoraConfig: {message}")


def _check_regex(pattern: str, field_name: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"LoraConfig: {field_name} {pattern!r} is not a valid regex: {e}") from None


def _pattern_matches(pattern: str, module_name: str) -> bool:
    # PEFT's rule for rank/alpha patterns: the pattern matches a whole dotted suffix of the name.
    return re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module_name) is not None


def name_matches(module_name: str, targets: list[str] | str) -> bool:
    """PEFT's target rule: a regex string must match the whole name; a list entry matches the name or a dotted suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module_name) is not None
    return any(module_name == t or module_name.endswith("." + t) for t in targets)


def layer_index_ok(module_name: str, config: LoraConfig) -> bool:
    """True when layers_to_transform is unset, or the module sits in one of the listed layer indices."""
    if config.layers_to_transform is None:
        return True
    patterns = config.layers_pattern or [r"[^.]*"]
    patterns = [patterns] if isinstance(patterns, str) else patterns
    for p in patterns:
        m = re.match(rf".*\.{p}\.(\d+)\.", module_name)
        if m:
            return int(m.group(1)) in config.layers_to_transform
    return False


# ---- PEFT's adapter_config.json <-> LoraConfig. The only place that knows PEFT's field names. ----

_TO_PEFT = {
    "r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "targets": "target_modules",
    "exclude": "exclude_modules", "bias": "bias", "modules_to_save": "modules_to_save",
    "rank_pattern": "rank_pattern", "alpha_pattern": "alpha_pattern", "layers_to_transform": "layers_to_transform",
    "layers_pattern": "layers_pattern", "use_rslora": "use_rslora", "use_dora": "use_dora", "lora_bias": "lora_bias",
    "base_model_name_or_path": "base_model_name_or_path", "task_type": "task_type",
}
_INIT_TO_PEFT = {"kaiming": True, "gaussian": "gaussian", "zeros": False, "random": False, "pissa": "pissa"}
# PEFT fields that only describe how PEFT itself ran, or that are harmless at these values.
_PEFT_BOOKKEEPING = {"peft_type", "peft_version", "inference_mode", "revision", "auto_mapping", "fan_in_fan_out",
                     "megatron_core", "qalora_group_size", "init_lora_weights"}


def to_peft_dict(config: LoraConfig, fan_in_fan_out: bool = False) -> dict:
    """The adapter_config.json dict PEFT reads (`peft.LoraConfig` field names)."""
    out = {"peft_type": "LORA", "inference_mode": True, "fan_in_fan_out": fan_in_fan_out,
           "init_lora_weights": _INIT_TO_PEFT[config.init]}
    for ours, theirs in _TO_PEFT.items():
        out[theirs] = getattr(config, ours)
    if config.quantize:
        out["lorakit_quantize"] = config.quantize  # PEFT ignores unknown keys with a warning; QLoRA needs a quantized base there
    return {**config.extra, **out}


def from_peft_dict(data: dict) -> LoraConfig:
    """A LoraConfig from PEFT's adapter_config.json dict. Unknown fields are kept in `extra`, with a warning
    when they hold a value lorakit would not reproduce."""
    if data.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter_config.json: peft_type is {data.get('peft_type')!r}; lorakit loads only LORA adapters")
    theirs_to_ours = {v: k for k, v in _TO_PEFT.items()}
    kwargs, extra = {}, {}
    for key, value in data.items():
        if key in theirs_to_ours:
            kwargs[theirs_to_ours[key]] = value
        elif key not in _PEFT_BOOKKEEPING and key != "lorakit_quantize":
            extra[key] = value
    init = data.get("init_lora_weights", True)
    kwargs["init"] = {True: "kaiming", False: "random", "gaussian": "gaussian", "pissa": "pissa"}.get(init, "kaiming")
    kwargs["quantize"] = data.get("lorakit_quantize")
    kwargs = {k: v for k, v in kwargs.items() if v is not None or k in ("targets", "base_model_name_or_path", "task_type")}
    for key in ("rank_pattern", "alpha_pattern"):
        kwargs[key] = kwargs.get(key) or {}
    meaningful = {k: v for k, v in extra.items() if v not in (None, False, {}, [], "") and not k.startswith("lorakit_")}
    for key in ("loftq_config", "megatron_config", "layer_replication", "trainable_token_indices", "target_parameters"):
        if meaningful.get(key):
            raise ValueError(f"adapter_config.json: {key}={meaningful[key]!r} is a PEFT feature lorakit does not support")
    if meaningful:
        warnings.warn(f"adapter_config.json: fields lorakit does not interpret, kept as they are: {sorted(meaningful)}",
                      stacklevel=2)
    return LoraConfig(**kwargs, extra=extra)


def replace(config: LoraConfig, **changes) -> LoraConfig:
    """A validated copy of `config` with some fields changed."""
    return dataclasses.replace(config, **changes)
