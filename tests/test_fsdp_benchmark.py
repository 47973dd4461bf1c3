"""benchmarks/fsdp.py at its tiny size, so that it never rots: both modes run under torchrun (2 processes) and
report every field. Timings and peaks are not asserted (a shared machine makes them noise); the frozen share is,
since it holds at any size."""

import json

import pytest

from benchmarks import fsdp

FIELDS = {"mode", "params_m", "frozen_bytes", "frozen_mib", "setup_peak_mib", "train_peak_mib", "run_peak_mib",
          "setup_s", "first_step_s", "step_s", "ranks"}


def test_fsdp_benchmark_reports_both_modes(tmp_path):
    out = tmp_path / "fsdp.json"
    summary = fsdp.main(["--size", "tiny", "--steps", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == summary
    for mode in fsdp.MODES:
        assert FIELDS <= set(summary[mode]) and len(summary[mode]["ranks"]) == 2
        assert summary[mode]["step_s"] > 0 and summary[mode]["run_peak_mib"] > 0
    assert {"gathered_per_step_mib", "all_gather_gib_s"} <= set(summary["fsdp"])
    assert summary["frozen_ratio"] == pytest.approx(0.5, abs=0.01)
    assert {"peak_ratio", "step_ratio", "meets_peak_target"} <= set(summary)
