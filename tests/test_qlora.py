"""QLoRA: LoRA on a base whose every frozen Linear is NF4 (the quantizer itself is tested in test_quant.py)."""

import logging
import warnings

import pytest
import torch
from tiny_models import minilm_classifier, tiny_gpt2, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit.nn.layers import LoraLayer, SavedModule
from lorakit.nn.nf4 import NF4Linear, dequantize_nf4, quantize_nf4


def _ids():
    torch.manual_seed(3)
    return torch.randint(0, 128, (2, 10))


def _dense_linears(model):
    return {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def _dequantized_base(make):
    """The base model with every Linear but the head holding dequantize(quantize(W)): what QLoRA computes with."""
    model = make()
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and m is not model.get_output_embeddings():
                m.weight.copy_(dequantize_nf4(quantize_nf4(m.weight)))
    return model


def test_every_frozen_linear_is_nf4_and_nothing_else():
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, targets=["q_proj", "v_proj"], quantize="nf4"))
    linears = _dense_linears(tiny_llama()) - {"lm_head"}
    assert len(linears) == 2 * 7  # q, k, v, o, gate, up, down per block
    for name in linears:
        module = model.get_submodule(name)
        held = module.kind.name if isinstance(module, LoraLayer) else type(module).__name__
        assert held == "nf4" if name.endswith(("q_proj", "v_proj")) else held == "NF4Linear", name
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight.dtype == torch.float32
    assert isinstance(model.model.embed_tokens, nn.Embedding)
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert _dense_linears(model) == {"lm_head"}
    classifier = lorakit.inject(minilm_classifier(), lorakit.LoraConfig(r=2, targets=["query"], quantize="nf4",
                                                                        modules_to_save=["classifier"]))
    assert isinstance(classifier.classifier, SavedModule)
    assert isinstance(classifier.classifier.modules_to_save["default"], nn.Linear)  # the head keeps its dtype
    assert isinstance(classifier.bert.pooler.dense, NF4Linear)  # the pooler is part of the frozen base


def test_qlora_on_llama_trains_saves_loads_and_merges(tmp_path, caplog, device):
    ids = _ids().to(device)
    model = lorakit.inject(tiny_llama().to(device), lorakit.LoraConfig(r=4, targets=["q_proj", "v_proj"], quantize="nf4"))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits,
                              _dequantized_base(tiny_llama).to(device)(input_ids=ids).logits,
                              atol=1e-5)  # B = 0: exactly the dequantized base
    q = model.model.layers[0].self_attn.q_proj
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=ids, labels=ids).loss.backward()
    assert q.lora_B["default"].grad.abs().sum() > 0  # B = 0 at init, so only B has a gradient at step 0
    opt.step()
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    lorakit.save_adapter(model, tmp_path)
    assert lorakit.read_adapter_config(tmp_path).quantize == "nf4"
    again = lorakit.load_adapter(tiny_llama().to(device), tmp_path)  # quantizes the same way: same outputs
    assert isinstance(again.model.layers[0].mlp.up_proj, NF4Linear)
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids).logits, trained, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import peft

        theirs = peft.PeftModel.from_pretrained(_dequantized_base(tiny_llama).to(device), tmp_path).eval()
        with torch.no_grad():
            assert torch.allclose(theirs(input_ids=ids).logits, trained, atol=1e-5)
    with caplog.at_level(logging.INFO, logger="lorakit"), torch.no_grad():
        lorakit.merge(model)
        assert "merged adapter 'default' into NF4 layer 'model.layers.0.self_attn.q_proj'" in caplog.text
        assert q.kind.name == "linear" and q.weight.dtype == torch.float32
        assert torch.allclose(model(input_ids=ids).logits, trained, atol=1e-4)
        plain = lorakit.unload(model)
        assert not any(isinstance(m, (LoraLayer, NF4Linear)) for m in plain.modules())
        assert torch.allclose(plain(input_ids=ids).logits, trained, atol=1e-4)


