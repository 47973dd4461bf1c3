"""Issue 15's benchmarks at tiny sizes. benchmarks/scale.py: the checkpoint builder, the FLOP formula against torch's
FLOP counter, the memory formula against real NF4 weights, the runner end to end; benchmarks/nf4.py: every row is
produced. Timings are never asserted (noise on a shared machine)."""

import json
import shutil
from collections import namedtuple

import pytest
import torch

from benchmarks import nf4, scale


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return scale.build_checkpoint("tiny", tmp_path_factory.mktemp("bench"))


def test_llama_sizes_match_the_published_parameter_counts():
    assert scale.n_params(scale.SIZES["7b"]) == 6_738_415_616  # Llama-2-7B
    assert scale.n_params(scale.SIZES["13b"]) == 13_015_864_320  # Llama-2-13B
    assert 13.4e9 < scale.disk_needed("7b") < 13.6e9 and 26.0e9 < scale.disk_needed("13b") < 26.1e9
    assert len(scale.shard_plan(scale.tensor_specs(scale.SIZES["7b"]), scale.SHARD_BYTES["7b"])) == 7


def test_tiny_checkpoint_loads_as_written(tiny_dir):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    index = json.loads((tiny_dir / "model.safetensors.index.json").read_text())
    specs = scale.tensor_specs(scale.SIZES["tiny"])
    assert set(index["weight_map"]) == {name for name, _ in specs} and len(set(index["weight_map"].values())) > 2
    seen = 0
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(tiny_dir / file, "pt") as f:
            for i, (name, _) in enumerate(specs):
                if name in f.keys():
                    assert torch.equal(f.get_tensor(name), scale.random_tensor(name, dict(specs)[name], i)), name
                    seen += 1
    assert seen == len(specs)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)  # every key found, none left over
    assert sum(p.numel() for p in model.parameters()) == scale.n_params(scale.SIZES["tiny"])
    assert model.config.vocab_size == 1024 and model.config.torch_dtype == torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert len(tokenizer) <= 1024 and tokenizer.eos_token_id == 2
    data = scale.write_data(tiny_dir.parent / "rows.jsonl", rows=3)
    for line in data.read_text().splitlines():
        assert len(tokenizer(json.loads(line)["text"])["input_ids"]) >= scale.TOKENS
    stamp = (tiny_dir / "COMPLETE").stat().st_mtime_ns
    assert scale.build_checkpoint("tiny", tiny_dir.parent) == tiny_dir  # cached: not rebuilt
    assert (tiny_dir / "COMPLETE").stat().st_mtime_ns == stamp


def test_build_refuses_when_the_disk_is_short(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 10**9, 10**9))
    with pytest.raises(scale.NotEnoughDisk, match=r"needs 13\.5 GB"):
        scale.build_checkpoint("7b", tmp_path)
    assert not (tmp_path / "7b").exists()


@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non-reentrant"])
def test_step_flops_match_torch_flop_counter(checkpointing):
    # The formula against what torch counts in a real step: a tiny Llama, LoRA on q_proj/v_proj, frozen base, input
    # gradients enabled (as checkpointing needs); with checkpointing, the recompute counts too. Eager attention and
    # in-place addmm_ (lorakit's LoRA update), because torch's counter knows neither CPU SDPA nor addmm_.
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit

    cfg = scale.SIZES["tiny"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="eager"))
    lorakit.inject(model, lorakit.LoraConfig(r=4, targets=["q_proj", "v_proj"], dropout=0.0))
    model.enable_input_require_grads()
    if checkpointing:
        kwargs = {"use_reentrant": checkpointing == "reentrant"}
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    ids = torch.randint(0, cfg["vocab_size"], (2, 16))
    addmm_ = {torch.ops.aten.addmm_: lambda out, a, b, *args, **kwargs: 2 * a[0] * a[1] * b[1]}  # shapes
    with FlopCounterMode(display=False, custom_mapping=addmm_) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    expected = scale.step_flops(cfg, tokens=32, seq=16, r=4, targets=["q_proj", "v_proj"], checkpointing=checkpointing)
    assert counter.get_total_flops() == expected["total"]


