"""Packing: which examples share a row, the rows' labels and positions, the batches, and the loss of tiny random
Llama and GPT-2 models packed against unpacked (equal within float tolerance, for every attention layout)."""

import random

import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama

from lorakit.data.packing import (
    ATTENTION,
    STRATEGIES,
    PackedCollator,
    attention_mode,
    pack,
    pack_groups,
    pack_rows,
    padding_stats,
)


def test_best_fit_and_sequential_by_hand():
    lengths = [5, 3, 4, 2, 6]
    # Longest first: 6 opens row 0 (room 2), 5 row 1 (room 3), 4 row 2 (room 4); 3 fits row 1 exactly, 2 row 0.
    assert pack_groups(lengths, 8) == [[4, 3], [0, 1], [2]]
    assert pack_groups(lengths, 8, "sequential") == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match=r"examples \[1\] have lengths \[9\], outside 1..8"):
        pack_groups([3, 9], 8)
    with pytest.raises(ValueError, match="strategy must be one of"):
        pack_groups([3], 8, "random")


def test_every_example_lands_in_exactly_one_row_that_fits():
    rng = random.Random(0)
    lengths = [min(256, int(rng.lognormvariate(3.5, 1.0)) + 1) for _ in range(2000)]
    rows = {s: pack_groups(lengths, 256, s) for s in STRATEGIES}
    for strategy, groups in rows.items():
        assert sorted(i for g in groups for i in g) == list(range(len(lengths))), strategy
        assert max(sum(lengths[i] for i in g) for g in groups) <= 256, strategy
    lower_bound = -(-sum(lengths) // 256)
    assert lower_bound <= len(rows["best-fit"]) <= lower_bound + 1 < len(rows["sequential"])


def test_rows_restart_positions_and_ignore_each_examples_first_label():
    examples = {"input_ids": [[1, 2, 3], [4, 5], [6]], "labels": [[-100, 2, 3], [4, 5], [6]]}
    assert pack_rows(examples, [[0, 1], [2]]) == {
        "input_ids": [[1, 2, 3, 4, 5], [6]],
        "labels": [[-100, 2, 3, -100, 5], [-100]],
        "position_ids": [[0, 1, 2, 0, 1], [0]]}


def test_pack_a_dataset_view_in_its_own_order():
    import datasets

    rows = [{"input_ids": list(range(1, n + 1)), "labels": list(range(1, n + 1)), "attention_mask": [1] * n}
            for n in (2, 5, 3, 4, 1)]
    view = datasets.Dataset.from_list(rows).select([4, 3, 2, 1])  # lengths 1, 4, 3, 5
    # Best fit into 6: the 5 (view row 3) opens a row that the 1 (view row 0) fills; the 4 and the 3 open their own.
    assert pack(view, max_length=6).to_dict() == {
        "input_ids": [[1, 2, 3, 4, 5, 1], [1, 2, 3, 4], [1, 2, 3]],
        "labels": [[-100, 2, 3, 4, 5, -100], [-100, 2, 3, 4], [-100, 2, 3]],
        "position_ids": [[0, 1, 2, 3, 4, 0], [0, 1, 2, 3], [0, 1, 2]]}


def test_collator_pads_with_an_example_of_its_own():
    rows = [{"input_ids": [7, 8, 9], "labels": [-100, 8, 9], "position_ids": [0, 0, 1]},
            {"input_ids": [5], "labels": [-100], "position_ids": [0]}]
    batch = PackedCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].tolist() == [[7, 8, 9], [5, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 8, 9], [-100, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 0, 1], [0, 0, 1]] and "attention_mask" not in batch
    flat = PackedCollator(0, "flatten")(rows)
    assert flat["input_ids"].tolist() == [[7, 8, 9, 5]] and flat["position_ids"].tolist() == [[0, 0, 1, 0]]
    mask = PackedCollator(0, "block_mask")(rows)["attention_mask"]
    low = torch.finfo(torch.float32).min
    assert mask.shape == (2, 1, 3, 3)
    assert mask[0, 0].tolist() == [[0, low, low], [low, 0, low], [low, 0, 0]]  # examples [7] and [8, 9]
    assert mask[1, 0].tolist() == [[0, low, low], [low, 0, low], [low, 0, 0]]  # [5], then padding [0, 0]
    with pytest.raises(ValueError, match="attention must be one of"):
        PackedCollator(0, "none")