def test_qlora_gpt2_conv1d_dora_and_embedding_lora():
    ids = _ids()
    model = lorakit.inject(tiny_gpt2(), lorakit.LoraConfig(r=2, targets=["c_attn", "wte"], quantize="nf4"))
    assert model.transformer.wte.kind.name == "embedding"  # embeddings are adapted, never quantized
    ref = _dequantized_gpt2()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5)
    unloaded = lorakit.unload(model, merge=False)  # a plain model again, holding the dequantized weights
    assert type(unloaded.transformer.h[0].attn.c_attn) is Conv1D
    assert unloaded.transformer.h[0].attn.c_attn.weight.shape == (32, 96)  # GPT-2's (in, out) layout is back
    dora = lorakit.inject(tiny_gpt2(), lorakit.LoraConfig(r=2, targets=["c_attn"], quantize="nf4", use_dora=True))
    with torch.no_grad():
        assert torch.allclose(dora(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5)  # m = ‖W‖ at init


def _dequantized_gpt2():
    model = tiny_gpt2()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Conv1D):
                m.weight.copy_(dequantize_nf4(quantize_nf4(m.weight.t())).t())
    return model


def test_bad_quantize_requests_change_nothing():
    with pytest.raises(ValueError, match="PiSSA on a quantized base is not supported"):
        lorakit.LoraConfig(init="pissa", quantize="nf4")
    with pytest.raises(ValueError, match="quantize must be one of"):
        lorakit.LoraConfig(quantize="int3")
    embeddings_only = nn.Sequential(nn.Embedding(10, 4))
    with pytest.raises(ValueError, match="Sequential has no Linear or Conv1D layer to quantize"):
        lorakit.inject(embeddings_only, lorakit.LoraConfig(r=2, targets=["0"], quantize="nf4"))
    assert type(embeddings_only[0]) is nn.Embedding and not lorakit.configs(embeddings_only)
    merged = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, targets=["q_proj"], init="random"))
    lorakit.merge(merged)
    before = {k: v.clone() for k, v in merged.state_dict().items()}
    with pytest.raises(ValueError, match="holds merged or PiSSA adapters"):
        lorakit.inject(merged, lorakit.LoraConfig(r=2, targets=["v_proj"], quantize="nf4"), name="second")
    assert merged.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in merged.state_dict().items())


def _qlora_step(monkeypatch, checkpointing: bool | None = None, reentrant: bool = False, after=None):
    """(dequantizations, adapter gradients) of one forward and backward of a tiny QLoRA Llama (14 NF4 weights):
    with checkpointing on (True), turned on then off again (False) or never (None); `after` runs before the step."""
    from lorakit.nn import nf4

    torch.manual_seed(0)
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, targets=["q_proj", "v_proj"], quantize="nf4",
                                                            init="random"))
    model.train()
    if checkpointing is not None:
        lorakit.enable_gradient_checkpointing(model, reentrant=reentrant)
    if checkpointing is False:
        model.gradient_checkpointing_disable()
    if after:
        after(model)
    assert sum(isinstance(m, nf4.NF4Weight) for m in model.modules()) == 14
    calls, real = [], nf4.dequantize_nf4
    monkeypatch.setattr(nf4, "dequantize_nf4", lambda q, dtype=None: calls.append(q) or real(q, dtype))
    model(input_ids=_ids(), labels=_ids()).loss.backward()
    monkeypatch.setattr(nf4, "dequantize_nf4", real)
    return len(calls), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_blocks_dequantize_twice_a_step_with_the_same_gradients(monkeypatch, reentrant):
    # Each weight dequantized by the forward and the recompute only, which keeps it for the backward (not
    # dequantized a third time there); the gradients are those of the model without checkpointing.
    calls, checkpointed = _qlora_step(monkeypatch, True, reentrant)
    plain_calls, plain = _qlora_step(monkeypatch)
    assert calls == 2 * 14
    assert checkpointed.keys() == plain.keys() and all(torch.allclose(checkpointed[n], plain[n]) for n in plain)
    assert all(g.abs().sum() > 0 for g in plain.values())


@pytest.mark.parametrize("case", ["checkpointing turned off", "eval mode with grad"])
def test_nf4_weights_are_kept_for_backward_only_while_their_block_checkpoints(monkeypatch, case):
    # Kept outside a recompute, every weight of the forward would live until the backward; rebuilt there instead,
    # each weight is dequantized by the forward and again by the backward: 2 each (1 each if kept).
    if case == "checkpointing turned off":
        calls, _ = _qlora_step(monkeypatch, False)
    else:  # Hugging Face blocks checkpoint only in training mode
        calls, _ = _qlora_step(monkeypatch, True, after=lambda model: model.eval())
    assert calls == 2 * 14
