"""Injection on real models: targets, errors, named adapters, disable, merge state, delete, unload."""

import copy

import pytest
import torch
from tiny_models import minilm_classifier, small_cnn, tiny_gpt2, tiny_llama
from torch import nn

import lorakit
from lorakit.adapters.inject import saved_modules
from lorakit.nn.layers import LoraLayer, SavedModule

IDS = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


@pytest.fixture(scope="module")
def minilm():
    return minilm_classifier()


def _adapted(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, LoraLayer))


def test_default_targets_query_value_and_head(minilm):
    model = copy.deepcopy(minilm)
    before = _logits(model)
    lorakit.inject(model, lorakit.LoraConfig(r=8, targets=None, modules_to_save=["classifier"]))
    assert len(_adapted(model)) == 12 and all(n.endswith(("query", "value")) for n in _adapted(model))
    assert torch.equal(_logits(model), before)
    trainable, total = lorakit.count_parameters(model)
    expected = 12 * 2 * 384 * 8 + (384 * 4 + 4)
    assert trainable == expected and trainable / total < 0.01
    # base keys stay where they were
    keys = set(model.state_dict())
    assert "bert.encoder.layer.0.attention.self.query.weight" in keys
    assert "classifier.original_module.weight" in keys and "classifier.modules_to_save.default.weight" in keys


@pytest.mark.parametrize("modules_to_save, saved", [(None, ["classifier"]), ([], []), (["pooler"], ["bert.pooler"])])
def test_classifier_head_trains_unless_modules_to_save_says_otherwise(minilm, modules_to_save, saved):
    # None: the head trains and is saved, as with PEFT's SEQ_CLS; a list is taken as it is ([]: nothing).
    config = lorakit.LoraConfig(r=2, targets=["query"], modules_to_save=modules_to_save)
    model = lorakit.inject(copy.deepcopy(minilm), config)
    assert sorted(saved_modules(model)) == saved
    assert model.classifier.weight.requires_grad == ("classifier" in saved)


def test_target_forms(minilm):
    def adapted(**kw):
        model = copy.deepcopy(minilm)
        return _adapted(lorakit.inject(model, lorakit.LoraConfig(r=2, **kw)))

    assert len(adapted(targets=["attention.self.key"])) == 6
    assert adapted(targets=r".*layer\.0\.attention\.self\.(query|key)") == [
        "bert.encoder.layer.0.attention.self.key", "bert.encoder.layer.0.attention.self.query"]
    all_linear = adapted(targets="all-linear")
    assert len(all_linear) == 6 * 6 + 1 and "classifier" not in all_linear  # 6 Linear per layer + pooler
    assert len(adapted(targets=["query"], layers_to_transform=[0, 5])) == 2
    assert len(adapted(targets="all-linear", exclude=["intermediate.dense", "output.dense"])) == 6 * 3 + 1


def test_all_linear_skips_lm_head_and_handles_conv1d():
    model = lorakit.inject(tiny_gpt2(), lorakit.LoraConfig(r=2, targets="all-linear"))
    names = _adapted(model)
    assert "lm_head" not in names and len(names) == 2 * 4  # c_attn, c_proj, mlp.c_fc, mlp.c_proj per block
    assert all(model.get_submodule(n).kind.name == "conv1d" for n in names)


