"""lorakit: small, fast, exact LoRA fine-tuning with PEFT-compatible adapter files."""

from .adapters.attach import load_adapter
from .adapters.config import LoraConfig
from .adapters.files import read_adapter_config
from .adapters.inject import (
                     count_parameters,
                     delete_adapter,
                     enable_gradient_checkpointing,
                     enable_input_grads,
                     inject,
                     set_adapter,
)
from .adapters.merging import disable_adapters, is_merged, merge, unload, unmerge
from .adapters.optim import optimizer
from .adapters.parts import active_adapters, configs, default_targets
from .adapters.routing import load_adapter_with_head, route
from .nn.layers import LoraLayer, SavedModule
from .runtime.sharding import adapter_state_dict, save_adapter

__version__ = "0.1.0"

__all__ = [
    "LoraConfig", "LoraLayer", "SavedModule", "__version__",
    "inject", "count_parameters", "default_targets", "save_adapter", "load_adapter", "read_adapter_config",
    "adapter_state_dict", "set_adapter", "active_adapters", "configs", "disable_adapters", "merge", "unmerge",
    "is_merged", "unload", "delete_adapter", "enable_input_grads", "enable_gradient_checkpointing", "optimizer",
    "route", "load_adapter_with_head",
]
