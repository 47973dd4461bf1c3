"""NF4 quantization (lorakit.nn.nf4): code tables, packing, error bounds, memory, padding, nf4_linear, state_dict."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit.nn import nf4 as quant
from lorakit.nn.nf4 import (
    DYNAMIC_CODE,
    NF4_CODE,
    NF4Linear,
    NF4Weight,
    dequantize_nf4,
    nf4_linear,
    quantize_nf4,
    to_bitsandbytes,
)

PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]
MAX_SCALE_ERR = 0.00704  # half the widest gap of the dynamic 8-bit map, relative to a group's absmax2


def codes_of(q):
    """The 4-bit codes in element order (high nibble first)."""
    return torch.stack((q.packed >> 4, q.packed & 15), dim=1).view(-1)


def block_absmax(w, block_size=64):
    flat = F.pad(w.reshape(-1).float(), (0, -w.numel() % block_size))
    return flat.view(-1, block_size).abs().amax(1)


def test_code_tables():
    assert torch.equal(NF4_CODE, torch.tensor(PUBLISHED_NF4, dtype=torch.float32))
    assert DYNAMIC_CODE.shape == (256,) and bool((DYNAMIC_CODE.diff() > 0).all())
    assert DYNAMIC_CODE[0] < -0.99 and DYNAMIC_CODE[-1] == 1.0 and 0.0 in DYNAMIC_CODE.tolist()
    assert DYNAMIC_CODE.diff().max() / 2 <= MAX_SCALE_ERR


def test_each_code_maps_to_itself():
    # One block each (its scale then survives double quantization exactly: scale − mean = 0): all 16 codes with
    # ±2.5 at the ends, and only the non-positive codes with the absmax reached at -3.
    for w, codes in [((NF4_CODE * 2.5).repeat(4), torch.arange(16).repeat(4)),
                     ((NF4_CODE[:8] * 3.0).repeat(8), torch.arange(8).repeat(8))]:
        q = quantize_nf4(w.view(1, 64))
        assert torch.equal(codes_of(q), codes.to(torch.uint8))
        assert torch.equal(dequantize_nf4(q), w.view(1, 64))


def test_packing_order():
    w = torch.zeros(1, 64)
    w[0, :4] = torch.tensor([1.0, -1.0, 0.0, 0.5626170039176941])  # codes 15, 0, 7, 13
    q = quantize_nf4(w)
    assert q.packed.dtype == torch.uint8 and q.packed.shape == (32,)
    assert q.packed[:2].tolist() == [0xF0, 0x7D]  # first element of each pair in the high nibble
    assert bool((q.packed[2:] == 0x77).all())  # zeros are code 7


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gaussian_round_trip(dtype):
    torch.manual_seed(0)
    w = torch.randn(512, 768).to(dtype)
    q = quantize_nf4(w)
    d = dequantize_nf4(q)
    assert d.dtype == dtype and d.shape == w.shape
    err = dequantize_nf4(q, torch.float32) - w.float()
    rel_rms = err.pow(2).mean().sqrt() / w.float().pow(2).mean().sqrt()
    assert 0.08 < rel_rms < 0.10  # measured 0.092: NF4 on N(0, 1) weights
    # Per element: at most half the widest NF4 gap (0.152) of the block's absmax, plus the small scale error.
    assert bool((err.abs().view(-1, 64) <= 0.16 * block_absmax(w)[:, None]).all())


def test_double_quantized_scales_error_bound():
    torch.manual_seed(1)
    blocks = torch.randn(1000, 64) * torch.exp(torch.randn(1000, 1))  # scales spread over orders of magnitude
    blocks[:, 0] = blocks.abs().amax(1)  # each block's absmax is its first element, code 1.0: dequantizes to the scale
    q = quantize_nf4(blocks.view(100, 640))
    scale_hat = dequantize_nf4(q).view(1000, 64)[:, 0]
    absmax = blocks[:, 0]
    centered = F.pad(absmax - absmax.mean(), (0, 24)).view(-1, 256)  # 4 groups of 256 block scales
    bound = MAX_SCALE_ERR * centered.abs().amax(1).repeat_interleave(256)[:1000] + 1e-6
    assert bool(((scale_hat - absmax).abs() <= bound).all())


def test_memory_ratio():
    q = quantize_nf4(torch.randn(1024, 1024))
    fp32 = 1024 * 1024 * 4
    assert q.nbytes == 1024 * 1024 // 2 + 16384 + 64 * 4 + 4  # codes, 8-bit scales, absmax per 256 scales, offset
    assert q.nbytes <= 0.15 * fp32  # 0.129


def test_padding_of_odd_sizes():
    torch.manual_seed(2)
    w = torch.randn(37, 91)  # 3367 elements: 25 short of 53 blocks
    q = quantize_nf4(w)
    assert q.pad == 25 and q.n_blocks == 53 and q.packed.numel() == 53 * 32
    assert bool((codes_of(q)[-25:] == 7).all())  # the padding is zeros
    d = dequantize_nf4(q)
    assert d.shape == (37, 91)
    assert bool(((d - w).abs().view(-1) <= 0.16 * block_absmax(w).repeat_interleave(64)[:3367]).all())
    tiny = torch.tensor([[0.5, -2.0, 1.0]])  # smaller than one block
    assert torch.equal(dequantize_nf4(quantize_nf4(tiny)), torch.tensor([[NF4_CODE[10] * 2, -2.0, NF4_CODE[12] * 2]]))


@pytest.mark.parametrize("bad", [torch.randn(64), torch.randn(2, 4, 8), torch.ones(4, 64, dtype=torch.int64),
                                 torch.ones(4, 64, dtype=torch.bool)])
def test_bad_input_raises(bad):
    with pytest.raises(ValueError, match=rf"{tuple(bad.shape)}.*{bad.dtype}".replace("(", r"\(").replace(")", r"\)")):
        quantize_nf4(bad)


def test_non_finite_weight_raises():
    for bad in (float("inf"), float("nan")):
        w = torch.randn(4, 64)
        w[2, 5] = bad
        with pytest.raises(ValueError, match="inf or NaN"):
            quantize_nf4(w)


def test_codes_at_the_rounding_boundaries():
    # Every float32 within 200 ulps of each midpoint between NF4 values (where the nearest code changes) and of each
    # edge of the lookup cells: the code is the count of midpoints strictly below s (ties go to the lower value).
    mids = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    edges = torch.arange(1, 32) / 16 - 1
    centres = torch.cat([mids, edges[edges != 0]])  # around 0 (where ulps step to NaN bit patterns): ±1e-45 below
    near = (centres.view(torch.int32)[:, None] + torch.arange(-200, 201, dtype=torch.int32)).view(torch.float32)
    s = torch.cat([near.view(-1).clamp(-1, 1), torch.tensor([-1.0, 0.0, 1.0, 1e-45, -1e-45])])
    s = F.pad(s, (0, -s.numel() % 63)).view(-1, 63)
    q = quantize_nf4(torch.cat([torch.ones(s.shape[0], 1), s], dim=1))  # absmax 1 per block: the scaled value is s
    expected = torch.cat([torch.full((s.shape[0], 1), 15), (s[..., None] > mids).sum(-1)], dim=1)
    assert torch.equal(codes_of(q), expected.view(-1).to(torch.uint8))


def test_bad_block_size_raises():
    with pytest.raises(ValueError, match="block_size"):
        quantize_nf4(torch.randn(4, 64), block_size=63)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_linear_matches_dequantized_linear(dtype):
    torch.manual_seed(3)
    q = quantize_nf4(torch.randn(48, 80))
    x = torch.randn(2, 5, 80, dtype=dtype, requires_grad=True)
    bias = torch.randn(48, dtype=dtype, requires_grad=True)
    y = nf4_linear(x, q, bias)
    w = dequantize_nf4(q, dtype)
    x_ref, b_ref = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    y_ref = F.linear(x_ref, w, b_ref)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(bias.grad, b_ref.grad)
    assert nf4_linear(x.detach(), q).shape == (2, 5, 48)


def test_nf4_linear_under_autocast():
    q = quantize_nf4(torch.randn(32, 64))
    x, bias = torch.randn(3, 64, requires_grad=True), torch.randn(32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = nf4_linear(x, q, bias)  # computed in bfloat16, like F.linear under autocast
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, F.linear(x.bfloat16(), dequantize_nf4(q, torch.bfloat16), bias.bfloat16()))
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and bias.grad.dtype == torch.float32


def test_nf4_linear_saves_no_full_weight():
    q = quantize_nf4(torch.randn(64, 96))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = nf4_linear(torch.randn(3, 96, requires_grad=True), q)
    assert (64, 96) not in saved
    y.sum().backward()


def test_state_dict_and_to_round_trip(tmp_path):
    torch.manual_seed(4)
    w = torch.randn(100, 70)
    q = quantize_nf4(w)
    expected = dequantize_nf4(q)
    sd = q.state_dict()
    assert set(sd) == {"packed", "qscale", "absmax2", "offset"}
    fresh = NF4Weight(w.shape, w.dtype)  # empty buffers of the right sizes
    fresh.load_state_dict(sd)
    assert torch.equal(dequantize_nf4(fresh), expected)

    from safetensors.torch import load_file, save_file
    save_file(sd, tmp_path / "q.safetensors")
    fresh.load_state_dict(load_file(tmp_path / "q.safetensors"))
    assert torch.equal(dequantize_nf4(fresh), expected)

    parent = nn.Sequential()
    parent.q = q
    parent.to(torch.bfloat16).half()  # dtype casts of a parent must not round the float32 scale statistics
    assert torch.equal(dequantize_nf4(q), expected)
    assert q.to("cpu") is q and torch.equal(dequantize_nf4(q.to("cpu")), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    torch.manual_seed(5)
    w = torch.randn(300, 257)
    q = quantize_nf4(w)
    on_gpu = quantize_nf4(w.cuda())
    for name, buf in q.named_buffers():
        assert torch.equal(getattr(on_gpu, name).cpu(), buf), name
    expected = dequantize_nf4(q)
    torch.testing.assert_close(dequantize_nf4(q.cuda()).cpu(), expected, rtol=0, atol=0)  # .cuda() moves q itself
    x = torch.randn(4, 257, device="cuda", requires_grad=True)
    nf4_linear(x, on_gpu).sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("shape,dtype", [((256, 512), torch.float32), ((37, 91), torch.float32),
                                         ((300, 257), torch.bfloat16), ((1000, 1000), torch.float16)])
def test_matches_bitsandbytes(shape, dtype):
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(6)
    w = (torch.randn(shape) * torch.rand(shape[0], 1)).to(dtype)
    try:
        packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    except Exception as e:  # e.g. a build without CPU kernels
        pytest.skip(f"bitsandbytes cannot quantize on CPU here: {e}")
    q = quantize_nf4(w)
    assert torch.equal(DYNAMIC_CODE, bnb_f.create_dynamic_map())
    assert torch.equal(q.packed[:packed.numel()], packed.view(-1))  # bnb packs only up to the last (odd) element
    assert torch.equal(q.absmax2.view(torch.float32), state.state2.absmax)
    assert q.offset.view(torch.float32).item() == state.offset.item()
    # 8-bit scale codes: ours are exactly nearest; bnb's CPU kernel searches approximately and differs on a few.
    ours, theirs = q.qscale[:q.n_blocks].long(), state.absmax.long()
    assert (ours != theirs).float().mean() < 0.01
    target = (block_absmax(w) - q.offset.view(torch.float32)) / state.state2.absmax.repeat_interleave(256)[:q.n_blocks]
    assert bool(((DYNAMIC_CODE[ours] - target).abs() <= (DYNAMIC_CODE[theirs] - target).abs()).all())
    # Given the same 8-bit codes, dequantization is bit for bit theirs.
    q.qscale[:q.n_blocks] = state.absmax
    assert torch.equal(dequantize_nf4(q), bnb_f.dequantize_4bit(packed, state))


def test_to_bitsandbytes_layout_dequantizes_with_bitsandbytes():
    # The (packed, QuantState) mapping that the CUDA path hands to bitsandbytes' kernel, checked here with its CPU
    # kernel: bit for bit our dequantization, for odd sizes (a padded last block) and every output dtype.
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(7)
    for shape, dtype in [((300, 257), torch.bfloat16), ((64, 640), torch.float32), ((1, 3), torch.float16)]:
        w = (torch.randn(shape) * torch.rand(shape[0], 1)).to(dtype)
        q = quantize_nf4(w)
        packed, state = to_bitsandbytes(q)
        theirs_packed, theirs = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        assert packed.shape == theirs_packed.shape and state.absmax.shape == theirs.absmax.shape
        assert (state.blocksize, state.state2.blocksize) == (theirs.blocksize, theirs.state2.blocksize)
        assert state.dtype == dtype
        assert state.shape == theirs.shape and state.nested and packed.data_ptr() == q.packed.data_ptr()  # no copy
        for out in (torch.float32, torch.bfloat16, torch.float16):
            expected = dequantize_nf4(q, out)
            assert torch.equal(bnb_f.dequantize_4bit(*to_bitsandbytes(q, out)).reshape(shape), expected)
            assert torch.equal(quant._dequantize_bnb(q, out), expected)


def test_whole_tensor_decode_equals_the_sliced_path():
    # _decode is what torch.compile fuses on CUDA: in eager mode on the CPU it must already be bit for bit the same.
    torch.manual_seed(8)
    q = quantize_nf4(torch.randn(70, 333))
    for out in (torch.float32, torch.bfloat16):
        decoded = quant._decode(q.packed, quant.block_scales(q), NF4_CODE, out)[:70 * 333].view(70, 333)
        assert torch.equal(decoded, dequantize_nf4(q, out))


def test_cpu_dequantizes_large_weights_by_the_compiled_decode_bit_for_bit(monkeypatch):
    # The compiled decode is the CPU's fallback after the C kernel (nf4_cpu); it needs a C++ compiler. Here it is
    # made the chosen path, as where the C kernel cannot be built.
    try:
        quant._dequantize_compiled(quantize_nf4(torch.randn(4, 64)), torch.float32)
    except Exception as e:  # no compiler: the pure-torch path serves
        pytest.skip(f"torch.compile cannot build the CPU decode here: {type(e).__name__}")
    monkeypatch.setattr(quant, "_fast_dequantizer", lambda device: quant._dequantize_compiled)
    monkeypatch.setattr(quant, "COMPILED_MIN", 1000)  # a small weight takes the large weights' path
    calls = []
    monkeypatch.setattr(quant, "_dequantize_torch", lambda q, dtype: calls.append(q) or _eager(q, dtype))
    torch.manual_seed(11)
    for shape in [(300, 257), (64, 96)]:
        q = quantize_nf4(torch.randn(shape))
        for out in (torch.float32, torch.bfloat16, torch.float16):
            assert torch.equal(dequantize_nf4(q, out), _eager(q, out)), (shape, out)
    assert not calls  # every dequantization above took the compiled path
    small = quantize_nf4(torch.randn(10, 20))
    assert torch.equal(dequantize_nf4(small), _eager(small, torch.float32)) and calls == [small]  # under the bound


_eager = quant._dequantize_torch

CUDA_PATHS = ["bitsandbytes", "torch.compile"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("path", CUDA_PATHS)
def test_cuda_fused_dequantize_equals_pure_torch(path):
    fn = {"bitsandbytes": quant._dequantize_bnb, "torch.compile": quant._dequantize_compiled}[path]
    if path == "bitsandbytes":
        pytest.importorskip("bitsandbytes")
    torch.manual_seed(9)
    for shape in [(300, 257), (1, 2), (2048, 512)]:
        q = quantize_nf4(torch.randn(shape, device="cuda"))
        for out in (torch.float32, torch.bfloat16, torch.float16):
            assert torch.equal(fn(q, out), quant._dequantize_torch(q, out)), (path, shape, out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_dequantize_picks_an_exact_path():
    q = quantize_nf4(torch.randn(515, 96))
    chosen = quant._fast_dequantizer(torch.device("cuda", torch.cuda.current_device()))
    assert chosen in (quant._dequantize_bnb, quant._dequantize_compiled, quant._dequantize_torch)
    assert torch.equal(dequantize_nf4(q.cuda(), torch.bfloat16).cpu(), dequantize_nf4(q.cpu(), torch.bfloat16))


def _linear(bias=True, seed=10):
    torch.manual_seed(seed)
    return nn.Linear(80, 48, bias=bias)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_linear_module_is_linear_on_the_dequantized_weight(bias, dtype):
    layer = NF4Linear.from_linear(_linear(bias))
    assert (layer.in_features, layer.out_features) == (80, 48) and not any(p.requires_grad for p in layer.parameters())
    assert set(layer.state_dict()) == {f"weight_nf4.{k}" for k in ("packed", "qscale", "absmax2", "offset")} | (
        {"bias"} if bias else set())
    x = torch.randn(2, 3, 80, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    b = None if layer.bias is None else layer.bias.to(dtype)
    y, y_ref = layer(x), F.linear(x_ref, dequantize_nf4(layer.weight_nf4, dtype), b)
    assert y.dtype == dtype and torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.equal(x.grad, x_ref.grad)
    assert layer.bias is None or layer.bias.grad is None  # frozen


def test_nf4_linear_from_conv1d():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(11)
    conv = Conv1D(48, 80)  # nf = out, nx = in: weight (80, 48)
    nn.init.normal_(conv.bias)
    layer = NF4Linear.from_linear(conv)
    assert (layer.in_features, layer.out_features) == (80, 48)
    assert torch.equal(layer.weight_nf4.packed, quantize_nf4(conv.weight.t().contiguous()).packed)
    x = torch.randn(5, 80)
    assert torch.equal(layer(x), F.linear(x, dequantize_nf4(layer.weight_nf4), conv.bias.detach()))
    with torch.no_grad():
        assert (layer(x) - conv(x)).abs().max() < 0.1 * conv(x).abs().max()  # only the 4-bit error
    back = layer.to_dense()  # the Conv1D it came from, (in, out) again
    assert type(back) is Conv1D and back.weight.shape == (80, 48)
    torch.testing.assert_close(back(x), layer(x))  # addmm against linear: equal up to rounding
    with pytest.raises(TypeError, match="Embedding"):
        NF4Linear.from_linear(nn.Embedding(10, 4))
    with pytest.raises(ValueError, match="bias of shape"):
        NF4Linear(quantize_nf4(torch.randn(48, 80)), torch.zeros(80))


def test_nf4_linear_to_dense_round_trip():
    layer = NF4Linear.from_linear(_linear())
    x = torch.randn(4, 80)
    plain = layer.to_dense()
    assert type(plain) is nn.Linear and plain.weight.dtype == torch.float32 and not plain.weight.requires_grad
    assert torch.equal(plain.weight, dequantize_nf4(layer.weight_nf4)) and torch.equal(plain(x), layer(x))
    assert plain.bias.data_ptr() != layer.bias.data_ptr()  # a copy: the plain layer lives on its own
    half = layer.to_dense(torch.bfloat16)
    assert half.weight.dtype == half.bias.dtype == torch.bfloat16
    # Quantizing the dequantized weight again gives the same 4-bit codes: each block's largest value is exactly ±1.
    again = NF4Linear.from_linear(plain)
    assert torch.equal(again.weight_nf4.packed, layer.weight_nf4.packed)
    torch.testing.assert_close(dequantize_nf4(again.weight_nf4), plain.weight, rtol=0, atol=1e-3)


def test_nf4_linear_from_an_empty_state_and_parent_casts():
    # The loader's path: an empty NF4Linear of the right shape, filled by load_state_dict, no nn.Linear anywhere.
    layer = NF4Linear.from_linear(_linear())
    empty = NF4Linear(NF4Weight((48, 80)), torch.zeros(48))
    empty.load_state_dict(layer.state_dict())
    x = torch.randn(3, 80)
    expected = layer(x)
    assert torch.equal(empty(x), expected)
    parent = nn.Sequential(empty)
    parent.to(torch.bfloat16)  # casts the bias; the NF4 buffers (integers) and their float32 scales stay exact
    assert empty.bias.dtype == torch.bfloat16
    for key, value in layer.weight_nf4.state_dict().items():
        assert torch.equal(empty.weight_nf4.state_dict()[key], value), key
    assert torch.equal(dequantize_nf4(empty.weight_nf4), dequantize_nf4(layer.weight_nf4))
    y = parent(x.bfloat16())
    assert y.dtype == torch.bfloat16
    w = dequantize_nf4(layer.weight_nf4, torch.bfloat16)
    assert torch.equal(y, F.linear(x.bfloat16(), w, layer.bias.bfloat16()))
