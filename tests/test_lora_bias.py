"""lora_bias: PEFT's bias on lora_B (its lora_B is a Linear with a bias, scaled with B·A), with PEFT as the oracle:
gradients, a trained run's file in PEFT, merge and export, mixed-adapter batches, the rank tools and every refusal.
(Loading PEFT's files and saving for PEFT, per model kind, are cells of test_interop's table.)"""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_rank import logits, save_random_adapter
from test_train import run_cfg
from tiny_models import small_cnn, tiny_bert, tiny_gpt2, tiny_llama

import lorakit
from lorakit.adapters.config import from_peft_dict, to_peft_dict
from lorakit.adapters.parts import lora_layers
from lorakit.errors import ConfigError
from lorakit.io.export import export_merged
from lorakit.nn.layers import LoraLayer
from lorakit.rank import analyze, combine, resize
from lorakit.rank.adapters import read
from lorakit.training.settings import TrainConfig, lora_config
from lorakit.training.train import train

peft = pytest.importorskip("peft")

IDS = torch.tensor([[1, 17, 42, 99, 7, 3, 0, 0], [1, 5, 64, 2, 0, 0, 0, 0]])
BIAS_KEY = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.bias"


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's advice (fan_in_fan_out, a lora_bias layer without a base bias)
        yield


def _biased(model, targets, seed=3, **options):
    """`model` with a lorakit lora_bias adapter whose A, B and B's bias are all random (non-zero)."""
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, targets=targets, init="random", lora_bias=True,
                                             modules_to_save=[], **options))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for c in layer.lora_B_bias.values():
                c.copy_(torch.randn(c.shape, generator=g) * 0.5)
    return model


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_config_reads_and_writes_peft_key():
    config = from_peft_dict({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q"], "lora_bias": True})
    assert config.lora_bias is True and "lora_bias" not in config.extra
    assert to_peft_dict(config)["lora_bias"] is True
    assert to_peft_dict(lorakit.LoraConfig(r=4))["lora_bias"] is False
    assert peft.LoraConfig(**{k: v for k, v in to_peft_dict(config).items() if k != "peft_type"}).lora_bias is True


def test_starts_as_the_base_model_and_bias_trains():
    model = lorakit.inject(tiny_gpt2(), lorakit.LoraConfig(r=4, alpha=8, targets=["c_attn"], lora_bias=True))
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, tiny_gpt2()(input_ids=IDS).logits)  # B = 0, its bias = 0
    layer = model.transformer.h[0].attn.c_attn
    bias = layer.lora_B_bias["default"]
    assert bias.requires_grad and bias.shape == (96,) and not bias.any()
    model(input_ids=IDS, labels=IDS).loss.backward()  # eval mode: GPT-2's own dropout off
    assert bias.grad is not None and bias.grad.abs().sum() > 0


def _copy_factors(ours, theirs) -> None:
    """PEFT's A, B and B's bias set to lorakit's, layer by layer."""
    for path, layer in lora_layers(ours).items():
        other = theirs.base_model.model.get_submodule(path)
        with torch.no_grad():
            other.lora_A["default"].weight.copy_(layer.lora_A["default"])
            other.lora_B["default"].weight.copy_(layer.lora_B["default"])
            other.lora_B["default"].bias.copy_(layer.lora_B_bias["default"])


def test_gradients_match_peft():
    ours = _biased(tiny_bert(), ["query", "value"])
    theirs = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                              lora_bias=True, init_lora_weights=False))
    _copy_factors(ours, theirs)
    labels = torch.tensor([0, 2])
    for model in (ours, theirs):  # eval mode: BERT's own dropout off, gradients still flow
        model(input_ids=IDS, labels=labels).loss.backward()
    for path, layer in lora_layers(ours).items():
        other = theirs.base_model.model.get_submodule(path)
        torch.testing.assert_close(layer.lora_B_bias["default"].grad, other.lora_B["default"].bias.grad)
        torch.testing.assert_close(layer.lora_B["default"].grad, other.lora_B["default"].weight.grad)


