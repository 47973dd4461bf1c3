"""QLoRA: LoRA on an NF4-quantized base (the quantizer: test_quant.py; PEFT on the dequantized base: test_interop.py)."""

import logging

import pytest
import torch

import lorakit
from tiny_models import tiny_gpt2, tiny_llama

def _ids():
    torch.manual_seed(3)
    return torch.randint(0, 128, (2, 10))


def test_qlora_on_llama_trains_saves_loads_and_merges(tmp_path, caplog):
    ids = _ids()
    base_logits = tiny_llama()(input_ids=ids).logits
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, targets=["q_proj", "v_proj"], quantize="nf4"))
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight is None and q.weight_nf4 is not None and q.base_layer.weight is None
    logits = model(input_ids=ids).logits
    assert (logits - base_logits).abs().max() < 0.1 * base_logits.abs().max()  # close: only the 4-bit error
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert q.lora_B["default"].grad.abs().sum() > 0  # B = 0 at init, so only B has a gradient at step 0
    opt.step()
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    lorakit.save_adapter(model, tmp_path)
    assert lorakit.read_adapter_config(tmp_path).quantize == "nf4"
    again = lorakit.load_adapter(tiny_llama(), tmp_path)  # quantizes the same way: same outputs
    assert again.model.layers[0].self_attn.q_proj.weight_nf4 is not None
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids).logits, trained, atol=1e-5)
    with caplog.at_level(logging.INFO, logger="lorakit"), torch.no_grad():
        lorakit.merge(model)
        assert "merged adapter 'default' into NF4 layer 'model.layers.0.self_attn.q_proj'" in caplog.text
        assert q.weight is not None and q.weight.dtype == torch.float32 and q.weight_nf4 is None
        assert torch.allclose(model(input_ids=ids).logits, trained, atol=1e-4)
        plain = lorakit.unload(model)
        assert torch.allclose(plain(input_ids=ids).logits, trained, atol=1e-4)


def test_qlora_gpt2_conv1d_and_bad_combinations():
    ids = _ids()
    model = lorakit.inject(tiny_gpt2(), lorakit.LoraConfig(r=2, targets=["c_attn"], quantize="nf4", use_dora=True))
    ref = tiny_gpt2()(input_ids=ids).logits
    with torch.no_grad():
        assert (model(input_ids=ids).logits - ref).abs().max() < 0.1 * ref.abs().max()
    unloaded = lorakit.unload(model, merge=False)  # a plain model again, holding the dequantized weights
    assert unloaded.transformer.h[0].attn.c_attn.weight.shape == (32, 96)
    with pytest.raises(ValueError, match="PiSSA on a quantized base is not supported"):
        lorakit.LoraConfig(init="pissa", quantize="nf4")
    with pytest.raises(ValueError, match="NF4 quantization supports Linear and Conv1D layers, not embedding"):
        lorakit.inject(tiny_gpt2(), lorakit.LoraConfig(targets=["wte"], quantize="nf4"))
    with pytest.raises(ValueError, match="quantize must be one of"):
        lorakit.LoraConfig(quantize="int3")
