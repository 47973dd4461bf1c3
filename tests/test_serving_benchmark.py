"""benchmarks/serving.py at its tiny size, so that it never rots: the library part (lorakit, PEFT and the single
adapter, after checking that lorakit and PEFT agree) and the server part (two `python -m lorakit serve` processes
under load, real HTTP). Numbers are never asserted, only that every column is there and no request failed."""

import json

import pytest

pytest.importorskip("peft")


def test_serving_benchmark_runs_at_tiny_size(tmp_path):
    from benchmarks import serving

    out = tmp_path / "serving.json"
    serving.main(["--size", "tiny", "--threads", "1", "--out", str(out)])
    results = json.loads(out.read_text())
    library = results["library"]
    assert {"lorakit_mixed_ms", "peft_mixed_ms", "single_ms", "stacking_ms", "mixed_vs_single", "mixed_vs_peft",
            "meets_vs_single", "meets_vs_peft"} <= set(library)
    server = results["server"]
    for mode in ("batched", "one_at_a_time"):
        assert server[mode]["errors"] == 0 and server[mode]["requests"] == 4 * 2
        assert server[mode]["p50_ms"] <= server[mode]["p99_ms"]
    assert server["batched"]["rows_per_batch"] >= 1
    assert {"base_only_mib", "with_adapters_mib", "adapters_file_mib", "model_mib", "added_mib"} <= set(server["memory"])
    assert results["command"].startswith("python -m benchmarks.serving --size tiny")


def test_openai_serving_benchmark_runs_at_tiny_size(tmp_path):
    from benchmarks import openai_serving

    out = tmp_path / "openai_serving.json"
    openai_serving.main(["--size", "tiny", "--threads", "1", "--out", str(out)])
    results = json.loads(out.read_text())
    assert list(results["by_clients"]) == ["1", "2"]
    for clients, by in results["by_clients"].items():
        for endpoint in ("chat_stream", "generate"):
            # every request answered, each with max_tokens tokens (the streams' counted from their usage chunks)
            assert by[endpoint]["errors"] == 0 and by[endpoint]["tokens"] == int(clients) * 4, by
        assert by["chat_stream"]["first_text_ms"] is not None
    assert "| 2 |" in openai_serving.section(out)
