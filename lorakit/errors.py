"""Every error lorakit raises for a user to read: one class per kind of mistake, each a ValueError or RuntimeError
so that callers who catch those keep working. The message says what was wrong and where (file, row, module, key,
shape, what was expected); the command line prints it without a traceback."""


class ConfigError(ValueError):
    """A setting that cannot work (bad value, model not found, target matching nothing, output dir in use)."""


class DataError(ValueError):
    """Bad input data: a missing file or column, an empty table, unknown labels."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: a shard missing, truncated or without the tensors the model needs."""


class TrainingError(RuntimeError):
    """Training stopped: a non-finite loss. The message names the step and the last good checkpoint."""


class CompileError(TrainingError):
    """--compile: torch.compile could not compile a transformer block; the message names the block's type and the
    compiler's first line."""


class KernelsError(ConfigError):
    """--kernels liger where Liger Kernel cannot run: not installed, not on CUDA, or a model family it does not patch."""


class Interrupted(RuntimeError):
    """Ctrl-C: training stopped after a step, with a checkpoint saved if the run saves any."""


class ServeError(ValueError):
    """An error the client sees as {"error": message} with HTTP `status`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class MemoryFull(ServeError):
    """The adapters that must stay loaded leave no room for one more (503 when it does not fit even alone)."""

    def __init__(self, message: str):
        super().__init__(503, message)
