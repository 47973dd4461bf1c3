"""`--compile`: torch.compile each transformer block of a model in place (regional compilation).

Each block found by `sharding.blocks` (by type: Hugging Face's `_no_split_modules`) gets `nn.Module.compile()`, which
compiles the block's call without wrapping the module, so parameter names and state_dict keys stay as they were (no
`_orig_mod.` prefix: adapter files and checkpoints are the same as without --compile). Call it after the adapters are
injected and gradient checkpointing is set up: the compiled blocks then hold the LoRA layers, and a checkpointed block
recomputes through its compiled call. Blocks of one type share their compiled code (torch.compile inlines modules and
passes their parameters as inputs), so a 16-layer model compiles each distinct block once, not 16 times.

torch.compile is lazy: a block compiles on its first call. A failure there is raised as CompileError naming the
block's type and the compiler's first line, never left to fall back silently to eager code.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..adapters.parts import unwrap
from ..errors import CompileError, ConfigError
from .sharding import blocks


def compile_blocks(model: nn.Module) -> list[nn.Module]:
    """Compile every transformer block of `model` in place (nn.Module.compile); the blocks compiled. ConfigError if
    the model has none (nothing to compile block by block)."""
    root = unwrap(model)
    found = blocks(root)
    if not found:
        raise ConfigError(f"--compile: {type(root).__name__} has no transformer blocks lorakit can find (its "
                          f"_no_split_modules names none of its modules); run without --compile")
    config = getattr(root, "config", None)
    if getattr(config, "use_cache", None):
        # A KV cache built by a training forward gives each block its own compiled graph (dynamo guards on the
        # cache's layer i), past torch.compile's recompile limit on a deep model; training needs no cache.
        config.use_cache = False
    for block in found:
        block.compile()
        # nn.Module.compile keeps the compiled call here; the guard turns the compiler's failure into a CompileError.
        block._compiled_call_impl = _naming_failures(block._compiled_call_impl, type(block).__name__)
    return found


def _naming_failures(compiled, block_type: str):
    """`compiled`, raising CompileError (block type, the compiler's first line) when torch.compile fails."""
    @functools.wraps(compiled)
    def call(*args, **kwargs):
        try:
            # transformers checkpoints a block inside its forward; an output-capturing hook in there reads a context
            # variable, which dynamo takes for a side effect the recompute would replay, and then compiles nothing
            # (a graph break in the checkpoint). Replaying it is not wanted anyway: the hook records outputs once.
            with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
                return compiled(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as e:
            first = _first_line(e)
            raise CompileError(f"--compile: torch.compile of {block_type} failed: {first} (run without --compile; "
                               f"TORCH_LOGS=+dynamo shows the whole trace)") from e
    return call


def _first_line(error: BaseException) -> str:
    """The compiler's own first line: that of the innermost error torch.compile wraps (dynamo's wrapper says only
    "backend='inductor' raised:"), with its type."""
    while getattr(error, "inner_exception", None) is not None or error.__cause__ is not None:
        error = getattr(error, "inner_exception", None) or error.__cause__
    line = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {line}" if line else type(error).__name__