def test_trained_run_loads_in_peft(gpt2_dir, topics_csv, tmp_path):
    out = tmp_path / "run"
    train(run_cfg(gpt2_dir, topics_csv, out, task="causal-lm", lora_bias=True, max_steps=3), progress=False)
    assert json.loads((out / "adapter_config.json").read_text())["lora_bias"] is True
    biases = {k: v for k, v in load_file(out / "adapter_model.safetensors").items() if k.endswith("lora_B.bias")}
    assert len(biases) == 2 and all(v.abs().max() > 0 for v in biases.values())  # zero at init, moved by training
    from transformers import AutoModelForCausalLM

    ours = lorakit.load_adapter(AutoModelForCausalLM.from_pretrained(gpt2_dir).eval(), out)
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(gpt2_dir), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, atol=1e-6, rtol=0)


def test_train_setting_makes_the_config():
    assert lora_config(TrainConfig(lora_bias=True), ["q"]).lora_bias is True
    with pytest.raises(ValueError, match="lora_bias is not supported with DoRA"):
        lora_config(TrainConfig(lora_bias=True, use_dora=True), ["q"])


@pytest.mark.parametrize("make, targets, run", [
    (tiny_bert, ["query", "value"], lambda m: m(input_ids=IDS).logits),
    (tiny_gpt2, ["c_attn"], lambda m: m(input_ids=IDS).logits),
    (small_cnn, ["conv1", "conv2"], lambda m: m(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)))),
])
def test_merge_unmerge_and_unload(make, targets, run):
    model = _biased(make(), targets)
    before = _state(model)
    with torch.no_grad():
        expected = run(model)
        lorakit.merge(model)
        assert any(layer.merged for layer in lora_layers(model).values())
        torch.testing.assert_close(run(model), expected, atol=1e-5, rtol=0)
        lorakit.unmerge(model)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, before[key], atol=1e-6, rtol=0)
        plain = lorakit.unload(model, merge=True)
        assert not any(isinstance(m, LoraLayer) for m in plain.modules())
        torch.testing.assert_close(run(plain), expected, atol=1e-5, rtol=0)


def test_merged_like_peft():
    ours = _biased(tiny_gpt2(), ["c_attn"])
    theirs = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                              lora_bias=True, fan_in_fan_out=True))
    _copy_factors(ours, theirs)
    plain, their_plain = lorakit.unload(ours, merge=True), theirs.merge_and_unload()
    for key, value in their_plain.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[key], value, atol=1e-6, rtol=0, msg=key)


def test_export_merged_folds_the_bias(tmp_path):
    model = _biased(tiny_gpt2(), ["c_attn"])
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    export_merged(model, tmp_path, dtype=torch.float32)
    plain = tiny_gpt2()
    plain.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=False)  # the tied lm_head is not saved
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=IDS).logits, expected, atol=1e-5, rtol=0)


IMAGES4 = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("make, targets, run", [
    (tiny_gpt2, ["c_attn"], lambda m: m(input_ids=IDS[[0, 1, 0, 1]]).logits),
    (small_cnn, ["conv1", "conv2"], lambda m: m(IMAGES4)),
])
def test_mixed_batch_applies_each_rows_bias(make, targets, run):
    model = _biased(make(), targets)  # "default", with a bias on B
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=2, targets=targets, init="random"), name="plain")
    model.eval()
    names, alone = ["default", "plain", None, "default"], {}
    with torch.no_grad():
        for name in ("default", "plain"):
            lorakit.set_adapter(model, name)
            alone[name] = run(model)
        with lorakit.disable_adapters(model):
            alone[None] = run(model)
        with lorakit.route(model, names):
            routed = run(model)
    for row, name in enumerate(names):
        torch.testing.assert_close(routed[row], alone[name][row], atol=1e-5, rtol=0)
    assert not torch.allclose(alone["default"][0], alone[None][0], atol=1e-3)


# ---- refusals: what PEFT refuses, and what lorakit cannot do exactly ----

@pytest.mark.parametrize("options, peft_options, message", [
    ({"use_dora": True}, {"use_dora": True}, "lora_bias is not supported with DoRA"),
    ({"init": "gaussian"}, {"init_lora_weights": "gaussian"}, "lora_bias needs init"),
    ({"init": "pissa"}, {"init_lora_weights": "pissa"}, "lora_bias needs init"),
])
def test_config_refuses_what_peft_refuses(options, peft_options, message):
    with pytest.raises(ValueError, match=message):
        lorakit.LoraConfig(r=4, lora_bias=True, **options)
    with pytest.raises(ValueError, match="lora_bias"):
        peft.LoraConfig(r=4, lora_bias=True, **peft_options)


