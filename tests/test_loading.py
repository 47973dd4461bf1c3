"""Quantize-while-loading (loading.py) and the shard-by-shard merged export (export.py), on tiny random models saved in
several shards through save_pretrained."""

import json
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import lorakit
from lorakit.errors import CheckpointError
from lorakit.io.checkpoints import load_quantized
from lorakit.io.export import export_merged
from lorakit.nn.nf4 import NF4Linear, NF4Weight

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def _llama(**kw):
    torch.manual_seed(0)
    dims = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128)
    return LlamaForCausalLM(LlamaConfig(**{**dims, **kw})).eval()


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sharded-llama")
    _llama().save_pretrained(path, max_shard_size="60KB")
    assert len(list(path.glob("model-*.safetensors"))) > 3
    return path


def _nf4_buffers(model) -> dict:
    return {f"{n}.{b}": t for n, m in model.named_modules() if isinstance(m, NF4Weight)
            for b, t in m.named_buffers()}


def test_quantize_while_loading_equals_loading_then_quantizing(sharded_llama):
    streamed = load_quantized(AutoModelForCausalLM, sharded_llama, torch.float32, keep=[])
    lorakit.inject(streamed, lorakit.LoraConfig(r=2, targets=["q_proj"], quantize="nf4"))
    after = lorakit.inject(AutoModelForCausalLM.from_pretrained(sharded_llama),
                           lorakit.LoraConfig(r=2, targets=["q_proj"], quantize="nf4"))
    ours, theirs = _nf4_buffers(streamed), _nf4_buffers(after)
    assert ours.keys() == theirs.keys() and len(ours) == 4 * 2 * 7  # every Linear of both blocks, 4 buffers each
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # bit-identical codes and scales
    with torch.no_grad():
        assert torch.equal(streamed(input_ids=IDS).logits, after(input_ids=IDS).logits)
    assert isinstance(streamed.lm_head, torch.nn.Linear) and streamed.model.embed_tokens.weight.dtype == torch.float32


def test_tied_gpt2_conv1d_and_a_new_classification_head(tmp_path):
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=128)).eval()
    gpt2.save_pretrained(tmp_path / "gpt2")
    loaded = load_quantized(AutoModelForCausalLM, tmp_path / "gpt2", torch.float32, keep=[])
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # tying survives
    assert isinstance(loaded.transformer.h[0].attn.c_attn, NF4Linear) and loaded.transformer.h[0].attn.c_attn.transposed
    with torch.no_grad():
        error = (loaded(input_ids=IDS).logits - gpt2(input_ids=IDS).logits).abs().max()
    assert 0 < error < 0.5  # only NF4's rounding
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         vocab_size=128)).save_pretrained(tmp_path / "bert")
    cls = load_quantized(AutoModelForSequenceClassification, tmp_path / "bert", torch.float32, keep=["classifier"],
                         num_labels=3)
    assert type(cls.classifier) is torch.nn.Linear and cls.classifier.weight.shape == (3, 32)
    assert 0.01 < cls.classifier.weight.std() < 0.03  # initialised as BERT initialises (std 0.02), not left empty
    assert isinstance(cls.bert.pooler.dense, NF4Linear)


def test_missing_and_truncated_shards_are_named(sharded_llama, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in sharded_llama.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    shard = sorted(broken.glob("model-*.safetensors"))[2]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"shard .*{shard.name} is not a readable safetensors file"):
        load_quantized(AutoModelForCausalLM, broken, torch.float32, keep=[])
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard .*{shard.name} is missing"):
        load_quantized(AutoModelForCausalLM, broken, torch.float32, keep=[])
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name}
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="has no (weight|tensor) for"):
        load_quantized(AutoModelForCausalLM, broken, torch.float32, keep=[])


PEAK_SCRIPT = """
import sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM
from lorakit.io.checkpoints import load_quantized

def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024

load_quantized(AutoModelForCausalLM, Path(sys.argv[2]), torch.float32, keep=[])  # imports and first-call caches
start = hwm()
model = load_quantized(AutoModelForCausalLM, Path(sys.argv[1]), torch.float32, keep=[])
print(hwm() - start)
"""


def test_loading_peak_stays_below_the_full_precision_model(tmp_path, sharded_llama):
    # 16 blocks of 512-wide layers: 117 MB of fp32 weights in 8 MB shards; quantized, about 16 MB.
    _llama(num_hidden_layers=16, hidden_size=512, intermediate_size=512, vocab_size=64).save_pretrained(
        tmp_path, max_shard_size="8MB")
    full = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path), str(sharded_llama)], capture_output=True,
                         text=True, check=True)
    peak = int(run.stdout.split()[-1])
    assert peak < 0.4 * full, (peak, full)


Trained = namedtuple("Trained", "model logits")


@pytest.fixture()
def trained_qlora():
    model = lorakit.inject(_llama(), lorakit.LoraConfig(r=2, targets=["q_proj", "v_proj"], init="random",
                                                        quantize="nf4"))
    with torch.no_grad():
        return Trained(model, model(input_ids=IDS).logits)


def test_export_merged_shards_load_with_from_pretrained(trained_qlora, tmp_path):
    files = export_merged(trained_qlora.model, tmp_path, torch.float32, max_shard_bytes=40_000)
    trained_qlora.model.config.save_pretrained(tmp_path)
    assert len(files) > 3 and (tmp_path / "model.safetensors.index.json").is_file()
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not any(isinstance(m, (NF4Linear, lorakit.LoraLayer)) for m in back.modules())
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=IDS).logits, trained_qlora.logits, atol=1e-5, rtol=1e-5)


def test_export_merged_in_bf16(trained_qlora, tmp_path):
    export_merged(trained_qlora.model, tmp_path, torch.bfloat16)
    trained_qlora.model.config.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in back.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        got = back(input_ids=IDS).logits.float()
    scale = trained_qlora.logits.abs().max()
    assert (got - trained_qlora.logits).abs().max() < 0.05 * scale  # bf16 rounding of every weight, nothing more


def test_export_refuses_when_the_disk_is_too_small(trained_qlora, tmp_path, monkeypatch):
    import lorakit.io.export

    monkeypatch.setattr(lorakit.io.export.shutil, "disk_usage", lambda path: namedtuple("U", "total used free")(0, 0, 1000))
    with pytest.raises(OSError, match=r"not enough disk for the merged model .* needs 0.0 GiB, 0.0 GiB are free"):
        export_merged(trained_qlora.model, tmp_path, torch.bfloat16)
    assert list(tmp_path.iterdir()) == []


def test_export_of_a_bf16_base_in_fp32_rounds_the_merge_once(tmp_path):
    from safetensors.torch import load_file
    from tiny_models import tiny_llama

    model = tiny_llama().to(torch.bfloat16)
    base = model.model.layers[0].self_attn.q_proj.weight.detach().float().clone()
    lorakit.inject(model, lorakit.LoraConfig(targets=["q_proj"], r=4, alpha=8, init="random"))
    layer = model.model.layers[0].self_attn.q_proj
    delta = 2.0 * layer.lora_B["default"].float() @ layer.lora_A["default"].float()  # alpha / r = 2
    export_merged(model, tmp_path, torch.float32)
    written = load_file(tmp_path / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    assert written.dtype == torch.float32
    torch.testing.assert_close(written, base + delta, rtol=0, atol=1e-6)  # not ΔW rounded to bf16 first
