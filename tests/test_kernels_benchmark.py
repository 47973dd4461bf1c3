"""benchmarks/kernels.py (issue 25's CUDA rows) and benchmarks/compiled.py (--compile on the CPU) at their tiny sizes,
so that the GPU session does not spend its minutes on a typo. Numbers are never asserted (timings are noise); what
is checked is that every variant runs and starts from the same weights (the same first loss)."""

import math

import pytest

pytest.importorskip("peft")


def test_kernel_rows_run_every_available_variant_at_tiny_size_on_the_cpu():
    from benchmarks import kernels

    row = kernels.run_row("kernels-llama1b-bf16", size="tiny", device="cpu")
    assert list(row["step_s"]) == ["lorakit", "lorakit-none", "lorakit-compile", "peft"], row["errors"]
    assert row["unavailable"] == ["peft-liger"] and row["errors"] == {}, row["errors"]  # no CUDA here
    assert set(row["kernels"].values()) == {"none"}  # --kernels auto on the CPU
    losses = list(row["first_loss"].values())
    assert all(math.isfinite(v) for v in losses) and max(losses) - min(losses) < 0.05, row["first_loss"]
    assert row["step_memory_gib"]["peft"] is None  # measured on CUDA only
    text = kernels.section({row["row"]: row})
    assert "| lorakit-compile | none |" in text and "unavailable: peft-liger" in text


def test_kernel_rows_refuse_a_size_they_have_no_shape_for():
    from benchmarks import kernels

    with pytest.raises(ValueError, match="--size gpu"):
        kernels.run_row("kernels-llama1b-bf16", size="full", device="cpu")


def test_the_compile_benchmark_measures_both_models_at_tiny_size():
    from benchmarks import compiled

    result = compiled.measure("tiny", checkpointing=True, precision="fp32", rounds=1)
    assert set(result["step_s"]) == {"eager", "compiled"} and result["speedup"] > 0
    assert result["first_step_s"]["compiled"] > 0 and len(result["steps"]["compiled"]) == 1