def test_embedding_target_refused_before_any_change():
    model = tiny_bert()
    before = _state(model)
    with pytest.raises(ValueError, match="lora_bias is not supported on Embedding layers such as "
                                         "'bert.embeddings.word_embeddings'"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, targets=["query", "word_embeddings"], lora_bias=True))
    assert not lora_layers(model) and not lorakit.configs(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="lora_bias"):  # PEFT refuses it too
        peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, target_modules=["word_embeddings"], lora_bias=True))


def test_merge_refused_where_the_layer_has_no_bias():
    model = _biased(tiny_llama(), ["q_proj", "v_proj"])  # Llama's projections have no bias
    before = _state(model)
    with pytest.raises(ValueError, match="no bias to fold it into"):
        lorakit.merge(model)
    assert not any(layer.merged for layer in lora_layers(model).values())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True))
    with pytest.raises(RuntimeError, match="base layer has no bias"):  # PEFT refuses it too
        theirs.merge_and_unload()
    with torch.no_grad():  # a zero bias on B adds nothing: lorakit merges it (PEFT refuses even that)
        for layer in lora_layers(model).values():
            layer.lora_B_bias["default"].zero_()
        expected = model(input_ids=IDS).logits
        lorakit.merge(model)
        torch.testing.assert_close(model(input_ids=IDS).logits, expected, atol=1e-5, rtol=0)


def _bias_file(tmp_path, edit):
    # A PEFT lora_bias adapter for tiny BERT, then `edit(config dict, tensors)` applied to its files.
    theirs = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=4, target_modules=["query", "value"], lora_bias=True,
                                                              modules_to_save=[]))
    theirs.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    edit(config, tensors)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    return tmp_path


@pytest.mark.parametrize("edit, message", [
    (lambda c, t: t.update({BIAS_KEY: torch.zeros(31)}), r"query.lora_B.bias has shape \(31,\), this model expects \(32,\)"),
    (lambda c, t: t.pop(BIAS_KEY), r"missing tensors \['bert.encoder.layer.0.attention.self.query.lora_B.bias'\]"),
])
def test_bad_files_refused_and_model_unchanged(tmp_path, edit, message):
    path = _bias_file(tmp_path, edit)
    model = tiny_bert()
    lorakit.inject(model, lorakit.LoraConfig(r=2, targets=["query"]), name="other")
    before = _state(model)
    with pytest.raises(ValueError, match=message):
        lorakit.load_adapter(model, path)
    assert list(lorakit.configs(model)) == ["other"]
    assert _state(model).keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_separate_exports_refuse_it(tmp_path):
    from lorakit.adapters.files import read_adapter
    from lorakit.deploy import gguf_lora, vllm

    path = save_random_adapter(tmp_path / "a", seed=1, lora_bias=True)
    with pytest.raises(ConfigError, match="lora_bias"):
        vllm.check(*read_adapter(path), 16, path)
    model = lorakit.load_adapter(tiny_bert(), path)
    with pytest.raises(ConfigError, match="lora_bias"):
        gguf_lora.check_separable(model, "default")


# ---- the rank tools ----

def test_resize_keeps_the_bias_change(tmp_path):
    path = save_random_adapter(tmp_path / "a", seed=1, lora_bias=True)
    c = load_file(path / "adapter_model.safetensors")[BIAS_KEY]  # random, scaled by alpha / r = 2; after: by 1
    assert c.abs().min() > 0
    resize(path, tmp_path / "full", r=4)
    resize(path, tmp_path / "small", r=1)
    original = peft.PeftModel.from_pretrained(tiny_bert(), str(path)).eval()
    full = peft.PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "full")).eval()
    torch.testing.assert_close(logits(full), logits(original), atol=1e-5, rtol=0)
    small = read(tmp_path / "small").modules["bert.encoder.layer.0.attention.self.query"]
    torch.testing.assert_close(small.bias * small.scale, c * 2.0)


def test_analyze_reports_the_bias_change(tmp_path):
    path = save_random_adapter(tmp_path / "a", seed=1, lora_bias=True)
    c = load_file(path / "adapter_model.safetensors")[BIAS_KEY]
    report = analyze(path)["modules"]["bert.encoder.layer.0.attention.self.query"]
    assert report["bias_norm"] == pytest.approx((c.double() * 2.0).norm().item())  # scale alpha / r = 8 / 4
    from lorakit.rank.report import table

    assert "bias norm" in table(analyze(path)).splitlines()[0]


