"""Preference runs for test_preference_distributed.py, every one in the same torchrun processes:

    torchrun --nproc_per_node=N tests/preference_cases.py '[{TrainConfig fields}, ...]'

Each case is one `train(TrainConfig(**case))`. The first joins the process group and every case keeps it: a group
joined again after train() left it hangs under torchrun's store, so the script leaves it once, at its end."""

from __future__ import annotations

import json
import sys

import torch

from lorakit.runtime.distributed import shutdown
from lorakit.training import train as train_module
from lorakit.training.settings import TrainConfig

if __name__ == "__main__":
    torch.set_num_threads(1)
    train_module.shutdown = lambda world: None
    for case in json.loads(sys.argv[1]):
        metrics = train_module.train(TrainConfig(**case), echo=lambda *_: None, progress=False)
    torch.distributed.barrier()
    shutdown(train_module.World(size=metrics["world_size"]))
