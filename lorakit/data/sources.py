"""Training data from several sources: the list of sources a run names, their mixing weights, the examples each
epoch draws from each source, and the seeded share of each source held out for evaluation.

Mixing (`--data-weights`). Without weights the sources are concatenated: an epoch is every example of every source
once, so each source counts by its size. With weights w_1..w_k, an epoch still holds as many examples as all sources
together (N = n_1 + ... + n_k), and source i gives c_i of them, its share w_i / sum(w) of N rounded by largest
remainders (so that the c_i add up to N exactly; ties go to the earlier source). A source draws its c_i examples
without replacement, in seeded passes over it: one smaller than its share repeats (every example ⌊c_i/n_i⌋ or
⌈c_i/n_i⌉ times), one larger is subsampled. Each epoch is drawn anew from the seed and the epoch number, and the
examples of all sources are shuffled together.

Held-out eval (`--eval-split`). The share is held out of each source on its own, not of the mixed set: every source
then has its part in the evaluation (a small source is not left out by chance), and the weights apply to what is
left for training. Source i holds out round(share × n_i) examples (halves round up), chosen by a seeded permutation.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError


def source_list(value) -> list[str]:
    """The sources a `data` setting names: one string, or a list of them (none: the empty list)."""
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def one_or_many(value):
    """A `data` setting as saved: one source as a plain string (as a single --data always was), several as a list."""
    sources = source_list(value)
    return None if not sources else sources[0] if len(sources) == 1 else sources


def parse_weights(value, sources: int) -> list[float] | None:
    """--data-weights "0.7,0.3" (or a list) as floats, one per source; None: no weights (sizes decide). ConfigError
    naming the flag for a count that differs from the sources', a weight that is no number, is negative or not
    finite, or weights that add up to zero."""
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v.strip()]
    try:
        weights = [float(v) for v in items]
    except (TypeError, ValueError):
        raise ConfigError(f"--data-weights {value!r}: expected numbers separated by commas, e.g. 0.7,0.3") from None
    if len(weights) != sources:
        raise ConfigError(f"--data-weights: {len(weights)} weight{'s' if len(weights) != 1 else ''} for {sources} "
                          f"--data source{'s' if sources != 1 else ''}; give one weight per source, in their order")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ConfigError(f"--data-weights {weights}: every weight must be a finite number >= 0")
    if sum(weights) <= 0:
        raise ConfigError(f"--data-weights {weights}: the weights add up to 0; at least one must be > 0")
    return weights


def apportion(total: int, weights: list[float]) -> list[int]:
    """`total` split in proportion to `weights` by largest remainders: whole counts that add up to `total`."""
    quotas = [total * w / sum(weights) for w in weights]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + epoch * 1_009 + stream)


def draw(size: int, count: int, generator: torch.Generator) -> list[int]:
    """`count` indices into range(size), without replacement in passes: seeded permutations, one after another."""
    out = []
    while len(out) < count:
        out += torch.randperm(size, generator=generator).tolist()
    return out[:count]


def mixed_order(sizes: list[int], weights: list[float], seed: int, epoch: int) -> list[int]:
    """The examples of one weighted epoch, as indices into the sources concatenated in their order (source i's
    example j is sum(sizes[:i]) + j): sum(sizes) of them, source i's count by `apportion`, shuffled together."""
    g = _generator(seed, epoch)
    picked, offset = [], 0
    for size, count in zip(sizes, apportion(sum(sizes), weights)):
        picked += [offset + j for j in draw(size, count, g)]
        offset += size
    return [picked[k] for k in torch.randperm(len(picked), generator=g).tolist()]


def held_out_count(size: int, share: float) -> int:
    """How many of a source's `size` examples --eval-split `share` holds out: round(share × size), halves up."""
    return math.floor(share * size + 0.5)


def split_indices(size: int, share: float, seed: int, source: int) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices) of a source of `size` examples, each in data order: a seeded choice of
    held_out_count of them (`source`, the source's place in the list, gives each source its own draw)."""
    chosen = torch.randperm(size, generator=_generator(seed, 0, 7_919 * (source + 1))).tolist()
    held = sorted(chosen[: held_out_count(size, share)])
    kept = sorted(set(range(size)) - set(held))
    return kept, held
