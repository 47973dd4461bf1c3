"""`--kernels auto|liger|none` (runtime/kernels.py): which kernels a run uses and why, refused before any work where
Liger cannot run; the chunked loss's place for a fused linear cross-entropy; and, on CUDA with liger-kernel installed,
Liger-patched training against the plain model within bf16 tolerance (run by benchmarks/gpu.sh: `pytest -k cuda`)."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from test_chunked_loss import batch_with_ignored_labels, loss_and_grads, lora_model

from lorakit.errors import ConfigError, KernelsError
from lorakit.runtime import kernels
from lorakit.training.chunked_loss import loss_model
from lorakit.training.settings import TrainConfig
from lorakit.training.train import train

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def config(name: str):
    import transformers

    return getattr(transformers, name)()


# (requested, liger installed, device, config class) -> the kernels chosen, or the error's words
TABLE = [
    ("auto", True, CUDA, "LlamaConfig", "liger"),
    ("auto", True, CUDA, "MistralConfig", "liger"),
    ("auto", True, CUDA, "Qwen2Config", "liger"),
    ("liger", True, CUDA, "LlamaConfig", "liger"),
    ("none", True, CUDA, "LlamaConfig", "none"),
    ("auto", False, CUDA, "LlamaConfig", "none"),
    ("auto", True, CPU, "LlamaConfig", "none"),
    ("auto", True, CUDA, "GPT2Config", "none"),
    ("auto", True, CUDA, "BertConfig", "none"),
    ("none", False, CPU, "GPT2Config", "none"),
    ("liger", False, CUDA, "LlamaConfig", KernelsError("not installed")),
    ("liger", True, CPU, "LlamaConfig", KernelsError("Triton kernels for CUDA; this run is on cpu")),
    ("liger", True, CUDA, "GPT2Config", KernelsError("no kernels lorakit applies to GPT2Config")),
    ("liger", False, CPU, "BertConfig", KernelsError("on cpu; liger-kernel is not installed.*BertConfig")),
]


@pytest.mark.parametrize("requested,available,device,family,expected", TABLE)
def test_the_decision_table(requested, available, device, family, expected):
    if isinstance(expected, Exception):
        with pytest.raises(KernelsError, match=f"--kernels liger: .*{expected}"):
            kernels.choose(requested, device, config(family), available=available)
        return
    chosen = kernels.choose(requested, device, config(family), available=available)
    assert chosen.name == expected and chosen.liger == (expected == "liger")
    assert (chosen.patch is not None) == chosen.liger
    if chosen.liger:
        assert chosen.patch == kernels.FAMILIES[family]
    elif requested == "auto":  # auto says why not
        why = {CPU: "this run is on cpu"}.get(device) or ("not installed" if not available else "no kernels")
        assert why in chosen.why, chosen.why


def test_a_subclassed_config_is_its_family():
    from transformers import LlamaConfig

    class Custom(LlamaConfig):
        model_type = "custom-llama"

    assert kernels.family(Custom()) == "apply_liger_kernel_to_llama"


def test_unknown_kernels_are_refused_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="kernels must be one of"):
        train(TrainConfig(data=str(tmp_path / "none.csv"), kernels="triton"), progress=False)


def test_liger_on_the_cpu_is_refused_before_the_data_is_read(llama_dir, tmp_path):
    cfg = TrainConfig(model=str(llama_dir), data=str(tmp_path / "absent.jsonl"), task="causal-lm", kernels="liger",
                      output=str(tmp_path / "run"))
    with pytest.raises(KernelsError, match="this run is on cpu"):  # not the DataError an absent file gives
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_auto_on_the_cpu_says_none_and_why(llama_dir, qa_jsonl, tmp_path):
    said = []
    metrics = train(TrainConfig(model=str(llama_dir), data=str(qa_jsonl), task="causal-lm", text_column="completion",
                                output=str(tmp_path / "run"), max_steps=1, batch_size=2, max_length=16,
                                precision="fp32"), progress=False, echo=said.append)
    assert "kernels: none (Liger's kernels are Triton kernels for CUDA; this run is on cpu)" in said
    assert metrics["kernels"] == "none"


def reference_fused(calls: list):
    """A fused linear cross-entropy as the full computation (the logits whole), recording what it was given."""
    def fused(h, w, b, t, dtype, cap):
        calls.append((tuple(h.shape), tuple(t.shape), dtype, cap))
        z = h @ w.t() if b is None else torch.addmm(b, h, w.t())
        z = z.float() if cap is None else cap * torch.tanh(z.float() / cap)
        return F.cross_entropy(z, t)
    return fused


@pytest.mark.parametrize("name,cap", [("llama", None), ("gemma2", 2.0)])
def test_a_fused_loss_gets_the_target_rows_and_the_soft_cap(name, cap):
    model, calls = lora_model(name), []
    net, why = loss_model(model, chunk_tokens=5, fused=reference_fused(calls))
    batch = batch_with_ignored_labels()
    own_loss, own = loss_and_grads(model, batch)
    loss, got = loss_and_grads(net, batch)
    targets = int((batch["labels"][:, 1:] != -100).sum())
    assert why is None and calls == [((targets, 32), (targets,), None, cap)]
    assert loss == pytest.approx(own_loss, abs=1e-6)
    for k in own:
        torch.testing.assert_close(got[k], own[k], rtol=1e-4, atol=1e-6, msg=k)


def test_a_scaled_head_keeps_lorakits_loss():
    from transformers import CohereConfig, CohereForCausalLM

    from lorakit import LoraConfig, inject

    torch.manual_seed(0)
    model = CohereForCausalLM(CohereConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, vocab_size=128,
                                           num_attention_heads=4, num_key_value_heads=2, logit_scale=0.5)).eval()
    inject(model, LoraConfig(r=4, targets=["q_proj"], dropout=0.0))
    calls = []
    net, _ = loss_model(model, chunk_tokens=5, fused=reference_fused(calls))
    batch = batch_with_ignored_labels()
    assert loss_and_grads(net, batch)[0] == pytest.approx(loss_and_grads(model, batch)[0], abs=1e-6) and calls == []


# ---- on a GPU with liger-kernel (benchmarks/gpu.sh) ----

needs_liger = pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
                                 reason="needs a CUDA GPU and liger-kernel")


def liger_run(model_dir, data, out, **kw) -> dict:
    cfg = TrainConfig(model=str(model_dir), data=str(data), output=str(out), task="causal-lm", text_column="completion",
                      prompt_column="prompt", eval_data=str(data), batch_size=4, max_length=32, lr=2e-2, dropout=0.0,
                      max_steps=4, eval_every=4, log_every=1, precision="bf16", targets="all-linear", **kw)
    return train(cfg, progress=False)


@needs_liger
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_liger_training_matches_the_plain_model_in_bf16(llama_dir, qa_jsonl, tmp_path, compiled, monkeypatch):
    """Liger's RMSNorm, RoPE, SwiGLU and fused linear cross-entropy against the plain model and lorakit's chunked
    loss: the same run in bf16, losses within 2% and the adapters within bf16 rounding of the update."""
    from safetensors.torch import load_file
    from transformers.models.llama import modeling_llama

    # Liger's RoPE replaces the module's function for every Llama of the process: put it back after the test.
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", modeling_llama.apply_rotary_pos_emb)
    plain = liger_run(llama_dir, qa_jsonl, tmp_path / "plain", kernels="none", compile=compiled)
    liger = liger_run(llama_dir, qa_jsonl, tmp_path / "liger", kernels="liger", compile=compiled)
    assert liger["kernels"] == "liger" and plain["kernels"] == "none" and liger["device"].startswith("cuda")
    assert liger["train_loss"] == pytest.approx(plain["train_loss"], rel=2e-2)
    assert liger["eval"]["loss"] == pytest.approx(plain["eval"]["loss"], rel=2e-2)
    assert liger["eval"]["loss"] < liger["eval_before"]["loss"]  # it trained
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("liger", "plain"))
    assert a.keys() == b.keys()
    for k in a:  # B starts at 0: what training put there, compared relative to its size
        scale = b[k].float().abs().max().item()
        assert (a[k].float() - b[k].float()).abs().max().item() <= 0.1 * scale + 1e-3, k


@needs_liger
def test_cuda_liger_patches_the_blocks_and_keeps_the_lora_layers(llama_dir, monkeypatch):
    """After apply(): the MLPs run Liger's SwiGLU and the norms Liger's RMSNorm, the LoRA layers in the MLP still
    run (a change of B changes the output), and the patched model's logits are the plain one's within bf16."""
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama

    from lorakit import LoraConfig, inject
    from lorakit.adapters.parts import lora_layers

    def model():
        m = AutoModelForCausalLM.from_pretrained(llama_dir).cuda().eval()
        inject(m, LoraConfig(r=4, targets=["gate_proj", "down_proj", "q_proj"], dropout=0.0, init="random"))
        return m

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", modeling_llama.apply_rotary_pos_emb)
    plain, patched = model(), model()
    patched.load_state_dict(plain.state_dict())
    kernels.apply(kernels.choose("liger", CUDA, patched.config), patched)
    assert patched.model.layers[0].mlp._get_name() == "LigerSwiGLUMLP"
    ids = torch.randint(0, patched.config.vocab_size, (2, 24), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = patched(input_ids=ids).logits.float()
        for layer in (lora for block in patched.model.layers for lora in lora_layers(block.mlp).values()):
            for b in layer.lora_B.values():
                torch.nn.init.normal_(b, std=0.5)
        changed = patched(input_ids=ids).logits.float()
        monkeypatch.undo()  # the plain model with transformers' own RoPE
        want = plain(input_ids=ids).logits.float()
    torch.testing.assert_close(got, want, atol=3e-2 * want.abs().max().item(), rtol=0)
    assert not torch.allclose(changed, got, atol=1e-2)  # the MLP's LoRA layers run inside Liger's SwiGLU
