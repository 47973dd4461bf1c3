"""LoRA variants: DoRA, PiSSA, LoRA+, rsLoRA and the init modes; PEFT as the oracle where it has them."""

import copy
import warnings

import pytest
import torch
from tiny_models import minilm_classifier, tiny_gpt2, tiny_llama
from torch import nn

import lorakit
from lorakit.nn.layers import LoraLayer

peft = pytest.importorskip("peft")


def _ids(vocab=128):
    torch.manual_seed(7)
    return torch.randint(1, vocab, (2, 9))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _randomize(model):
    torch.manual_seed(11)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)


@pytest.mark.parametrize("make, targets", [(tiny_llama, ["q_proj", "v_proj"]), (tiny_gpt2, ["c_attn"])])
def test_dora_starts_as_the_base_model(make, targets, device):
    ids = _ids().to(device)
    model = lorakit.inject(make().to(device), lorakit.LoraConfig(r=4, alpha=8, targets=targets, use_dora=True))
    assert torch.allclose(_logits(model, ids), _logits(make().to(device), ids), atol=1e-5)  # m = ||W|| at init
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    assert layer.lora_magnitude_vector["default"].shape == (layer.base_matrix().shape[0],)


def test_dora_training_gradients_match_peft():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 12))
    ours = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(r=4, targets=["0"], use_dora=True, init="random"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=16, target_modules=["0"],
                                                                           use_dora=True, init_lora_weights=False))
    layer, their_layer = ours[0], theirs.base_model.model[0]
    with torch.no_grad():
        their_layer.lora_A["default"].weight.copy_(layer.lora_A["default"])
        their_layer.lora_B["default"].weight.copy_(layer.lora_B["default"])
        their_layer.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude_vector["default"])
    x = torch.randn(5, 16)
    (ours(x) ** 2).sum().backward()
    (theirs(x) ** 2).sum().backward()
    assert torch.allclose(layer.lora_B["default"].grad, their_layer.lora_B["default"].weight.grad, atol=1e-5)
    assert torch.allclose(layer.lora_magnitude_vector["default"].grad,
                          their_layer.lora_magnitude_vector["default"].weight.grad, atol=1e-5)


def test_dora_merge_unmerge(device):
    model = lorakit.inject(tiny_gpt2().to(device), lorakit.LoraConfig(r=4, targets=["c_attn"], use_dora=True,
                                                                      init="random"))
    _randomize(model)
    ids = _ids().to(device)
    out = _logits(model, ids)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    lorakit.merge(model)
    assert torch.allclose(_logits(model, ids), out, atol=1e-4)
    lorakit.unmerge(model)
    assert all(torch.allclose(p, weights[n], atol=1e-5) for n, p in model.named_parameters())
    plain = lorakit.unload(model, merge=True)
    assert torch.allclose(_logits(plain, ids), out, atol=1e-4)


def test_dora_on_embedding_is_refused():
    with pytest.raises(ValueError, match="DoRA supports Linear and Conv1D layers, not embedding"):
        lorakit.inject(tiny_gpt2(), lorakit.LoraConfig(targets=["wte"], use_dora=True))


def test_pissa_init_residual_and_conversion(tmp_path):
    ids = _ids()
    base_out = _logits(tiny_llama(), ids)
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], init="pissa"))
    assert torch.allclose(_logits(model, ids), base_out, atol=1e-5)  # residual + B0 A0 = W
    q = model.model.layers[0].self_attn.q_proj
    w0 = tiny_llama().model.layers[0].self_attn.q_proj.weight
    u, s, vh = torch.linalg.svd(w0)
    top = (u[:, :4] * s[:4]) @ vh[:4]
    assert torch.allclose(q.weight + q.delta("default"), w0, atol=1e-5)
    assert torch.allclose(q.delta("default"), top, atol=1e-5)  # B0 A0 is W's best rank-4 part
    with lorakit.disable_adapters(model):
        assert torch.allclose(_logits(model, ids), base_out, atol=1e-5)  # the base, not the residual
    _randomize(model)
    trained = _logits(model, ids)
    lorakit.save_adapter(model, tmp_path)
    config = lorakit.read_adapter_config(tmp_path)
    assert config.r == 8 and config.init == "kaiming"
    fresh = lorakit.load_adapter(tiny_llama(), tmp_path)  # the untouched base model (PEFT too: test_interop.py)
    assert torch.allclose(_logits(fresh, ids), trained, atol=1e-5)
    lorakit.delete_adapter(model, "default")  # gives the original weights back
    assert torch.allclose(_logits(model, ids), base_out, atol=1e-5)


def test_pissa_unload():
    ids = _ids()
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, targets=["q_proj"], init="pissa"))
    _randomize(model)
    out = _logits(model, ids)
    merged = lorakit.unload(copy.deepcopy(model), merge=True)
    assert torch.allclose(_logits(merged, ids), out, atol=1e-4)
    restored = lorakit.unload(model, merge=False)
    assert torch.allclose(_logits(restored, ids), _logits(tiny_llama(), ids), atol=1e-5)


def test_lora_plus_parameter_groups():
    model = lorakit.inject(minilm_classifier(), lorakit.LoraConfig(r=4, targets=["query", "value"],
                                                                   modules_to_save=["classifier"]))
    opt = lorakit.optimizer(model, lr=1e-4, lr_ratio=16, weight_decay=0.01)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"lora_A", "lora_B", "other", "other_no_decay"}
    assert groups["lora_B"]["lr"] == pytest.approx(1.6e-3) and groups["lora_A"]["lr"] == 1e-4
    assert len(groups["lora_A"]["params"]) == len(groups["lora_B"]["params"]) == 12
    assert groups["other_no_decay"]["weight_decay"] == 0.0  # the head's bias
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(trainable)
    with pytest.raises(ValueError, match="no trainable parameters"):
        lorakit.optimizer(nn.Linear(2, 2).requires_grad_(False), lr=1e-3)


def test_gaussian_init_std_and_rslora_scale():
    layer = nn.Sequential(nn.Linear(2048, 2048))
    lorakit.inject(layer, lorakit.LoraConfig(r=16, alpha=32, targets=["0"], init="gaussian", use_rslora=True))
    a = layer[0].lora_A["default"]
    assert a.std().item() == pytest.approx(1 / 16, rel=0.05)
    assert layer[0].adapters["default"].scale == pytest.approx(32 / 4)
