"""Packing: tokenised examples concatenated into rows of at most max_length tokens, so that a batch holds few padding
tokens, with attention kept inside each example and the loss equal to the unpacked loss.

A packed row of examples a (3 tokens) and b (2 tokens):

    input_ids     a0   a1   a2   b0   b1
    position_ids   0    1    2    0    1      restart per example: the model's positions and the example boundaries
    labels       -100  a1   a2  -100  b1     the first token of an example predicts nothing, so that a2's logits
                                              (the end of a) are never trained to predict b0

Attention stays inside each example by one of (ATTENTION, chosen per attention implementation by `attention_mode`):

    position_ids  no attention_mask; transformers' masking_utils (read and tested in 5.24) turn restarting
                  position_ids into a block-diagonal causal mask for eager, sdpa and flex attention, but only when
                  the model runs without a KV cache: with `use_cache` on (the config default of Llama and GPT-2,
                  in training mode too), the mask silently stays plainly causal and examples see each other.
                  `attention_mode` turns the cache off.
    flatten       the batch as one row (1, total tokens): flash-attention reads the example boundaries from
                  position_ids only when the batch holds a single row (varlen kernels, no mask at all).
    block_mask    an explicit 4-D additive mask (batch, 1, L, L), 0 inside an example's causal block and the dtype's
                  minimum elsewhere, for attention code that ignores position_ids. Float, not bool: eager attention
                  adds the mask to its scores, so a bool mask would be added as 0/1 and silently mask nothing.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import defaultdict

import torch

from .conversations import IGNORE

ATTENTION = ("position_ids", "flatten", "block_mask")
# The packed-batch layout each transformers attention implementation needs (see the module docstring).
IMPLEMENTATIONS = {"eager": "position_ids", "sdpa": "position_ids", "flex_attention": "position_ids",
                   "flash_attention_2": "flatten", "flash_attention_3": "flatten"}


# ---- which examples go in which row ----

def best_fit(lengths: list[int], max_length: int) -> list[list[int]]:
    """Best-fit decreasing: longest examples first, each into the row with the least room that still holds it.
    Rows come out nearly full (the waste is what no remaining example fits). O(n log n): rows are kept in buckets
    by free room, and the distinct free sizes (at most max_length of them) in a sorted list."""
    rows, by_room, rooms = [], defaultdict(list), []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True):  # stable: ties keep data order
        n = lengths[i]
        k = bisect_left(rooms, n)
        if k < len(rooms):
            room = rooms[k]
            row = by_room[room].pop()
            if not by_room[room]:
                del rooms[k]
        else:
            room, row = max_length, len(rows)
            rows.append([])
        rows[row].append(i)
        if room - n:
            if not by_room[room - n]:
                insort(rooms, room - n)
            by_room[room - n].append(row)
    return rows


def sequential(lengths: list[int], max_length: int) -> list[list[int]]:
    """In data order, a new row whenever the next example does not fit: simple and streamable, but each row wastes
    on average about half an example's length."""
    rows, used = [], max_length
    for i, n in enumerate(lengths):
        if used + n > max_length:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


STRATEGIES = {"best-fit": best_fit, "sequential": sequential}


