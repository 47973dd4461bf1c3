"""benchmarks/losses.py at its tiny size, so that it never rots: every run is produced, with its peak and step times,
and the verdicts have their columns. Numbers are never asserted (timings on a shared machine are noise)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parent.parent


def test_losses_benchmark_runs_every_side_at_tiny_size(tmp_path):
    out = tmp_path / "losses.json"
    subprocess.run([sys.executable, "-m", "benchmarks.losses", "--size", "tiny", "--steps", "1", "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True)
    data = json.loads(out.read_text())
    assert [(r["side"], r["checkpointing"]) for r in data["runs"]] == [
        ("lorakit", True), ("peft", True), ("peft", False), ("lorakit", False)]
    assert all(r["peak_bytes"] > 0 and len(r["steps_s"]) == 1 for r in data["runs"])
    assert all("training" in r["phase_peaks"] for r in data["runs"] if r["side"] == "lorakit")
    assert {v["checkpointing"] for v in data["verdicts"]} == {True, False}
    assert all({"memory_ratio", "memory_met", "step_ratio", "cpu_ratio"} <= v.keys() for v in data["verdicts"])