def test_rank_and_alpha_patterns_and_rslora():
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(
        r=4, alpha=8, targets=["q_proj", "v_proj"], rank_pattern={r"layers\.1\.self_attn\.q_proj": 2},
        alpha_pattern={"v_proj": 32}, use_rslora=True))
    q1, q0 = model.model.layers[1].self_attn.q_proj, model.model.layers[0].self_attn.q_proj
    assert q1.lora_A["default"].shape == (2, 32) and q0.lora_A["default"].shape == (4, 32)
    assert q0.adapters["default"].scale == pytest.approx(8 / 2)  # alpha / sqrt(r)
    assert model.model.layers[0].self_attn.v_proj.adapters["default"].scale == pytest.approx(32 / 2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), "r must be an integer >= 1"),
    (dict(dropout=1.0), "dropout must be in [0, 1)"),
    (dict(bias="some"), "bias must be one of"),
    (dict(init="xavier"), "init must be one of"),
    (dict(targets="("), "not a valid regex"),
    (dict(rank_pattern={"q": 0}), "rank_pattern['q'] must be an integer >= 1"),
    (dict(modules_to_save=[""]), "modules_to_save must be a list of module names ([] for none) or None"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        lorakit.LoraConfig(**kwargs)


def test_bad_targets_name_the_problem(minilm):
    model = copy.deepcopy(minilm)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"match no module.*Closest names: \['query'\]"):
        lorakit.inject(model, lorakit.LoraConfig(targets=["querry"]))
    with pytest.raises(ValueError, match=r"'bert.encoder.layer.0.attention.self' is a BertSelfAttention"):
        lorakit.inject(model, lorakit.LoraConfig(targets=[r"layer.0.attention.self"]))
    with pytest.raises(ValueError, match=r"rank 500 is too large for .*query.*d_in=384, d_out=384"):
        lorakit.inject(model, lorakit.LoraConfig(r=500, targets=["query"]))
    with pytest.raises(ValueError, match="modules_to_save .*match no module"):
        lorakit.inject(model, lorakit.LoraConfig(targets=["query"], modules_to_save=["clasifier"]))
    with pytest.raises(ValueError, match="no default LoRA targets"):
        lorakit.inject(small_cnn(), lorakit.LoraConfig())
    # nothing was changed by the failed calls
    assert _adapted(model) == [] and lorakit.configs(model) == {}
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_bias_modes(minilm):
    def trainable(bias):
        config = lorakit.LoraConfig(r=2, targets=["query"], bias=bias, modules_to_save=[])  # no head: biases only
        model = lorakit.inject(copy.deepcopy(minilm), config)
        return {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}

    assert trainable("none") == set()
    assert trainable("lora_only") == {f"bert.encoder.layer.{i}.attention.self.query.bias" for i in range(6)}
    assert len(trainable("all")) > 6 * 6


def test_named_adapters_switch_disable_delete(minilm):
    model = copy.deepcopy(minilm)
    base = _logits(model)
    lorakit.inject(model, lorakit.LoraConfig(r=4, targets=["query", "value"], init="random",
                                             modules_to_save=["classifier"]), name="news")
    with torch.no_grad():
        model.classifier.modules_to_save["news"].weight.add_(0.5)
    news = _logits(model)
    lorakit.inject(model, lorakit.LoraConfig(r=2, targets=["key"], init="random", modules_to_save=["classifier"]),
                   name="sports")
    assert lorakit.active_adapters(model) == ("sports",)
    sports = _logits(model)
    assert not torch.allclose(news, sports) and not torch.allclose(base, sports)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".sports" in n for n in trainable)  # only the newest adapter trains
    lorakit.set_adapter(model, "news")
    assert torch.allclose(_logits(model), news, atol=1e-6)
    with lorakit.disable_adapters(model):
        assert torch.allclose(_logits(model), base, atol=1e-6)  # head included
    assert torch.allclose(_logits(model), news, atol=1e-6)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['movies'\]"):
        lorakit.set_adapter(model, "movies")
    lorakit.delete_adapter(model, "news")
    assert lorakit.active_adapters(model) == () and list(lorakit.configs(model)) == ["sports"]
    assert torch.allclose(_logits(model), base, atol=1e-6)
    assert all(n.endswith("key") for n in _adapted(model))  # query/value layers became plain Linear again
    lorakit.set_adapter(model, "sports")
    assert torch.allclose(_logits(model), sports, atol=1e-6)


def test_merged_state_switching_and_disabling(minilm):
    model = copy.deepcopy(minilm)
    base = _logits(model)
    for name in ("a", "b"):
        lorakit.inject(model, lorakit.LoraConfig(r=4, targets=["query", "value"], init="random"), name=name)
    outputs = {}
    for name in ("a", "b"):
        lorakit.set_adapter(model, name)
        outputs[name] = _logits(model)
    lorakit.merge(model)
    assert lorakit.is_merged(model) and torch.allclose(_logits(model), outputs["b"], atol=1e-5)
    lorakit.set_adapter(model, "a")  # stays merged, now with "a"
    assert lorakit.is_merged(model)
    assert torch.allclose(_logits(model), outputs["a"], atol=1e-5)
    layer = model.bert.encoder.layer[0].attention.self.query
    assert layer.merged == ["a"] and layer.running() == ()
    with lorakit.disable_adapters(model):
        assert not lorakit.is_merged(model) and torch.allclose(_logits(model), base, atol=1e-5)
    assert lorakit.is_merged(model)
    lorakit.unmerge(model)
    assert torch.allclose(_logits(model), outputs["a"], atol=1e-5)