@pytest.mark.parametrize("method", ["linear", "cat", "svd"])
def test_combine_refuses(tmp_path, method):
    a = save_random_adapter(tmp_path / "a", seed=1, lora_bias=True)
    b = save_random_adapter(tmp_path / "b", seed=2)
    with pytest.raises(ValueError, match=r"has biases on lora_B \(lora_bias\): PEFT's add_weighted_adapter does not"):
        combine([b, a], [1.0, 1.0], tmp_path / "out", method=method)
    assert not (tmp_path / "out").exists()


def test_rank_read_checks_the_bias_shape(tmp_path):
    path = save_random_adapter(tmp_path / "a", seed=1, lora_bias=True)
    tensors = load_file(path / "adapter_model.safetensors")
    save_file({**tensors, BIAS_KEY: torch.zeros(31)}, path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"query.lora_B.bias has shape \(31,\) but lora_B has 32 rows"):
        read(path)



def test_saved_while_merged_with_trained_base_biases(tmp_path):
    # bias="lora_only" saves the adapted layers' base biases too; a merge folds s · c into them, which the file
    # must not hold twice.
    model = _biased(tiny_gpt2(), ["c_attn"], bias="lora_only")
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.bias.add_(0.1)  # a trained base bias
        expected = model(input_ids=IDS).logits
    lorakit.save_adapter(model, tmp_path / "unmerged")
    lorakit.merge(model)
    lorakit.save_adapter(model, tmp_path / "merged")
    unmerged, merged = (load_file(tmp_path / n / "adapter_model.safetensors") for n in ("unmerged", "merged"))
    for key, value in unmerged.items():
        torch.testing.assert_close(merged[key], value, atol=1e-6, rtol=0, msg=key)
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=IDS).logits, expected, atol=1e-5, rtol=0)


def test_qlora_base_with_lora_bias_merges():
    model = _biased(tiny_gpt2(), ["c_attn"], quantize="nf4")
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
        lorakit.merge(model)
        torch.testing.assert_close(model(input_ids=IDS).logits, expected, atol=1e-4, rtol=0)


# ---- mergekit-extract-lora's files: B's bias = the fine-tune's bias change, and no lora_bias key ----

def _tiny_qwen2(seed=0):
    # Qwen2's q/k/v projections have biases, its o_proj none: the case where mergekit writes lora_B.bias for some
    # targets only.
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return Qwen2ForCausalLM(config).eval()


def _fine_tuned(targets):
    tuned = _tiny_qwen2()
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, module in tuned.named_modules():
            if name.rsplit(".", 1)[-1] in targets:
                module.weight.add_(torch.randn(module.weight.shape, generator=g) * 0.05)
                if module.bias is not None:
                    module.bias.add_(torch.randn(module.bias.shape, generator=g) * 0.5)
    return tuned


