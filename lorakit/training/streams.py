"""fit()'s batches from a stream (--streaming): examples taken in stream order, batch after batch, with no epochs (a
stream's length is unknown until it has been read, so a streamed run needs --max-steps).

Micro-batch m is examples m·G .. (m+1)·G − 1 of the stream (G = --batch-size × processes), each process taking its
slice as seeded_batches does, so the batches follow from the sources and the seed alone. A run resumed at
micro-batch m (the checkpoint's RunState.micro) replays the stream up to it: the rows before are read and tokenised
again, and trained on no more.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ..runtime.distributed import World
from .fit import row_tokens


@dataclass
class StreamBatches:
    """fit.Batches' interface over a stream; `per_epoch` is None (no epochs)."""

    examples: Callable[[], Iterator[dict]]  # the stream from its beginning
    collate: Callable[[list[dict]], dict]
    batch_size: int
    world: World = World()
    per_epoch: int | None = None
    _position: tuple = field(default=(None, -1), init=False, repr=False)  # (the stream, its next micro-batch)

    def get(self, micro: int, device: torch.device) -> tuple[dict, int]:
        """Micro-batch number `micro`, collated, on `device`; and its real tokens."""
        width = self.batch_size * self.world.size
        stream, position = self._position
        if stream is None or position != micro:  # a resumed run, or a jump: replay from the start
            stream = self.examples()
            for _ in itertools.islice(stream, micro * width):
                pass
        start = self.world.rank * self.batch_size
        rows = list(itertools.islice(stream, width))[start: start + self.batch_size]
        self._position = (stream, micro + 1)
        batch = self.collate(rows)
        return {k: v.to(device) for k, v in batch.items()}, sum(map(row_tokens, rows))


@dataclass
class Streamed:
    """A run's streamed training examples (RunData.train under --streaming)."""

    examples: Callable[[], Iterator[dict]]  # the stream from its beginning

    def batches(self, collate, batch_size: int, world: World = World()) -> StreamBatches:
        """fit()'s batches of this stream."""
        return StreamBatches(self.examples, collate, batch_size, world)
