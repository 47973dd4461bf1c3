"""Mixed-adapter batches (routing.py): every row through its own adapter equals that row run alone with
set_adapter, for every layer kind, LoRA and DoRA, mixed ranks and scales, heads of different sizes, generate(); and
PEFT's adapter_names gives the same logits."""

import threading

import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit.adapters.parts import lora_layers, saved_modules

ADAPTERS = {  # name: config changes; different ranks, an rsLoRA scale, a DoRA adapter where DoRA applies
    "a": dict(r=2, alpha=4),
    "b": dict(r=4, alpha=8, use_rslora=True),
    "c": dict(r=3, alpha=3, use_dora=True),
}
ROWS = ["a", None, "b", "c", "a", "b"]


def _kind_model(kind: str):
    torch.manual_seed(0)
    layer = {"linear": lambda: nn.Linear(12, 10), "conv1d": lambda: Conv1D(10, 12),
             "embedding": lambda: nn.Embedding(20, 10, padding_idx=0), "nf4": lambda: nn.Linear(64, 32),
             "conv2d": lambda: nn.Conv2d(3, 6, 3, padding=1, stride=2)}[kind]()
    torch.manual_seed(1)
    x = {"embedding": torch.randint(0, 20, (6, 7)), "conv2d": torch.randn(6, 3, 8, 8),
         "nf4": torch.randn(6, 5, 64)}.get(kind, torch.randn(6, 7, 12))
    return nn.Sequential(layer), x


def _add_adapters(model, targets, names, **extra):
    for i, name in enumerate(names):
        config = lorakit.LoraConfig(targets=targets, init="random", **ADAPTERS[name], **extra)
        torch.manual_seed(10 + i)
        lorakit.inject(model, config, name=name)
    with torch.no_grad():  # DoRA magnitudes away from ‖W‖ and heads away from the base's, so that both matter
        for layer in lora_layers(model).values():
            for m in layer.lora_magnitude_vector.values():
                m.mul_(torch.linspace(0.5, 1.5, m.numel()))
        for wrapper in saved_modules(model).values():
            for copy in wrapper.modules_to_save.values():
                for p in copy.parameters():
                    p.normal_()
    return model.eval()


@torch.no_grad()
def _each_row_alone(model, rows, call):
    """Row i's output with set_adapter(rows[i]) (None: adapters disabled), one row at a time."""
    out = []
    for i, name in enumerate(rows):
        if name is None:
            with lorakit.disable_adapters(model):
                out.append(call(i))
        else:
            lorakit.set_adapter(model, name)
            out.append(call(i))
    return out