def pack_groups(lengths: list[int], max_length: int, strategy: str = "best-fit") -> list[list[int]]:
    """Indices of the examples of each packed row (every row's lengths sum to at most max_length)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"packing strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    too_long = [i for i, n in enumerate(lengths) if n > max_length or n < 1]
    if too_long:
        raise ValueError(f"examples {too_long[:5]} have lengths {[lengths[i] for i in too_long[:5]]}, outside "
                         f"1..{max_length}: truncate or drop them before packing")
    return STRATEGIES[strategy](list(lengths), max_length)


# ---- building the rows ----

def pack_rows(examples: dict, groups: list[list[int]]) -> dict:
    """Packed rows {input_ids, labels, position_ids} (lists) from `examples` (columns input_ids and labels, lists
    of lists) and the example indices of each row."""
    out = {"input_ids": [], "labels": [], "position_ids": []}
    for group in groups:
        ids, labels, positions = [], [], []
        for i in group:
            n = len(examples["input_ids"][i])
            ids += examples["input_ids"][i]
            labels += [IGNORE] + list(examples["labels"][i][1:])
            positions += range(n)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["position_ids"].append(positions)
    return out


def pack(dataset, max_length: int, strategy: str = "best-fit"):
    """A datasets.Dataset of packed rows {input_ids, labels, position_ids} from a tokenised datasets.Dataset
    (input_ids, labels); rows are gathered a thousand at a time, never the whole dataset in Python lists. Packing
    reorders examples (best-fit sorts by length): shuffle the packed rows for training."""
    import datasets
    import pyarrow.compute as pc

    lengths = []  # read as Arrow, in the dataset's order (a select() view included)
    for table in dataset.select_columns(["input_ids"]).with_format("arrow").iter(batch_size=65_536):
        lengths += pc.list_value_length(table["input_ids"]).to_pylist()
    groups = pack_groups(lengths, max_length, strategy)
    source = dataset.select_columns(["input_ids", "labels"])

    def gather(batch: dict) -> dict:
        flat = [i for group in batch["members"] for i in group]
        local, start = [], 0
        for group in batch["members"]:
            local.append(list(range(start, start + len(group))))
            start += len(group)
        return pack_rows(source[flat], local)

    return datasets.Dataset.from_dict({"members": groups}).map(gather, batched=True, remove_columns=["members"],
                                                                desc="lorakit: packing")


# ---- batches ----

def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, 1, L, L) additive mask: 0 where query i may attend key j (same example, j <= i), dtype's minimum
    elsewhere. Examples are told apart by position_ids restarting (a position that is not the previous one + 1)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    example = starts.cumsum(-1)  # (B, L): which example each token belongs to
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (example[:, :, None] == example[:, None, :]) & causal  # (B, L, L)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


class PackedCollator:
    """Batches of packed rows: input_ids, labels, position_ids of shape (B, L), L the longest row of the batch;
    shorter rows are filled with pad tokens that form an example of their own (positions from 0, labels -100).
    attention: "position_ids" (no mask), "flatten" (one row of all tokens, no padding) or "block_mask" (adds a
    4-D float attention_mask); see the module docstring and `attention_mode`."""

    def __init__(self, pad_token_id: int, attention: str = "position_ids"):
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
        self.pad_token_id, self.attention = pad_token_id, attention

    def __call__(self, rows: list[dict]) -> dict:
        if self.attention == "flatten":
            return {k: torch.tensor([[v for r in rows for v in r[k]]]) for k in ("input_ids", "labels", "position_ids")}
        width = max(len(r["input_ids"]) for r in rows)
        batch = {"input_ids": [], "labels": [], "position_ids": []}
        for r in rows:
            pad = width - len(r["input_ids"])
            batch["input_ids"].append(list(r["input_ids"]) + [self.pad_token_id] * pad)
            batch["labels"].append(list(r["labels"]) + [IGNORE] * pad)
            batch["position_ids"].append(list(r["position_ids"]) + list(range(pad)))
        batch = {k: torch.tensor(v) for k, v in batch.items()}
        if self.attention == "block_mask":
            batch["attention_mask"] = block_causal_mask(batch["position_ids"])
        return batch


def attention_mode(model) -> str:
    """The PackedCollator attention mode that keeps `model`'s attention inside each example, after turning its KV
    cache off (training needs none, and with one transformers ignores the example boundaries in position_ids).
    A transformers without position-id packing (no masking_utils.find_packed_sequence_indices) gets "block_mask";
    an unknown attention implementation is refused rather than guessed."""
    model.config.use_cache = False
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401 (4.53 and later)
    except ImportError:
        return "block_mask"
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"packing does not know attention implementation {impl!r}; known: "
                         f"{', '.join(IMPLEMENTATIONS)}")
    return IMPLEMENTATIONS[impl]


# ---- padding waste ----

def padding_stats(lengths: list[int], batch_size: int) -> dict:
    """Real and padded token counts of batching items of `lengths` in this order, batch_size at a time, each batch
    padded to its longest item: {"tokens", "slots", "waste"} (waste = padded share of the slots). For padded
    batches pass example lengths; for packed ones, row lengths."""
    tokens = sum(lengths)
    slots = sum(max(lengths[i:i + batch_size]) * len(lengths[i:i + batch_size])
                for i in range(0, len(lengths), batch_size))
    return {"tokens": tokens, "slots": slots, "waste": 1 - tokens / slots if slots else 0.0}
