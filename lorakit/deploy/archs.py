"""The architectures `lorakit export --format gguf|gguf-lora` writes, and what each needs: its llama.cpp architecture,
its hyperparameters as GGUF keys, its tensors under llama.cpp's names (the `gguf` package's own TensorNameMap) and
the query/key row order llama.cpp expects.

Llama and Mistral checkpoints from Hugging Face order each head's query/key rows for rotate-half RoPE; llama.cpp's
"llama" architecture rotates adjacent pairs, so llama.cpp's converter permutes those rows (per head: the first half
and the second half interleaved). Qwen2 runs with rotate-half ("NEOX") RoPE in llama.cpp: its rows stay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class Arch:
    """How one Hugging Face model_type becomes a llama.cpp architecture."""

    gguf_arch: str  # the name of gguf.MODEL_ARCH's member
    permute_qk: bool  # Hugging Face's rotate-half row order -> llama.cpp's interleaved one


ARCHS = {
    "llama": Arch("LLAMA", permute_qk=True),
    "mistral": Arch("LLAMA", permute_qk=True),  # llama.cpp runs Mistral as "llama", as its converter does
    "qwen2": Arch("QWEN2", permute_qk=False),
}
ROPE_TYPES = ("default", "linear", "llama3")  # what hparams() can say in GGUF


def arch_of(config) -> Arch:
    """The Arch of a Hugging Face config, or a ConfigError naming what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise ConfigError(f"GGUF export supports the model types {sorted(ARCHS)} (Llama family); this model is "
                          f"{model_type!r}")
    rope_type = _rope(config).get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"GGUF export supports RoPE scaling {list(ROPE_TYPES)}; this model uses {rope_type!r}")
    if getattr(config, "use_sliding_window", False):
        raise ConfigError("GGUF export: this Qwen2 model uses sliding-window attention, which llama.cpp's qwen2 "
                          "architecture does not run")
    return ARCHS[model_type]


def notes(config) -> list[str]:
    """What llama.cpp will run differently from transformers, said once at export."""
    window = getattr(config, "sliding_window", None) if config.model_type == "mistral" else None
    if window and window < config.max_position_embeddings:
        return [f"note: this Mistral model attends within a sliding window of {window} tokens; llama.cpp runs it as "
                f"'llama' over the whole context, so outputs differ past {window} tokens"]
    return []


def gguf_arch(arch: Arch):
    import gguf

    return getattr(gguf.MODEL_ARCH, arch.gguf_arch)


def arch_name(arch: Arch) -> str:
    import gguf

    return gguf.MODEL_ARCH_NAMES[gguf_arch(arch)]


def _rope(config) -> dict:
    # transformers 5 keeps theta and scaling in rope_parameters; 4.x in rope_theta and rope_scaling.
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def write_hparams(writer, config) -> None:
    """The architecture's hyperparameters as GGUF keys (llama.cpp reads them under the architecture's prefix)."""
    import gguf

    heads = config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) != config.hidden_size // heads:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    rope = _rope(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def extra_tensors(config) -> dict[str, torch.Tensor]:
    """Tensors llama.cpp needs that the checkpoint does not hold: Llama 3.1's RoPE frequency factors."""
    if _rope(config)["rope_type"] != "llama3":
        return {}
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    dim = head_dim(config)
    plain = 1.0 / (float(_rope(config)["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return {"rope_freqs.weight": (plain / scaled.double()).float()}  # llama.cpp divides each frequency by its factor


class TensorNames:
    """Hugging Face tensor keys -> llama.cpp's GGUF names, by the `gguf` package's TensorNameMap."""

    def __init__(self, config, arch: Arch):
        import gguf

        self.config, self.arch = config, arch
        self.map = gguf.TensorNameMap(gguf_arch(arch), config.num_hidden_layers)

    def find(self, key: str):
        """(MODEL_TENSOR kind, GGUF name) of Hugging Face tensor `key` (ending .weight or .bias); ConfigError if
        llama.cpp has no place for it."""
        found = self.map.get_type_and_name(key, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise ConfigError(f"GGUF export: llama.cpp's {arch_name(self.arch)} architecture has no tensor for {key!r}")
        return found

    def reorder_rows(self, kind, rows: torch.Tensor) -> torch.Tensor:
        """A query/key weight's or bias's output rows (or a LoRA B's) in llama.cpp's order; others unchanged."""
        import gguf

        if not self.arch.permute_qk or kind not in (gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K):
            return rows
        heads = self.config.num_attention_heads
        if kind == gguf.MODEL_TENSOR.ATTN_K:
            heads = getattr(self.config, "num_key_value_heads", None) or heads
        shape = rows.shape
        return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
