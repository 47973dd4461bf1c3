"""`--compile` (runtime/compiling.py): torch.compile of each transformer block, in place, after the adapters and
checkpointing. Trained with and without it, a tiny Llama ends with the same losses and adapter (fp32, 1e-5) and the
same keys everywhere; a compiler that fails is named, never silently skipped."""

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import small_mlp, tiny_llama

import lorakit
from lorakit.adapters.inject import enable_gradient_checkpointing
from lorakit.errors import CompileError, ConfigError
from lorakit.runtime.compiling import compile_blocks
from lorakit.training.settings import TrainConfig
from lorakit.training.train import train

LOSS_TOL = 1e-5  # fp32: inductor's fused kernels sum in another order than eager code
# LoRA dropout is off where runs are compared: compiled code draws its masks from inductor's own generator, so a
# compiled run drops other elements than an eager one with the same seed.


def run(model_dir, data, out, **kw) -> tuple[dict, list[str]]:
    cfg = TrainConfig(model=str(model_dir), data=str(data), output=str(out), task="causal-lm", text_column="completion",
                      prompt_column="prompt", eval_data=str(data), batch_size=4, max_length=24, lr=2e-2, dropout=0.0,
                      max_steps=3, eval_every=3, save_every=2, save_total_limit=2, log_every=1, precision="fp32", **kw)
    said = []
    return train(cfg, progress=False, echo=said.append), said


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_with_compile_equals_without_in_fp32(llama_dir, qa_jsonl, tmp_path, checkpointing):
    on, said = run(llama_dir, qa_jsonl, tmp_path / "on", compile=True, gradient_checkpointing=checkpointing)
    off, _ = run(llama_dir, qa_jsonl, tmp_path / "off", compile=False, gradient_checkpointing=checkpointing)
    assert any("--compile: 2 LlamaDecoderLayer blocks" in line for line in said), said
    assert on["compiled"] and not off["compiled"]
    assert on["train_loss"] == pytest.approx(off["train_loss"], abs=LOSS_TOL)
    assert on["eval"]["loss"] == pytest.approx(off["eval"]["loss"], abs=LOSS_TOL)
    assert on["eval"]["loss"] < on["eval_before"]["loss"]  # it trained
    for file in ("adapter_model.safetensors", "checkpoints/step-2/trainable.safetensors"):
        a, b = load_file(tmp_path / "on" / file), load_file(tmp_path / "off" / file)
        assert list(a) == list(b) and not any("_orig_mod" in k for k in a)
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=LOSS_TOL, rtol=1e-4, msg=k)


def lora_llama(checkpointing: bool = False):
    model = tiny_llama().train()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj", "down_proj"]))
    if checkpointing:
        enable_gradient_checkpointing(model)
    return model


def loss_and_grads(model, ids, dtype=None):
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_blocks_keep_their_keys_and_match_eager_under_bf16_autocast(checkpointing):
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    eager, compiled = lora_llama(checkpointing), lora_llama(checkpointing)
    keys = list(compiled.state_dict())
    found = compile_blocks(compiled)
    assert [type(b).__name__ for b in found] == ["LlamaDecoderLayer"] * 2
    assert list(compiled.state_dict()) == keys and list(lorakit.adapter_state_dict(compiled)) == \
        list(lorakit.adapter_state_dict(eager))
    (la, ga), (lb, gb) = loss_and_grads(eager, ids, torch.bfloat16), loss_and_grads(compiled, ids, torch.bfloat16)
    torch.testing.assert_close(lb, la, atol=2e-2, rtol=1e-2)  # bf16: 8 bits of mantissa, summed in another order
    for name in ga:
        scale = ga[name].abs().max().item()
        torch.testing.assert_close(gb[name], ga[name], atol=3e-2 * scale + 1e-6, rtol=0, msg=name)


def test_a_compiler_that_fails_is_named_with_the_block():
    import torch._inductor.config as inductor

    torch._dynamo.reset()  # nothing compiled earlier in this process may be reused
    model = lora_llama()
    compile_blocks(model)
    ids = torch.randint(0, 128, (1, 8))
    # No C++ compiler, and no cached kernels to stand in for one (inductor's own patch: undone afterwards)
    with inductor.patch({"fx_graph_cache": False, "cpp.cxx": ("/nonexistent/c++",)}):
        with pytest.raises(CompileError, match=r"--compile: torch.compile of LlamaDecoderLayer failed: "
                                               r"InvalidCxxCompiler: .*nonexistent/c\+\+"):
            model(input_ids=ids, labels=ids)
    torch._dynamo.reset()


def test_a_model_without_blocks_is_refused():
    with pytest.raises(ConfigError, match="--compile: SmallMLP has no transformer blocks"):
        compile_blocks(small_mlp())


# ---- on a GPU (benchmarks/gpu.sh runs `pytest -k cuda`) ----

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("checkpointing", [False, True])
def test_cuda_training_with_compile_equals_without_in_fp32(llama_dir, qa_jsonl, tmp_path, checkpointing):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    on, _ = run(llama_dir, qa_jsonl, tmp_path / "on", compile=True, gradient_checkpointing=checkpointing)
    off, _ = run(llama_dir, qa_jsonl, tmp_path / "off", compile=False, gradient_checkpointing=checkpointing)
    assert on["device"].startswith("cuda") and on["compiled"]
    assert on["train_loss"] == pytest.approx(off["train_loss"], abs=LOSS_TOL)
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("on", "off"))
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=LOSS_TOL, rtol=1e-4, msg=k)
