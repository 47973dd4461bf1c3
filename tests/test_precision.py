"""--precision auto decides bf16 or fp32 from what the device reports. The CPU's report is faked here both ways
through LORAKIT_CPU_BF16 (the one documented override), so these tests never depend on this machine's flags."""

import warnings

import pytest
import torch

from lorakit.runtime import precision


@pytest.mark.parametrize("reported, expected", [("1", "bf16"), ("0", "fp32")])
def test_auto_follows_what_the_cpu_reports(monkeypatch, reported, expected):
    monkeypatch.setenv(precision.CPU_BF16_OVERRIDE, reported)
    assert precision.resolve("auto", "cpu") == expected
    assert precision.compute_dtype("auto", "cpu") == {"bf16": torch.bfloat16, "fp32": torch.float32}[expected]
    assert precision.resolve("fp32", "cpu") == "fp32" and precision.resolve("bf16", "cpu") == "bf16"


def test_bf16_asked_for_on_a_cpu_without_it_says_why_and_still_computes_in_bf16(monkeypatch):
    monkeypatch.setenv(precision.CPU_BF16_OVERRIDE, "0")
    with pytest.warns(UserWarning, match="without fast bf16 matrix multiplies"):
        assert precision.compute_dtype("bf16", "cpu") == torch.bfloat16
    monkeypatch.setenv(precision.CPU_BF16_OVERRIDE, "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision.compute_dtype("bf16", "cpu") == torch.bfloat16


def test_without_the_override_the_cpu_flags_in_cpuinfo_decide(monkeypatch, tmp_path):
    monkeypatch.delenv(precision.CPU_BF16_OVERRIDE, raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(precision, "Path", lambda _: cpuinfo)
    for text, fast in (("processor\t: 0\nflags\t\t: fpu avx2 fma\n", False),
                       ("processor\t: 0\nflags\t\t: fpu avx512f amx_bf16\n", True), ("processor\t: 0\n", False)):
        cpuinfo.write_text(text)
        precision._cpu_flags_say_bf16.cache_clear()
        assert precision.fast_bf16("cpu") is fast
    precision._cpu_flags_say_bf16.cache_clear()


def test_a_malformed_override_is_refused(monkeypatch):
    monkeypatch.setenv(precision.CPU_BF16_OVERRIDE, "yes")
    with pytest.raises(ValueError, match="LORAKIT_CPU_BF16='yes': expected 1"):
        precision.fast_bf16("cpu")
