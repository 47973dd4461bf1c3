"""lorakit: small, fast, exact LoRA fine-tuning with PEFT-compatible adapter files."""

from .config import LoraConfig
from .files import adapter_state_dict, load_adapter, read_adapter_config, save_adapter
from .inject import (active_adapters, configs, count_parameters, default_targets, delete_adapter, disable_adapters,
                     enable_input_grads, inject, is_merged, merge, set_adapter, unload, unmerge)
from .layers import LoraLayer, SavedModule
from .optim import optimizer

__version__ = "0.1.0"

__all__ = [
    "LoraConfig", "LoraLayer", "SavedModule", "__version__",
    "inject", "count_parameters", "default_targets", "save_adapter", "load_adapter", "read_adapter_config",
    "adapter_state_dict", "set_adapter", "active_adapters", "configs", "disable_adapters", "merge", "unmerge",
    "is_merged", "unload", "delete_adapter", "enable_input_grads", "optimizer",
]
