"""Training paths the speed work relies on: gradient checkpointing with a frozen base, torch.compile, Trainer-free loops."""

import copy

import pytest
import torch
from tiny_models import minilm_classifier
from torch import nn

import lorakit

IDS = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102], [101, 2023, 2003, 2307, 102, 0, 0]])
MASK = (IDS != 0).long()


def _lora_grads(model):
    model.train()
    torch.manual_seed(0)
    loss = model(input_ids=IDS, attention_mask=MASK, labels=torch.tensor([0, 3])).loss
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_with_frozen_base(use_reentrant):
    model = lorakit.inject(minilm_classifier(), lorakit.LoraConfig(r=4, targets=["query", "value"], init="random",
                                                                   modules_to_save=["classifier"]))
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    expected = _lora_grads(copy.deepcopy(model))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    lorakit.enable_input_grads(model)  # the frozen embeddings would otherwise cut the graph under reentrant checkpointing
    grads = _lora_grads(model)
    assert grads.keys() == expected.keys()
    for name, g in grads.items():
        assert g.abs().sum() > 0, name
        assert torch.allclose(g, expected[name], atol=1e-5), name


def test_torch_compile_sees_no_graph_break_in_lorakit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    lorakit.inject(model, lorakit.LoraConfig(r=4, targets=["0", "2"], dropout=0.1, init="random"))
    x = torch.randn(4, 32)
    for mode in (model.train, model.eval):
        mode()
        explanation = torch._dynamo.explain(model)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