def test_merge_refuses_non_finite_and_changes_nothing():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    lorakit.inject(model, lorakit.LoraConfig(r=2, targets=["0", "1"], init="random"))
    with torch.no_grad():
        model[1].lora_B["default"].fill_(float("inf"))
    weights = [m.weight.detach().clone() for m in model]
    with pytest.raises(ValueError, match="non-finite"):
        lorakit.merge(model)
    assert not lorakit.is_merged(model)
    assert all(torch.equal(m.weight, w) for m, w in zip(model, weights))


def test_merge_overflow_check_is_exact_where_the_cheap_bound_fails():
    # finite A and B whose product overflows fp32 are refused; a product the norm bound cannot clear but that is
    # really zero (B's big column meets A's zero row) merges
    model = nn.Sequential(nn.Linear(4, 4))
    lorakit.inject(model, lorakit.LoraConfig(r=2, targets=["0"], init="random"))
    a, b = model[0].lora_A["default"], model[0].lora_B["default"]
    with torch.no_grad():
        a.fill_(1e20), b.fill_(1e20)
    with pytest.raises(ValueError, match="non-finite"):
        lorakit.merge(model)
    with torch.no_grad():
        a.zero_(), b.zero_()
        a[1].fill_(1e20)
        b[:, 0].fill_(1e20)
    weight = model[0].weight.detach().clone()
    lorakit.merge(model)
    assert lorakit.is_merged(model) and torch.equal(model[0].weight, weight)


@pytest.mark.parametrize("make", [minilm_classifier, tiny_gpt2, tiny_llama])
def test_unload(make):
    model = make()
    original = copy.deepcopy(model)
    types = {n: type(m) for n, m in model.named_modules()}
    ids = IDS.clamp(max=100)
    ref = model(input_ids=ids).logits
    saved = ["classifier"] if hasattr(model, "classifier") else None
    lorakit.inject(model, lorakit.LoraConfig(r=4, targets="all-linear", init="random", modules_to_save=saved))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        plain = lorakit.unload(copy.deepcopy(model), merge=True)
        assert not any(isinstance(m, (LoraLayer, SavedModule)) for m in plain.modules())
        assert torch.allclose(plain(input_ids=ids).logits, adapted, atol=1e-5)
        restored = lorakit.unload(model, merge=False)
        assert {n: type(m) for n, m in restored.named_modules()} == types
        assert restored.state_dict().keys() == original.state_dict().keys()
        assert all(torch.equal(v, original.state_dict()[k]) for k, v in restored.state_dict().items())
        assert torch.equal(restored(input_ids=ids).logits, ref)
        assert not hasattr(restored, "lora_configs")


def test_gpt2_tied_embeddings_and_embedding_lora():
    model = tiny_gpt2()
    ids = torch.randint(0, 128, (2, 9))
    ref = model(input_ids=ids).logits
    lorakit.inject(model, lorakit.LoraConfig(r=4, targets=["wte", "c_attn"], init="random"))
    assert model.transformer.wte.weight is model.lm_head.weight  # tying survives injection
    out = model(input_ids=ids).logits
    assert not torch.allclose(out, ref)
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"cannot merge .* into 'transformer.wte'.*shared with \['lm_head'\]"):
        lorakit.merge(model)  # merging would change the tied output head too
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    lorakit.delete_adapter(model, "default")
    lorakit.inject(model, lorakit.LoraConfig(r=4, targets=["c_attn"], init="random"))
    out = model(input_ids=ids).logits
    lorakit.merge(model)
    assert torch.allclose(model(input_ids=ids).logits, out, atol=1e-5)


def test_training_step_changes_only_adapter(minilm):
    model = lorakit.inject(copy.deepcopy(minilm), lorakit.LoraConfig(r=4, dropout=0.1, targets=["query", "value"],
                                                                      modules_to_save=["classifier"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    loss = model(input_ids=IDS, attention_mask=MASK, labels=torch.tensor([2])).loss
    loss.backward()
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert model.bert.encoder.layer[0].attention.self.query.lora_B["default"].abs().sum() > 0
