"""The benchmark scripts at tiny sizes, so that they never rot. Numbers are never asserted, only that every row is
produced with its columns (timings on a shared CI machine are noise)."""

import json

import pytest

pytest.importorskip("peft")
pytest.importorskip("matplotlib")

from benchmarks import adapters, infer, memory, profile, report, run, train  # noqa: E402

TRAIN_COLUMNS = {"workload", "batch", "lorakit_s", "peft_s", "full_s", "lorakit_vs_peft", "lorakit_vs_full",
                 "meets_vs_peft", "meets_vs_full", "warmup", "rounds", "quartiles"}
INFER_COLUMNS = {f"{k}_ms" for k in infer.VARIANTS} | {"lorakit_vs_base", "lorakit_merged_vs_base", "meets_unmerged",
                                                      "meets_merged"}
MEMORY_COLUMNS = {"model_mb", "lorakit_mb", "peft_mb", "full_mb", "lorakit_vs_peft", "meets_vs_peft", "method"}
ADAPTER_COLUMNS = {f"{v}_{op}_ms" for v in ("lorakit", "peft") for op in adapters.OPS} | {
    "lorakit_file_kib", "peft_file_kib", "full_model_mib", "adapter_share"}


def test_memory_child_process_reports_a_peak():
    found = memory.measure_in_child("cls", "lorakit", "tiny")
    assert found["variant"] == "lorakit" and found["peak_delta"] >= 0 and found["model"] > 0


def test_run_writes_every_group(tmp_path, monkeypatch):
    # Memory rows measure in this process here (one child process is tested above), to keep the suite fast.
    monkeypatch.setattr(memory, "measure_in_child", memory.measure)
    md, results = tmp_path / "BENCHMARKS.md", tmp_path / "results"
    run.main(["--size", "tiny", "--md", str(md), "--results", str(results),
              "--only", "cls", "cls-bf16", "gpt2", "llama", "infer", "mem-cls", "adapters"])
    groups = json.loads((results / "results.json").read_text())["groups"]
    expected = {"train": TRAIN_COLUMNS, "infer": INFER_COLUMNS, "memory": MEMORY_COLUMNS, "adapters": ADAPTER_COLUMNS}
    for group, columns in expected.items():
        assert groups[group], group
        for key, row in groups[group].items():
            assert "error" not in row, row
            assert columns <= set(row), (key, columns - set(row))
    text = md.read_text()
    for heading in ("## Machine and run", "## 1-2. Training step time", "## 3. Inference latency",
                    "## 4. Training memory", "## 5. Adapter files", "## 6. Quality", "--size tiny"):
        assert heading in text
    for chart in ("train", "infer", "memory"):
        assert (results / f"{chart}.png").stat().st_size > 0
    # --update re-runs one row, keeps the others and lists both runs
    run.main(["--size", "tiny", "--md", str(md), "--results", str(results), "--only", "adapters-cls", "--update"])
    updated = json.loads((results / "results.json").read_text())
    assert updated["groups"]["train"] == groups["train"]
    assert [r["command"].split(" --only ")[1][:5] for r in updated["meta"]["runs"]] == ["cls c", "adapt"]
    assert md.read_text().count("--size tiny") >= 2


def test_select_understands_groups_and_rows():
    assert run.select(["train"]) == {"train": train.DEFAULT}
    assert run.select(["gpt2", "mem-llama"]) == {"train": ["gpt2"], "memory": ["mem-llama"]}
    with pytest.raises(SystemExit):
        run.select(["no-such-row"])


def test_profile_scripts_run():
    assert "aten::" in profile.profile_variant("cls", "lorakit", "tiny", steps=1, rows=5)
    assert set(profile.layer_times(8, 16, 16, 0.1, rounds=1)) == {"frozen", "lorakit", "peft", "full"}
    assert 0 < profile.saved_mib("cls", "lorakit", "tiny") < profile.saved_mib("cls", "full", "tiny")


def test_quality_script_runs_on_a_few_rows(tmp_path):
    from benchmarks import quality

    if not quality.DATA.exists():
        pytest.skip(f"{quality.DATA} is absent: the shared datasets sit beside the repository only on developer machines")
    out = quality.main(["--train-rows", "16", "--dev-rows", "8", "--datasets", "ag_news",
                        "--variants", "lorakit", "lorakit-nf4", "--out", str(tmp_path / "quality.json")])
    rows = json.loads((tmp_path / "quality.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["lorakit", "lorakit-nf4"] == [r["variant"] for r in out["rows"]]
    assert all(0 <= r["accuracy"] <= 1 and r["trainable_share"] < 0.01 for r in rows)
    assert 0 < rows[1]["frozen_nf4_vs_fp32"] < 0.15
    assert all(len(r["accuracy_by_epoch"]) == r["epochs"] == 3 and r["accuracy_by_epoch"][-1] == r["accuracy"]
               for r in rows)
    # Re-running one variant (here at another learning rate) replaces its row and keeps the other variant's.
    quality.main(["--train-rows", "16", "--dev-rows", "8", "--datasets", "ag_news", "--variants", "lorakit",
                  "--lr", "2e-3", "--out", str(tmp_path / "quality.json")])
    rerun = json.loads((tmp_path / "quality.json").read_text())["rows"]
    assert sorted(r["variant"] for r in rerun) == ["lorakit", "lorakit-nf4"]
    assert {"--variants lorakit --lr 2e-3" in r["command"] for r in rerun} == {True, False}
    assert {r["variant"]: r["lr"] for r in rerun} == {"lorakit": 2e-3, "lorakit-nf4": quality.LR["lorakit-nf4"]}
    text = report._quality_section(tmp_path / "quality.json")
    assert "| ag_news | lorakit-nf4 | 16 / 8 |" in text and "QLoRA (NF4) within 1.5 points of fp32 LoRA" in text


def test_packing_benchmark_runs(tmp_path):
    from benchmarks import packing

    packing.main(["--size", "tiny", "--device", "cpu", "--out", str(tmp_path / "packing.json")])
    saved = json.loads((tmp_path / "packing.json").read_text())
    assert set(saved["modes"]) == {"padded", "packed"} and saved["tokens"] > 0
    for mode in saved["modes"].values():
        assert {"steps", "seconds", "tokens_per_s", "waste"} <= set(mode)
    assert set(saved["waste"]) == {"padded", "packed-best-fit", "packed-sequential"}
    # Waste is arithmetic on seeded lengths, not a timing: best-fit packing wastes less than padding.
    assert saved["waste"]["packed-best-fit"]["waste"] < saved["waste"]["padded"]["waste"]


def test_exactness_benchmark_measures_the_fp32_equalities(tmp_path):
    # The script behind README's bf16 statement; in fp32 the same comparisons are the exact ones the tests hold.
    from benchmarks.exactness import measure

    result = measure(tmp_path, "fp32")
    assert result["resumed"] == 0.0 and result["accumulated"] < 1e-5 and result["ddp"] < 1e-5
    assert result["B_moved_by_training"] > 1e-3  # the runs did train: the comparisons could fail