@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding", "conv2d", "nf4"])
def test_mixed_batch_equals_each_row_with_set_adapter(kind, device):
    model, x = _kind_model(kind)
    dora = kind in ("linear", "conv1d", "nf4")
    names = ["a", "b", "c"] if dora else ["a", "b"]
    _add_adapters(model, ["0"], names, quantize="nf4" if kind == "nf4" else None)
    model, x = model.to(device), x.to(device)
    rows = [n if n in names else "a" for n in ROWS]
    with torch.no_grad(), lorakit.route(model, rows):
        mixed = model(x)
    alone = torch.cat(_each_row_alone(model, rows, lambda i: model(x[i:i + 1])))
    torch.testing.assert_close(mixed, alone, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the rows really differ by adapter: routing is not a no-op
        lorakit.set_adapter(model, "a")
        assert not torch.allclose(mixed[2], model(x)[2], atol=1e-4)


def test_rows_flattened_across_tokens_are_routed_by_row():
    class Flat(nn.Module):  # some models run their Linear on (N·T, d)
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(12, 10)

        def forward(self, x):
            return self.proj(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)

    torch.manual_seed(0)
    model = _add_adapters(Flat(), ["proj"], ["a", "b", "c"])
    x = torch.randn(4, 5, 12)
    rows = ["c", None, "a", "b"]
    with torch.no_grad(), lorakit.route(model, rows):
        mixed = model(x)
    torch.testing.assert_close(mixed, torch.cat(_each_row_alone(model, rows, lambda i: model(x[i:i + 1]))))


def _bert(num_labels=3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        vocab_size=128, num_labels=num_labels)
    return BertForSequenceClassification(config).eval()


def _batch():
    torch.manual_seed(2)
    ids = torch.randint(1, 128, (6, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = mask[4, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_classifier_with_heads_matches_set_adapter_and_peft_adapter_names():
    import peft

    model = _add_adapters(_bert(), ["query", "value"], ["a", "b"], modules_to_save=["classifier"])
    batch = _batch()
    rows = ["a", "b", None, "b", "a", None]
    with torch.no_grad(), lorakit.route(model, rows):
        mixed = model(**batch).logits
    alone = _each_row_alone(model, rows, lambda i: model(**{k: v[i:i + 1] for k, v in batch.items()}).logits)
    torch.testing.assert_close(mixed, torch.cat(alone), atol=1e-5, rtol=1e-5)

    reference = _bert()  # the same adapters in PEFT, mixed with its adapter_names argument
    for i, name in enumerate(["a", "b"]):
        options = ADAPTERS[name]
        config = peft.LoraConfig(r=options["r"], lora_alpha=options["alpha"], use_rslora=options.get("use_rslora", False),
                                 target_modules=["query", "value"], modules_to_save=["classifier"])
        if i == 0:
            reference = peft.get_peft_model(reference, config, adapter_name=name)
        else:
            reference.add_adapter(name, config)
        peft.set_peft_model_state_dict(reference, lorakit.adapter_state_dict(model, name), adapter_name=name)
    with torch.no_grad():
        theirs = reference.eval()(**batch, adapter_names=[n or "__base__" for n in rows]).logits
    torch.testing.assert_close(mixed, theirs, atol=1e-5, rtol=1e-5)


def test_heads_of_different_sizes_give_each_row_its_own_logits(tmp_path):
    trained = _add_adapters(_bert(), ["query", "value"], ["a"], modules_to_save=["classifier"])
    lorakit.save_adapter(trained, tmp_path / "four", name="a")
    two = _add_adapters(_bert(num_labels=2), ["query", "value"], ["b"], modules_to_save=["classifier"])
    lorakit.save_adapter(two, tmp_path / "two", name="b")

    model = _bert(num_labels=3)
    head = model.classifier.weight.clone()
    lorakit.load_adapter_with_head(model, tmp_path / "four", "news")
    lorakit.load_adapter_with_head(model, tmp_path / "two", "sentiment")
    assert torch.equal(model.classifier.original_module.weight, head)  # the model's own head is untouched
    batch = _batch()
    rows = ["sentiment", "news", None, "news", "sentiment", "sentiment"]
    with torch.no_grad(), lorakit.route(model, rows):
        mixed = model(**batch).logits
    assert mixed.shape == (6, 3)
    alone = _each_row_alone(model, rows, lambda i: model(**{k: v[i:i + 1] for k, v in batch.items()}).logits)
    for i, expected in enumerate(alone):
        width = expected.shape[-1]
        assert width == (2 if rows[i] == "sentiment" else 3)
        torch.testing.assert_close(mixed[i, :width], expected[0], atol=1e-5, rtol=1e-5)
        assert torch.isneginf(mixed[i, width:]).all()
    with torch.no_grad():
        lorakit.set_adapter(two, "b")
        torch.testing.assert_close(alone[0], two(**{k: v[:1] for k, v in batch.items()}).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make,targets,beams", [(tiny_gpt2, ["c_attn"], 1), (tiny_llama, ["q_proj", "v_proj"], 2)])
def test_generate_routes_every_row(make, targets, beams):
    model = _add_adapters(make(), targets, ["a", "c"])
    torch.manual_seed(4)
    ids = torch.randint(1, 128, (3, 6))
    rows = ["c", None, "a"]
    options = dict(max_new_tokens=6, do_sample=False, num_beams=beams, pad_token_id=0)
    with torch.no_grad(), lorakit.route(model, rows):
        mixed = model.generate(ids, attention_mask=torch.ones_like(ids), **options)
    alone = _each_row_alone(model, rows, lambda i: model.generate(ids[i:i + 1], attention_mask=torch.ones_like(ids[:1]),
                                                                  **options))
    assert torch.equal(mixed, torch.cat(alone))
    assert len({tuple(r.tolist()) for r in mixed}) > 1


def test_refusals():
    model = _add_adapters(_bert(), ["query"], ["a", "b"])
    batch = _batch()
    with pytest.raises(ValueError, match="unknown adapter"):
        with lorakit.route(model, ["a", "nope"]):
            pass
    with pytest.raises(ValueError, match="not a multiple of the 4 routed rows"), torch.no_grad():
        with lorakit.route(model, ["a", "b", None, "a"]):
            model(**batch)
    model.train()
    with pytest.raises(ValueError, match="model.eval"):
        with lorakit.route(model, ["a"]):
            pass
    model.eval()
    lorakit.merge(model)
    with pytest.raises(ValueError, match="unmerged base"):
        with lorakit.route(model, ["a", "b"]):
            pass


def test_other_threads_are_not_routed_and_adapter_changes_wait():
    model = _add_adapters(_bert(), ["query", "value"], ["a", "b"])
    batch = _batch()
    rows = ["a", "b", None, "b", "a", None]
    with torch.no_grad():
        with lorakit.route(model, rows):
            expected = model(**batch).logits
        lorakit.set_adapter(model, "a")
        plain = model(**batch).logits
    seen, done = {}, threading.Event()

    def other_thread():  # a plain forward and an adapter change, while the main thread is inside route()
        with torch.no_grad():
            seen["plain"] = model(**batch).logits
        lorakit.inject(model, lorakit.LoraConfig(r=2, targets=["query", "key"], init="random"), name="x")
        done.set()
        lorakit.delete_adapter(model, "x")

    with torch.no_grad(), lorakit.route(model, rows):
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join(timeout=0.5)  # the plain forward runs; inject waits for the route to end
        assert not done.is_set()
        torch.testing.assert_close(model(**batch).logits, expected)
    worker.join()
    assert done.is_set()
    torch.testing.assert_close(seen["plain"], plain)
    assert sorted(lorakit.configs(model)) == ["a", "b"]
