"""LoRA layer math: the fused linear path, init, merge invariants, per layer type."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
import lorakit.nn.fused
from lorakit.nn.fused import LoraLinearFunction
from lorakit.nn.layers import LoraLayer


def test_textbook_parameter_count():
    model = nn.Sequential(nn.Linear(512, 512, bias=False))
    lorakit.inject(model, lorakit.LoraConfig(r=16, targets=["0"]))
    trainable, total = lorakit.count_parameters(model)
    assert trainable == 2 * 512 * 16 == 16_384
    assert trainable / 512**2 == 0.0625
    assert total == 512 * 512 + 16_384


def _layer(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return {"linear": lambda: nn.Linear(12, 10), "conv1d": lambda: Conv1D(10, 12),
            "embedding": lambda: nn.Embedding(20, 10, padding_idx=0),
            "conv2d": lambda: nn.Conv2d(3, 6, 3, padding=1, stride=2)}[kind]()


def _input(kind: str) -> torch.Tensor:
    torch.manual_seed(1)
    if kind == "embedding":
        return torch.randint(0, 20, (4, 7))
    if kind == "conv2d":
        return torch.randn(2, 3, 8, 8)
    return torch.randn(4, 7, 12)


KINDS = ["linear", "conv1d", "embedding", "conv2d"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_output_unchanged_at_init(kind, init, device):
    base = _layer(kind).to(device)
    x = _input(kind).to(device)
    expected = base(x)
    model = nn.Sequential(base)
    lorakit.inject(model, lorakit.LoraConfig(r=2, targets=["0"], init=init, dropout=0.1))
    model.train()
    exact = device.type == "cpu"  # a GPU may pick another kernel for the same product: equal within rounding
    torch.testing.assert_close(model(x), expected, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-6)
    assert lorakit.count_parameters(model)[0] > 0
    assert model[0].lora_A["default"].abs().sum() > 0  # A random, B zero
    assert model[0].lora_B["default"].abs().sum() == 0


def _expected_delta(kind: str, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    # ΔW in the stored layout, written out per layer type from the definitions (not from lorakit's code).
    if kind == "linear":  # W: (out, in), A: (r, in), B: (out, r)
        return scale * b @ a
    if kind in ("conv1d", "embedding"):  # W stored (in, out) / (num_embeddings, dim): the transpose of B A
        return scale * (b @ a).t()
    # conv2d: A is a conv with r output channels (r, C_in, kh, kw), B a 1×1 conv (C_out, r, 1, 1): composed, a
    # conv whose kernel is Σ_k B[o, k] A[k, c, i, j]
    return scale * torch.einsum("ok,kcij->ocij", b[:, :, 0, 0], a)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_invariants(kind, device):
    model = nn.Sequential(_layer(kind)).to(device)
    lorakit.inject(model, lorakit.LoraConfig(r=3, alpha=6, targets=["0"], init="random"))
    layer, x = model[0], _input(kind).to(device)
    w0 = layer.weight.detach().clone()
    expected = w0 + _expected_delta(kind, layer.lora_A["default"].detach(), layer.lora_B["default"].detach(), 2.0)
    y = model(x)
    with lorakit.disable_adapters(model):
        assert not torch.allclose(y, model(x))  # the adapter does something
    lorakit.merge(model)
    assert torch.allclose(layer.weight, expected, atol=1e-6)  # W' = W + scale · B A
    assert torch.allclose(model(x), y, atol=1e-5)  # and the merged layer computes what the adapter did
    lorakit.merge(model)  # merging twice = merging once
    assert torch.allclose(layer.weight, expected, atol=1e-6)
    lorakit.unmerge(model)
    assert torch.allclose(layer.weight, w0, atol=1e-6)
    assert torch.allclose(model(x), y, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_delta_is_the_stored_update_as_out_by_in(kind):
    layer = LoraLayer(_layer(kind))
    layer.add_adapter("x", 3, 0.5, 0.0, "random")
    a, b = layer.lora_A["x"].detach(), layer.lora_B["x"].detach()
    stored = _expected_delta(kind, a, b, 0.5)
    as_out_in = stored.flatten(1) if kind == "conv2d" else stored.t() if kind in ("conv1d", "embedding") else stored
    assert torch.allclose(layer.delta("x"), as_out_in, atol=1e-6)


def _reference(x, w, bias, a, b, scale, mask, keep_scale):
    xd = x if mask is None else x * mask * keep_scale
    return F.linear(x, w, bias) + scale * F.linear(F.linear(xd, a), b)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_function_matches_autograd(p, with_bias, monkeypatch, device):
    torch.manual_seed(0)
    kw = dict(dtype=torch.float64, device=device)
    x = torch.randn(2, 5, 12, **kw).requires_grad_()
    w = torch.randn(10, 12, **kw)
    bias = torch.randn(10, **kw) if with_bias else None
    a = torch.randn(3, 12, **kw).requires_grad_()
    b = torch.randn(10, 3, **kw).requires_grad_()
    gout = torch.randn(2, 5, 10, **kw)
    mask = torch.rand(10, 12, device=device) > p if p > 0 else None
    monkeypatch.setattr(lorakit.nn.fused, "drop_mask", lambda x2, p: (~mask, 1 / (1 - p)))
    ref = _reference(x, w, bias, a, b, 0.7, None if mask is None else mask.view(2, 5, 12), 1 / (1 - p))
    ref_grads = torch.autograd.grad(ref, (x, a, b), gout)
    out = LoraLinearFunction.apply(x, w, bias, a, b, 0.7, p)
    grads = torch.autograd.grad(out, (x, a, b), gout)
    assert torch.allclose(out, ref)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_drop_mask_statistics(p):
    x = torch.empty(400, 1000)
    mask, scale = lorakit.nn.fused.drop_mask(x, p)
    assert mask.dtype == torch.bool and mask.shape == x.shape
    assert abs(mask.float().mean().item() - p) < 0.003
    assert scale == pytest.approx(1 / (1 - p), rel=1e-4)
    other, _ = lorakit.nn.fused.drop_mask(x, p)
    assert (mask != other).any()  # fresh randomness on every call
    rows = mask.float().mean(1)
    assert rows.std() < 0.03  # no structure along rows


def test_dropout_is_applied_in_training_only():
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(64, 64))
    lorakit.inject(layer, lorakit.LoraConfig(r=4, targets=["0"], dropout=0.5, init="random"))
    x = torch.randn(16, 64)
    layer.eval()
    expected = layer(x)
    assert torch.equal(layer(x), expected)
    layer.train()
    assert not torch.equal(layer(x), layer(x))
    with torch.no_grad():
        runs = torch.stack([layer(x) for _ in range(400)]).mean(0)
    with lorakit.disable_adapters(layer):
        base = layer(x)
    lora_term = (expected - base).abs().mean()
    assert (runs - expected).abs().mean() < 0.1 * lora_term  # unbiased: a missing 1/(1-p) rescale would be off by ~0.5


def test_fused_function_gradcheck_including_weight_and_bias():
    torch.manual_seed(0)
    args = [torch.randn(3, 6, dtype=torch.float64, requires_grad=True),
            torch.randn(4, 6, dtype=torch.float64, requires_grad=True),
            torch.randn(4, dtype=torch.float64, requires_grad=True),
            torch.randn(2, 6, dtype=torch.float64, requires_grad=True),
            torch.randn(4, 2, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(lambda *t: LoraLinearFunction.apply(*t, 1.5, 0.0), args)


def test_fused_path_saves_no_full_size_dropout_copy():
    # With dropout the fused function keeps x, a bool mask and the (N, r) projection, not a float copy of x.
    layer = LoraLayer(nn.Linear(64, 64))
    layer.add_adapter("default", 4, 1.0, 0.1, "kaiming")
    layer.set_active(("default",))
    layer.train()
    x = torch.randn(32, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    big_float = [t for t in saved if t.dtype == torch.float32 and t.numel() == x.numel() and t.data_ptr() != x.data_ptr()]
    assert big_float == []
    assert any(t.dtype == torch.bool for t in saved)


def test_several_active_adapters_sum(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8)).to(device)
    lorakit.inject(model, lorakit.LoraConfig(r=2, targets=["0"], init="random"), name="a")
    lorakit.inject(model, lorakit.LoraConfig(r=2, targets=["0"], init="random"), name="b")
    x = torch.randn(3, 8, device=device)
    with lorakit.disable_adapters(model):
        base = model(x)
    outs = {}
    for name in ("a", "b"):
        lorakit.set_adapter(model, name)
        outs[name] = model(x) - base
    lorakit.set_adapter(model, ["a", "b"])
    assert torch.allclose(model(x) - base, outs["a"] + outs["b"], atol=1e-6)


def test_bf16_autocast_and_bf16_base(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16)).to(device)
    lorakit.inject(model, lorakit.LoraConfig(r=4, targets=["0"], init="random"))
    x = torch.randn(4, 16, device=device)
    ref = model(x)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16 and torch.allclose(y.float(), ref, atol=0.1)
    y.float().sum().backward()
    assert model[0].lora_A["default"].grad.dtype == torch.float32  # fp32 master weights
    model_bf16 = nn.Sequential(nn.Linear(16, 16).to(device, torch.bfloat16))
    lorakit.inject(model_bf16, lorakit.LoraConfig(r=4, targets=["0"]))
    assert model_bf16[0].lora_A["default"].dtype == torch.float32
    assert model_bf16(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_small_cnn_learns_with_conv2d_lora():
    from tiny_models import small_cnn

    model = small_cnn()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, targets=["conv1", "conv2"], modules_to_save=["head"]))
    torch.manual_seed(0)
    x = torch.randn(64, 3, 8, 8)
    labels = (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 1].mean((1, 2)) > 0).long()  # 3 classes from the pixels
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(60):
        loss = F.cross_entropy(model(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]
    assert model.conv1.lora_B["default"].abs().sum() > 0
    assert not model.conv1.weight.requires_grad