def test_memory_estimate_of_nf4_weights_matches_real_ones():
    from lorakit.nn.nf4 import quantize_nf4

    # One layer 512 wide: whole groups of 256 block scales, as at 7B (tiny layers would pay mostly padding).
    cfg = dict(hidden_size=512, num_hidden_layers=1, intermediate_size=1376, num_attention_heads=8, vocab_size=1000)
    real = sum(quantize_nf4(torch.zeros(shape)).nbytes for shape in scale.linear_shapes(cfg).values())
    e = scale.memory_estimates(cfg, "q_proj,v_proj", r=16)
    unquantized = e["params"] - cfg["num_hidden_layers"] * sum(o * i for o, i in scale.linear_shapes(cfg).values())
    assert e["qlora"] - 2 * unquantized - 16 * e["lora_params"] == pytest.approx(real, rel=1e-3)
    assert e["lora_params"] == 16 * (2 * 512 + 2 * 512)  # q and v: r · (in + out) each
    assert e["qlora"] < e["bf16_lora"] < e["full_finetuning"] == 16 * e["params"]


def test_measure_gflops_runs():
    found = scale.measure_gflops(scale.SIZES["tiny"], tokens=8, threads=1, rounds=1)
    for dtype in ("float32", "bfloat16"):
        assert found[dtype]["gflops"] > 0 and len(found[dtype]["per_product"]) == 14


@pytest.mark.slow
def test_run_tiny_end_to_end(tiny_dir):
    result = scale.run("tiny", root=tiny_dir.parent)
    lorakit_row, peft_row = result["rows"]
    assert "error" not in lorakit_row, lorakit_row
    assert len(lorakit_row["step_seconds"]) == 3 and lorakit_row["tokens_per_s"] > 0
    assert lorakit_row["load_s"] > 0 and lorakit_row["load_peak"] > 0 and lorakit_row["train_peak"] > 0
    if scale.bnb_peft_check()["ok"]:  # bitsandbytes runs PEFT's 4-bit LoRA on this CPU: its row is measured too
        assert len(peft_row["step_seconds"]) == 3 and peft_row["load_s"] > 0, peft_row
    else:
        assert "cannot run here" in peft_row["error"], peft_row
    text = scale.report(result, scale.measure_gflops(scale.SIZES["tiny"], tokens=8, threads=1, rounds=1))
    assert "| tiny | q_proj,v_proj | default | lorakit |" in text and "full fine-tuning" in text


def test_nf4_benchmark_produces_every_row(tmp_path):
    rows = nf4.main(["--size", "tiny", "--rounds", "1", "--threads", "1", "--json", str(tmp_path / "nf4.json")])
    assert [r["op"] for r in rows] == ["quantize"] * 4 + ["dequantize"] * 4 + ["linear fwd+bwd"] * 4
    assert all(r.get("mparams_per_s", 0) > 0 and ("bnb_mparams_per_s" in r or "bnb_error" in r)
               for r in rows[:4])
    assert all(r["melems_per_s"] > 0 for r in rows[4:8]) and all(r["nf4_vs_dense"] > 0 for r in rows[8:])
    assert json.loads((tmp_path / "nf4.json").read_text())["rows"] == rows
    paths = nf4.main(["--size", "tiny", "--rounds", "1", "--threads", "1", "--only", "paths", "step", "--dtypes",
                      "fp32"])
    assert [(r["op"], r.get("path")) for r in paths] == [("dequantize cpu", "torch"), ("dequantize cpu", "torch.compile"),
                                                         ("dequantize cpu", "C kernel")] * 2 + [
        ("checkpointed step", None)] * 2
    assert all(r["exact"] for r in paths[:6] if "error" not in r)
    assert all(r["kept_s"] > 0 and r["rebuilt_s"] > 0 and r["dense_s"] > 0 for r in paths[6:])


def test_the_load_marker_is_the_line_after_loading():
    # "training data: ..." comes before the model loads; "training N of M parameters" once it is ready.
    assert not scale.LOADED_MARKER.match("training data: text data: 24 examples from 24 rows")
    assert scale.LOADED_MARKER.match("training 8,388,608 of 6,746,804,224 parameters (0.12%), 3 steps of 1 examples")
    assert scale.LOADED_MARKER.match(scale.PEFT_LOADED + '{"model_bytes": 1}')


def test_gflops_are_measured_once_per_size_and_threads(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(scale, "measure_gflops", lambda cfg, threads: calls.append(threads) or {"float32": threads})
    assert scale.cached_gflops("tiny", 1, root=tmp_path) == {"float32": 1}
    assert scale.cached_gflops("tiny", 1, root=tmp_path) == {"float32": 1} and calls == [1]
    assert scale.cached_gflops("tiny", 2, root=tmp_path) == {"float32": 2} and calls == [1, 2]
