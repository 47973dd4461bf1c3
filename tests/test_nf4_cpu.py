"""nf4_cpu: the C decode gives the pure-torch path's bits for every output dtype, block size and instruction set it
is built for (AVX-512, AVX2 and plain x86-64 where this CPU runs them), and its pooled outputs are reused only once
no tensor uses them."""

import platform
from pathlib import Path

import pytest
import torch

from lorakit.nn import nf4, nf4_cpu
from lorakit.nn.nf4 import NF4_CODE, _dequantize_torch, block_scales, quantize_nf4


def _cpu_flags() -> set[str]:
    try:
        return set(next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")).split())
    except (OSError, StopIteration):
        return set()


def _flag_sets():
    sets = [pytest.param(nf4_cpu.FLAGS, id="native")]
    if platform.machine() in ("x86_64", "AMD64"):
        common = ("-O3", "-shared", "-fPIC", "-std=c11")
        sets.append(pytest.param(("-march=x86-64", *common), id="x86-64"))  # the plain C loop
        if {"avx2", "fma", "bmi2", "f16c"} <= _cpu_flags():
            sets.append(pytest.param(("-march=x86-64-v3", *common), id="avx2"))
    return sets


def _kernel_or_skip(flags):
    try:
        return nf4_cpu.kernel(flags)
    except nf4_cpu.KernelUnavailable as e:
        pytest.skip(f"no C kernel here: {e}")


@pytest.mark.parametrize("flags", _flag_sets())
@pytest.mark.parametrize("shape,block", [((67, 129), 64), ((256, 96), 32), ((40, 51), 34), ((128, 300), 128)])
def test_decode_gives_the_pure_torch_bits(flags, shape, block):
    # odd sizes pad the last block; block 34 leaves a 2-code tail after each 32-code vector step
    _kernel_or_skip(flags)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 5
    w[0, :7] = 0.0  # exact zeros, and values on the scale itself
    q = quantize_nf4(w, block_size=block)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        got = nf4_cpu.decode(q.packed, block_scales(q), NF4_CODE, block, dtype, flags)
        want = _dequantize_torch(q, dtype).reshape(-1)
        assert got.dtype == dtype and torch.equal(got[:want.numel()], want), (dtype, flags)


def test_a_pooled_output_is_reused_only_after_it_is_freed():
    _kernel_or_skip(nf4_cpu.FLAGS)
    q = quantize_nf4(torch.randn(300, 256, generator=torch.Generator().manual_seed(0)))
    decode = lambda: nf4_cpu.decode(q.packed, block_scales(q), NF4_CODE, 64, torch.bfloat16)  # noqa: E731
    first = decode()
    kept = first.clone()
    second = decode()  # first is alive: a buffer of its own
    assert second.data_ptr() != first.data_ptr()
    second.add_(1.0)  # writing the second leaves the first alone
    assert torch.equal(first, kept)
    ptr = second.data_ptr()
    del second
    third = decode()  # the freed one comes back, with this decode's values
    assert third.data_ptr() == ptr and torch.equal(third, kept)


def test_large_cpu_weights_take_the_c_kernel():
    _kernel_or_skip(nf4_cpu.FLAGS)
    assert nf4._fast_dequantizer(torch.device("cpu")) is nf4._dequantize_c
    q = quantize_nf4(torch.randn(1024, 1025, generator=torch.Generator().manual_seed(1)))  # over COMPILED_MIN
    assert torch.equal(nf4.dequantize_nf4(q, torch.bfloat16), _dequantize_torch(q, torch.bfloat16))


def test_no_compiler_is_said(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    with pytest.raises(nf4_cpu.KernelUnavailable, match="no-such-cc"):
        nf4_cpu.build(("-O1", "-shared", "-fPIC"))
