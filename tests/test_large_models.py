"""Large models on small machines, at tiny size: `lorakit train` in the checkpoint's dtype or with a QLoRA base
quantized while loading, gradient checkpointing, `lorakit merge --dtype bf16` shard by shard, and bad inputs
refused before anything is written."""

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import lorakit
from lorakit.cli.main import app
from lorakit.errors import ConfigError
from lorakit.nn.nf4 import NF4Linear
from lorakit.training.settings import TrainConfig
from lorakit.training.train import train
from lorakit.training.trained import load_trained


@pytest.fixture(scope="module")
def sharded_bf16_llama(llama_dir, tmp_path_factory) -> Path:
    """The tiny Llama of conftest saved in bf16, in several shards, with its tokenizer."""
    path = tmp_path_factory.mktemp("bf16-llama")
    AutoModelForCausalLM.from_pretrained(llama_dir).to(torch.bfloat16).save_pretrained(path, max_shard_size="40KB")
    AutoTokenizer.from_pretrained(llama_dir).save_pretrained(path)
    assert len(list(path.glob("model-*.safetensors"))) > 2
    return path


def _cfg(model, data, out, **kw) -> TrainConfig:
    base = dict(model=str(model), task="causal-lm", data=str(data), output=str(out), batch_size=4, max_length=24,
                lr=1e-2, dropout=0.0, max_steps=3, save_every=100, log_every=1, eval_every=None,
                targets="q_proj,v_proj", prompt_column="prompt", text_column="completion")
    return TrainConfig(**{**base, **kw})


def _adapter(out) -> dict:
    return load_file(Path(out) / "adapter_model.safetensors")


def test_auto_dtype_keeps_a_bf16_checkpoint_bf16(sharded_bf16_llama, qa_jsonl, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CPU_BF16", "0")  # a CPU without AVX-512 BF16 or AMX, whatever this one has
    with pytest.warns(UserWarning, match="weights are bf16 and this cpu has no fast bf16"):
        metrics = train(_cfg(sharded_bf16_llama, qa_jsonl, tmp_path / "run"), progress=False)
    assert metrics["weights"] == ["bf16", "fp32"]  # the base in bf16, LoRA's A and B fp32 master weights
    assert metrics["compute_dtype"] == "bf16" and metrics["device"] == "cpu"
    assert {t.dtype for t in _adapter(tmp_path / "run").values()} == {torch.float32}


def test_auto_dtype_on_a_cpu_with_fast_bf16_says_nothing(sharded_bf16_llama, qa_jsonl, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CPU_BF16", "1")  # a CPU with AVX-512 BF16 or AMX, whatever this one has
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no fast bf16")
        metrics = train(_cfg(sharded_bf16_llama, qa_jsonl, tmp_path / "run"), progress=False)
    assert metrics["weights"] == ["bf16", "fp32"] and metrics["compute_dtype"] == "bf16"


@pytest.mark.parametrize("cpu_bf16, compute, weights", [("0", "fp32", ["fp32", "nf4"]),
                                                        ("1", "bf16", ["bf16", "fp32", "nf4"])])
def test_qlora_run_quantizes_every_linear_while_loading(sharded_bf16_llama, qa_jsonl, tmp_path, monkeypatch,
                                                        cpu_bf16, compute, weights):
    # --precision auto decides the compute dtype from what the CPU reports (faked here both ways); the heads and
    # embeddings are held in it, A and B stay fp32, every Linear of the base is NF4.
    monkeypatch.setenv("LORAKIT_CPU_BF16", cpu_bf16)
    metrics = train(_cfg(sharded_bf16_llama, qa_jsonl, tmp_path / "run", quantize="nf4"), progress=False)
    assert metrics["weights"] == weights and metrics["compute_dtype"] == compute
    info = json.loads(_cli("info", tmp_path / "run", "--json"))
    assert info["compute_dtype"] == compute and info["weights"] == weights


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_trains_the_same_adapter(sharded_bf16_llama, qa_jsonl, tmp_path, reentrant):
    plain = _cfg(sharded_bf16_llama, qa_jsonl, tmp_path / "plain", quantize="nf4")
    train(plain, progress=False)
    if reentrant:  # through the Python API: the same model and adapter, checkpointed the reentrant way
        ids = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(0))
        grads = [_qlora_gradients(sharded_bf16_llama, ids, checkpointing) for checkpointing in (False, True)]
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        return
    train(_cfg(sharded_bf16_llama, qa_jsonl, tmp_path / "ckpt", quantize="nf4", gradient_checkpointing=True),
          progress=False)
    ours, theirs = _adapter(tmp_path / "plain"), _adapter(tmp_path / "ckpt")
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)


def _qlora_gradients(path, ids, checkpointing: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    lorakit.inject(model, lorakit.LoraConfig(r=4, targets=["q_proj", "v_proj"], quantize="nf4", init="random"))
    if checkpointing:
        lorakit.enable_gradient_checkpointing(model, reentrant=True)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    return [p.grad for p in model.parameters() if p.requires_grad]


def test_bf16_merge_of_a_qlora_run_loads_with_from_pretrained(sharded_bf16_llama, qa_jsonl, tmp_path):
    train(_cfg(sharded_bf16_llama, qa_jsonl, tmp_path / "run", quantize="nf4", max_steps=6), progress=False)
    trained, _, _, _ = load_trained(None, str(tmp_path / "run"))
    ids = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
    _cli("merge", "--adapter", tmp_path / "run", "--output", tmp_path / "merged", "--dtype", "bf16")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.dtype == torch.bfloat16 and not any(isinstance(m, NF4Linear) for m in merged.modules())
    with torch.no_grad():
        got = merged(input_ids=ids).logits.float()
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()  # bf16 rounding of the merged weights only
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_bad_inputs_are_refused_before_anything_is_written(sharded_bf16_llama, qa_jsonl, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sharded_bf16_llama, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:64])
    for quantize in (None, "nf4"):
        out = tmp_path / f"run-{quantize}"
        with pytest.raises(ConfigError, match=f"{shard.name} is not a readable safetensors file"):
            train(_cfg(broken, qa_jsonl, out, quantize=quantize), progress=False)
        assert not out.exists()
    shard.unlink()
    with pytest.raises(ConfigError, match=f"{shard.name} is missing"):
        train(_cfg(broken, qa_jsonl, tmp_path / "run", quantize="nf4"), progress=False)
    with pytest.raises(ConfigError, match="dtype must be one of"):
        train(_cfg(sharded_bf16_llama, qa_jsonl, tmp_path / "run", dtype="int8"), progress=False)
    assert not (tmp_path / "run").exists()


def _cli(*args) -> str:
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output