def _mergekit_style_file(base, tuned, targets, out):
    # What mergekit-extract-lora writes (at full rank): A = √S Vᵀ, B = U √S of ΔW, alpha = r (scale 1),
    # lora_B.bias = Δbias where the layer has a bias, and an adapter_config.json without lora_bias.
    tensors, rank = {}, None
    for name, module in base.named_modules():
        if name.rsplit(".", 1)[-1] not in targets:
            continue
        tuned_module = tuned.get_submodule(name)
        u, s, vh = torch.linalg.svd(tuned_module.weight - module.weight, full_matrices=False)
        rank = s.shape[0]
        tensors[f"base_model.model.{name}.lora_A.weight"] = (s.sqrt().unsqueeze(1) * vh).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = (u * s.sqrt()).contiguous()
        if module.bias is not None:
            tensors[f"base_model.model.{name}.lora_B.bias"] = tuned_module.bias - module.bias
    out.mkdir()
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, out / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "use_rslora": False, "target_modules": sorted(targets), "modules_to_save": [],
              "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "rank_pattern": {}, "alpha_pattern": {},
              "lora_dropout": 0.0, "fan_in_fan_out": False, "inference_mode": True}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def test_mergekit_extracted_file_loads_with_its_biases(tmp_path):
    targets = {"q_proj", "o_proj"}
    tuned = _fine_tuned(targets)
    path = _mergekit_style_file(_tiny_qwen2(), tuned, targets, tmp_path / "extracted")
    with torch.no_grad():
        expected = tuned(input_ids=IDS).logits
    with pytest.warns(UserWarning, match="lora_B.bias tensors but adapter_config.json does not say"):
        ours = lorakit.load_adapter(_tiny_qwen2(), path)
    assert lorakit.configs(ours)["default"].lora_bias is True
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, expected, atol=1e-4, rtol=0)  # the fine-tune itself
    announced = tmp_path / "announced"  # PEFT needs the key to apply the biases
    announced.mkdir()
    (announced / "adapter_model.safetensors").write_bytes((path / "adapter_model.safetensors").read_bytes())
    config = json.loads((path / "adapter_config.json").read_text())
    (announced / "adapter_config.json").write_text(json.dumps({**config, "lora_bias": True}))
    theirs = peft.PeftModel.from_pretrained(_tiny_qwen2(), announced).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, atol=1e-6, rtol=0)
        lorakit.merge(ours)  # o_proj has no bias and no lora_B.bias: its zero bias merges as nothing
        torch.testing.assert_close(ours(input_ids=IDS).logits, expected, atol=1e-4, rtol=0)
    lorakit.save_adapter(ours, tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / "adapter_config.json").read_text())["lora_bias"] is True
    again = peft.PeftModel.from_pretrained(_tiny_qwen2(), tmp_path / "resaved").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=IDS).logits, expected, atol=1e-4, rtol=0)


def test_mergekit_extracted_file_in_the_rank_tools(tmp_path):
    targets = {"q_proj", "o_proj"}
    path = _mergekit_style_file(_tiny_qwen2(), _fine_tuned(targets), targets, tmp_path / "extracted")
    with pytest.warns(UserWarning, match="lora_B.bias"):
        source = read(path)
    assert source.config.lora_bias is True
    assert source.modules["model.layers.0.self_attn.q_proj"].bias is not None
    assert source.modules["model.layers.0.self_attn.o_proj"].bias is None
    with pytest.warns(UserWarning, match="lora_B.bias"):
        resize(path, tmp_path / "resized", r=32)
    ours = lorakit.load_adapter(_tiny_qwen2(), tmp_path / "resized")
    with pytest.warns(UserWarning, match="lora_B.bias"):
        original = lorakit.load_adapter(_tiny_qwen2(), path)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, original(input_ids=IDS).logits, atol=1e-5, rtol=0)


def test_lora_plus_gives_b_bias_b_learning_rate():
    model = lorakit.inject(tiny_gpt2(), lorakit.LoraConfig(r=4, targets=["c_attn"], lora_bias=True))
    groups = {g["name"]: g for g in lorakit.optimizer(model, lr=1e-4, lr_ratio=16, weight_decay=0.01).param_groups}
    assert len(groups["lora_B_bias"]["params"]) == 2  # one per adapted layer, as PEFT's LoRA+ groups lora_B.bias
    assert groups["lora_B_bias"]["lr"] == pytest.approx(1.6e-3) and groups["lora_B_bias"]["weight_decay"] == 0.0



def test_two_active_adapters_add_up():
    # One running adapter takes the fused path, two the variants' own outputs: both must add B's bias as s · c.
    model = _biased(tiny_gpt2(), ["c_attn"])
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=2, targets=["c_attn"], init="random", lora_bias=True), "two")
    layer = model.transformer.h[0].attn.c_attn
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(4))
    outs = {}
    with torch.no_grad():
        layer.lora_B_bias["two"].normal_()
        for names in (("default", "two"), ("default",), ("two",)):
            layer.set_active(names)
            outs[names] = layer(x)
        plain = layer.kind.base(layer, x)
    torch.testing.assert_close(outs["default", "two"], outs["default",] + outs["two",] - plain, atol=1e-5, rtol=0)
    lora_only = x @ (layer.lora_B["two"] @ layer.lora_A["two"]).t() * layer.adapters["two"].scale
    torch.testing.assert_close(outs["two",] - plain - lora_only, layer.lora_B_bias["two"].detach().expand(3, -1),
                               atol=1e-5, rtol=0)  # scale alpha / r = 1 for "two"