def random_examples(n: int, vocab: int = 128, seed: int = 0) -> list[dict]:
    """Examples of 3..20 tokens whose first tokens (a prompt) are not targets, as chat examples are."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(3, 20))]
        prompt = rng.randint(1, len(ids) - 1)
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def packed_rows(examples: list[dict], groups: list[list[int]]) -> list[dict]:
    columns = pack_rows({k: [e[k] for e in examples] for k in ("input_ids", "labels")}, groups)
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def summed_loss(model, batch: dict) -> tuple[float, int]:
    """(sum of the per-token losses, number of target tokens) of one batch; the model's loss is their mean."""
    with torch.no_grad():
        loss = model(**batch).loss
    count = int((batch["labels"][:, 1:] != -100).sum())
    return float(loss) * count, count


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(MODELS))
def test_packed_loss_equals_unpacked_loss(name, impl, attention):
    model = MODELS[name]()
    model.set_attn_implementation(impl)
    examples = random_examples(12)
    unpacked = [summed_loss(model, {k: torch.tensor([e[k]]) for k in ("input_ids", "labels")}) for e in examples]
    if attention != "block_mask":  # position_ids and flatten need the cache off; an explicit mask works either way
        assert attention_mode(model) == "position_ids" and model.config.use_cache is False
    rows = packed_rows(examples, pack_groups([len(e["input_ids"]) for e in examples], 32))
    collate = PackedCollator(pad_token_id=0, attention=attention)
    packed = [summed_loss(model, collate(rows[i:i + 2])) for i in range(0, len(rows), 2)]
    assert len(rows) < len(examples)
    assert sum(c for _, c in packed) == sum(c for _, c in unpacked)
    assert sum(s for s, _ in packed) == pytest.approx(sum(s for s, _ in unpacked), rel=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_with_the_kv_cache_on_position_ids_alone_let_examples_see_each_other(name):
    # Why attention_mode turns use_cache off: transformers 5 ignores packed position_ids when a cache exists.
    model = MODELS[name]()
    assert model.config.use_cache
    examples = random_examples(6)
    rows = packed_rows(examples, [list(range(6))])
    batch = PackedCollator(0)(rows)
    leaky, _ = summed_loss(model, batch)
    attention_mode(model)
    sealed, _ = summed_loss(model, batch)
    assert leaky != pytest.approx(sealed, rel=1e-4)


def test_attention_mode_by_implementation():
    from types import SimpleNamespace

    def model(impl):
        return SimpleNamespace(config=SimpleNamespace(_attn_implementation=impl, use_cache=True))

    assert attention_mode(model("flex_attention")) == "position_ids"
    flash = model("flash_attention_2")
    assert attention_mode(flash) == "flatten" and flash.config.use_cache is False
    with pytest.raises(ValueError, match="does not know attention implementation 'paged_attention'"):
        attention_mode(model("paged_attention"))


def test_padding_stats_by_hand():
    assert padding_stats([2, 4, 3, 1, 5], batch_size=2) == {"tokens": 15, "slots": 8 + 6 + 5, "waste": 1 - 15 / 19}
    assert padding_stats([], 2) == {"tokens": 0, "slots": 0, "waste": 0.0}


def test_prepared_chat_data_packs_to_the_same_loss():
    # The whole route: conversations -> prepare (datasets) -> pack (datasets) -> collator -> a tiny Llama.
    import pandas as pd
    from chat_tokenizers import CHATML, chat_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.data import prepare as P

    tok = chat_tokenizer(CHATML)
    talks = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
             for q, a in [("hello there", "fine thanks"), ("what is the topic", "sports"), ("how are you", "fine"),
                          ("be brief", "world news"), ("hi", "hello there, how are you")]]
    prepared = P.prepare(pd.DataFrame({"messages": talks}), tok, max_length=64).dataset
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok))).eval()
    unpacked = [summed_loss(model, {k: torch.tensor([row[k]]) for k in ("input_ids", "labels")}) for row in prepared]
    packed_ds = pack(prepared, max_length=64)
    assert len(packed_ds) < len(prepared)
    batch = PackedCollator(tok.pad_token_id, attention_mode(model))(packed_ds.to_list())
    total, count = summed_loss(model, batch)
    assert count == sum(c for _, c in unpacked)
    assert total == pytest.approx(sum(s for s, _ in unpacked), rel=1e-5)
