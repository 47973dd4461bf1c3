"""The chunked loss (lorakit/chunked_loss.py) against the full computation: the same loss and gradients in fp32
(hidden states, head weight and bias, LoRA A and B through tiny Llama, GPT-2 and Gemma 2 models), ignored labels,
tied weights, soft-capped logits, packing, evaluation, and `lorakit train` with it on and off."""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tiny_models import tiny_gpt2, tiny_llama

from lorakit import LoraConfig, inject
from lorakit.data.packing import PackedCollator, pack_groups, pack_rows
from lorakit.errors import ConfigError
from lorakit.training.chunked_loss import ChunkedLoss, Logits, linear_cross_entropy, loss_model
from lorakit.training.evaluation import evaluate
from lorakit.training.settings import TrainConfig
from lorakit.training.tasks import CAUSAL_LM
from lorakit.training.train import train

FP32 = dict(atol=1e-6, rtol=1e-5)


def full_loss(h, w, b, t, logits: Logits = Logits()):
    """The reference: all logits at once, then cross-entropy (as transformers computes it)."""
    y = F.linear(h, w, b) * logits.scale
    if logits.cap is not None:
        y = logits.cap * torch.tanh(y / logits.cap)
    return F.cross_entropy(y.float(), t)


def grads_of(loss_fn, *tensors):
    loss = loss_fn()
    return [loss.detach()] + list(torch.autograd.grad(loss, [x for x in tensors if x is not None]))


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("logits", [Logits(), Logits(scale=0.5), Logits(scale=1.5, cap=2.0)])
def test_linear_cross_entropy_equals_the_full_computation_in_fp32(chunk, bias, logits):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(20, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    b = torch.randn(50, generator=g, requires_grad=True) if bias else None
    t = torch.randint(0, 50, (20,), generator=g)
    expected = grads_of(lambda: full_loss(h, w, b, t, logits), h, w, b)
    got = grads_of(lambda: linear_cross_entropy(h, w, b, t, chunk, logits), h, w, b)
    for e, x in zip(expected, got):
        torch.testing.assert_close(x, e, **FP32)


def test_frozen_head_gets_no_gradient_and_a_scaled_loss_scales_the_gradient():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(9, 8, generator=g, requires_grad=True)
    w = torch.randn(30, 8, generator=g)  # frozen: no gradient is made for it
    t = torch.randint(0, 30, (9,), generator=g)
    (3.0 * linear_cross_entropy(h, w, None, t, 4)).backward()
    expected = torch.autograd.grad(3.0 * full_loss(h, w, None, t), h)[0]
    torch.testing.assert_close(h.grad, expected, **FP32)
    assert w.grad is None


def test_no_target_gives_zero_loss_and_zero_gradients():
    h = torch.randn(0, 8, requires_grad=True)
    w = torch.randn(30, 8, requires_grad=True)
    loss = linear_cross_entropy(h, w, None, torch.zeros(0, dtype=torch.long), 4)
    loss.backward()
    assert loss.item() == 0.0 and w.grad.abs().sum() == 0


def lora_model(name: str, tied_head_trains: bool = False):
    """A tiny causal LM (eval mode: no dropout) with random LoRA A and B on its attention; with tied_head_trains
    the (tied) output head and input embeddings train too."""
    if name == "llama":
        model = tiny_llama()
        inject(model, LoraConfig(r=4, targets=["q_proj", "v_proj"], dropout=0.0, init="random"))
    elif name == "gpt2":
        model = tiny_gpt2()
        inject(model, LoraConfig(r=4, targets=["c_attn"], dropout=0.0, init="random"))
    else:
        from transformers import Gemma2Config, Gemma2ForCausalLM

        torch.manual_seed(0)
        model = Gemma2ForCausalLM(Gemma2Config(num_hidden_layers=2, hidden_size=32, intermediate_size=64, head_dim=8,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                               final_logit_softcapping=2.0)).eval()
        inject(model, LoraConfig(r=4, targets=["q_proj", "v_proj"], dropout=0.0, init="random"))
    if tied_head_trains:
        model.get_output_embeddings().weight.requires_grad_(True)
    return model


def batch_with_ignored_labels():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 128, (3, 12), generator=g)
    labels = ids.clone()
    labels[0, :7] = -100  # a prompt
    labels[1, 9:] = -100  # padding
    return {"input_ids": ids, "labels": labels}


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    inner = model.model if isinstance(model, ChunkedLoss) else model
    return loss.item(), {n: p.grad.clone() for n, p in inner.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name,tied", [("llama", False), ("gpt2", False), ("gpt2", True), ("gemma2", False)])
def test_model_loss_and_gradients_equal_the_models_own_in_fp32(name, tied):
    model = lora_model(name, tied)
    net, why = loss_model(model, chunk_tokens=5)
    assert why is None and isinstance(net, ChunkedLoss)
    batch = batch_with_ignored_labels()
    own_loss, own = loss_and_grads(model, batch)
    loss, got = loss_and_grads(net, batch)
    assert loss == pytest.approx(own_loss, abs=1e-6)
    assert own.keys() == got.keys() and any("lora_A" in k for k in got) and any("lora_B" in k for k in got)
    if tied:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
        assert any("wte" in k for k in got)
    for k in own:
        torch.testing.assert_close(got[k], own[k], **FP32, msg=k)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_bf16_autocast_is_as_close_to_fp32_as_the_models_own_bf16_loss(name):
    # bf16 tolerance: the loss within 1e-4 relative of the model's own bf16 loss; each gradient within 2^-5 of its
    # largest entry of the model's own bf16 gradient, and no farther from the fp32 gradient than twice the model's
    # own bf16 gradient is (both are about 1-2% of the largest entry here, rounding through bf16 layers).
    model = lora_model(name)
    net, _ = loss_model(model, chunk_tokens=5)
    batch = batch_with_ignored_labels()
    _, fp32 = loss_and_grads(model, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        own_loss, own = loss_and_grads(model, batch)
        loss, got = loss_and_grads(net, batch)
    assert loss == pytest.approx(own_loss, rel=1e-4)

    def error(a, b):
        return float((a - b).abs().max() / b.abs().max())

    for k in own:
        assert error(got[k], own[k]) <= 2 ** -5, k
        assert error(got[k], fp32[k]) <= 2 * error(own[k], fp32[k]) + 1e-3, k


def test_all_labels_ignored_gives_zero_loss_and_zero_gradients():
    model = lora_model("llama")
    net, _ = loss_model(model, chunk_tokens=5)
    batch = batch_with_ignored_labels()
    batch["labels"][:] = -100
    loss, got = loss_and_grads(net, batch)
    assert loss == 0.0 and got and all(g.abs().sum() == 0 for g in got.values())


def test_without_labels_it_is_the_models_own_forward():
    model = lora_model("gpt2")
    net, _ = loss_model(model, chunk_tokens=5)
    ids = batch_with_ignored_labels()["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(net(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)


def test_models_it_cannot_run_on_keep_their_own_loss_with_a_reason():
    plain = tiny_llama()
    assert loss_model(plain, 0) == (plain, None)  # 0: off
    adapted = tiny_llama()
    inject(adapted, LoraConfig(r=4, targets=["lm_head"]))
    net, why = loss_model(adapted, 5)
    assert net is adapted and "LoraLayer" in why and "not a plain torch.nn.Linear" in why

    from transformers import LlamaForCausalLM

    class Doubled(LlamaForCausalLM):  # a forward that changes the logits in a way lorakit cannot know
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    odd = Doubled(tiny_llama().config)
    net, why = loss_model(odd, 5)
    assert net is odd and "not its head's output" in why
    net, why = loss_model(tiny_llama(), 5, sharded=True)
    assert "FSDP" in why


def test_packed_rows_give_the_unpacked_loss():
    model = lora_model("llama")
    net, _ = loss_model(model, chunk_tokens=4)
    g = torch.Generator().manual_seed(3)
    examples = []
    for n in (5, 9, 4, 12, 7, 3):
        ids = torch.randint(1, 128, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    with torch.no_grad():
        unpacked = sum(net(**{k: torch.tensor([e[k]]) for k in e}).loss.item() * (len(e["labels"]) - 2)
                       for e in examples)
        groups = pack_groups([len(e["input_ids"]) for e in examples], 20)
        columns = pack_rows({k: [e[k] for e in examples] for k in ("input_ids", "labels")}, groups)
        batch = PackedCollator(pad_token_id=0)([dict(zip(columns, v)) for v in zip(*columns.values())])
        count = int((batch["labels"][:, 1:] != -100).sum())
        packed = net(**batch).loss.item() * count
    assert len(groups) < len(examples) and count == sum(len(e["labels"]) - 2 for e in examples)
    assert packed == pytest.approx(unpacked, rel=1e-5)


def test_evaluation_through_it_equals_the_models_own():
    model = lora_model("gpt2")
    net, _ = loss_model(model, chunk_tokens=3)
    rows = [{"input_ids": r.tolist(), "labels": r.tolist()} for r in batch_with_ignored_labels()["input_ids"]]

    def collate(chunk):
        return {k: torch.tensor([r[k] for r in chunk]) for k in ("input_ids", "labels")}

    own = evaluate(model, rows, collate, CAUSAL_LM, batch_size=2)
    got = evaluate(net, rows, collate, CAUSAL_LM, batch_size=2)
    assert got["loss"] == pytest.approx(own["loss"], abs=1e-6) and got["perplexity"] == math.exp(got["loss"])


def run(model_dir, data, out, chunk: int) -> dict:
    cfg = TrainConfig(model=str(model_dir), data=str(data), output=str(out), task="causal-lm", text_column="completion",
                      prompt_column="prompt", eval_data=str(data), batch_size=4, max_length=24, lr=2e-2, dropout=0.0,
                      max_steps=3, eval_every=3, save_every=100, log_every=1, precision="fp32", loss_chunk_tokens=chunk)
    said = []
    metrics = train(cfg, progress=False, echo=said.append)
    assert not any("not chunked" in line for line in said), said  # the chunked loss ran where asked for
    return metrics


@pytest.mark.parametrize("model_fixture", ["gpt2_dir", "llama_dir"])
def test_training_with_it_on_equals_off_in_fp32(model_fixture, qa_jsonl, tmp_path, request):
    model_dir = request.getfixturevalue(model_fixture)
    on = run(model_dir, qa_jsonl, tmp_path / "on", chunk=7)
    off = run(model_dir, qa_jsonl, tmp_path / "off", chunk=0)
    assert on["train_loss"] == pytest.approx(off["train_loss"], abs=1e-5)
    assert on["eval"]["loss"] == pytest.approx(off["eval"]["loss"], abs=1e-5)
    assert on["eval"]["loss"] < on["eval_before"]["loss"]  # it trained
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("on", "off"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)


def test_negative_chunk_is_refused_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="loss_chunk_tokens must be >= 0"):
        train(TrainConfig(data=str(tmp_path / "none.csv"), task="causal-lm", loss_chunk_tokens=-1), progress=False)
