"""Adapter files between lorakit and Hugging Face PEFT, both ways, as one table: model kind × variant × adapter name.

lorakit → PEFT: lorakit injects, the adapters get random values (B ≠ 0, heads changed), lorakit saves, and
`peft.PeftModel.from_pretrained` must give the same outputs on the base model. PEFT → lorakit: the same with the
roles swapped; PEFT is the oracle both ways. A "second" cell puts the adapter under test beside a plain LoRA
"default" one, on both sides, and compares with "second" active. "nf4": lorakit holds every Linear but the head in NF4;
PEFT runs on the base whose weights hold those dequantized values. Cells that one side cannot do must raise
the error in CANNOT.
"""

import contextlib
import copy
import json
import warnings
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import small_cnn, small_mlp, tiny_bert, tiny_gpt2, tiny_llama_classifier
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit.nn.layers import LoraLayer
from lorakit.nn.nf4 import NF4Linear, dequantize_nf4

peft = pytest.importorskip("peft")

IDS = torch.tensor([[1, 17, 42, 99, 7, 3, 0, 0], [1, 5, 64, 2, 0, 0, 0, 0]])
MASK = (IDS != 0).long()
FEATURES = torch.randn(4, 16, generator=torch.Generator().manual_seed(5))
IMAGES = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))


def _text(model):
    return model(input_ids=IDS, attention_mask=MASK)[0]  # logits (start_logits for question answering)


def _features(model):
    return model(FEATURES)


def _images(model):
    return model(IMAGES)


@dataclass
class Kind:
    make: Callable  # the base model, the same each call
    run: Callable  # model -> output tensor
    ours: dict  # lorakit.LoraConfig arguments (PEFT gets the same, see _peft_config)
    task_type: str | None  # what a PEFT user sets, and what lorakit writes to adapter_config.json
    saved: set  # the modules the file holds in full (modules_to_save)


QV = dict(targets=["query", "value"])
KINDS = {
    # A classifier's head trains and is saved by default, as PEFT's SEQ_CLS does; modules_to_save=[] opts out.
    "seq-cls": Kind(tiny_bert, _text, QV, "SEQ_CLS", {"classifier"}),
    "seq-cls-no-head": Kind(tiny_bert, _text, {**QV, "modules_to_save": []}, None, set()),
    "causal-lm": Kind(tiny_gpt2, _text, dict(targets=["c_attn"]), "CAUSAL_LM", set()),
    "plain-linear": Kind(small_mlp, _features, dict(targets=["fc1", "fc2"], modules_to_save=["head"]), None, {"head"}),
    "plain-conv2d": Kind(small_cnn, _images, dict(targets=["conv1", "conv2"], modules_to_save=["head"]), None, {"head"}),
}
PATTERNS = dict(use_rslora=True, rank_pattern={"word_embeddings": 2}, alpha_pattern={r"layer\.1\..*": 3})
EXTRA_KINDS = {  # other task heads and config features: plain LoRA, adapter "default"
    "seq-cls-score": Kind(tiny_llama_classifier, _text, dict(targets=["q_proj", "v_proj"]), "SEQ_CLS", {"score"}),
    "token-cls": Kind(lambda: tiny_bert("TokenClassification"), _text, QV, "TOKEN_CLS", {"classifier"}),
    "question-answering": Kind(lambda: tiny_bert("QuestionAnswering", num_labels=2), _text, QV, "QUESTION_ANS",
                               {"qa_outputs"}),
    # LoRA on the head itself: nothing is saved in full, so the file names no task (PEFT's SEQ_CLS would save it)
    "seq-cls-lora-on-head": Kind(tiny_bert, _text, dict(targets=["query", "classifier"], rank_pattern={"classifier": 2}),
                                 None, set()),
    "embedding-patterns": Kind(tiny_bert, _text, dict(targets=["query", "word_embeddings"], **PATTERNS), "SEQ_CLS",
                               {"classifier"}),
    "bias-lora-only": Kind(tiny_gpt2, _text, dict(targets=["c_attn"], bias="lora_only"), "CAUSAL_LM", set()),
    "bias-all": Kind(tiny_gpt2, _text, dict(targets=["c_attn"], bias="all"), "CAUSAL_LM", set()),
}
VARIANTS = {  # variant: (lorakit.LoraConfig arguments, peft.LoraConfig arguments)
    "lora": ({}, {}),
    "rslora": ({"use_rslora": True}, {"use_rslora": True}),
    "dora": ({"use_dora": True}, {"use_dora": True}),
    "pissa": ({"init": "pissa"}, {"init_lora_weights": "pissa"}),
    "nf4": ({"quantize": "nf4"}, {}),
    "lora-bias": ({"lora_bias": True}, {"lora_bias": True}),  # B's bias, randomized like every trained tensor
}
CELLS = [(k, v, n) for k in KINDS for v in VARIANTS for n in ("default", "second")] + [
    (k, "lora", "default") for k in EXTRA_KINDS]
CANNOT = {  # (direction, kind, variant): the error the cell raises
    ("to_peft", "plain-conv2d", "dora"): "DoRA supports Linear and Conv1D layers, not conv2d",
    # PEFT has DoRA for Conv2d (magnitude shaped (1, d_out, 1, 1)); lorakit refuses the file, saying why
    ("from_peft", "plain-conv2d", "dora"): r"does not fit this model: DoRA supports Linear and Conv1D layers, not "
                                           r"conv2d \('conv1'\)",
    ("to_peft", "plain-conv2d", "pissa"): "PiSSA supports Linear and Conv1D layers, not conv2d",
    ("from_peft", "plain-conv2d", "pissa"): "Unknown initialization init_lora_weights='pissa'",  # PEFT has none
    ("to_peft", "plain-conv2d", "nf4"): "SmallCNN has no Linear or Conv1D layer to quantize",  # its Linear head is saved
    ("from_peft", "plain-conv2d", "nf4"): "SmallCNN has no Linear or Conv1D layer to quantize",
    # PEFT's PiSSA conversion (LoraModel.subtract_mutated_init) keeps only lora_A/lora_B: the trained head is lost
    # (PEFT cannot load that file either), and lorakit says what is missing.
    ("from_peft", "seq-cls", "pissa"): r"missing tensors \['classifier\.bias', 'classifier\.weight'\]",
    ("from_peft", "plain-linear", "pissa"): r"missing tensors \['head\.bias', 'head\.weight'\]",
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: handing them between threads costs more than the arithmetic
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's advice (fan_in_fan_out, unknown config keys, ...)
        yield


def _kind(kind):
    return KINDS.get(kind) or EXTRA_KINDS[kind]


def _raises(message):
    return pytest.raises(ValueError, match=message) if message else contextlib.nullcontext()


def _randomized(model, seed):
    # Trained-looking values: noise on every trainable tensor, so that a broken load differs from a good one.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    return model


def _dequantized(base, nf4_model):
    # `base` with each weight that `nf4_model` holds in NF4 (every Linear but the head) replaced by its dequantized
    # values.
    with torch.no_grad():
        for path, m in nf4_model.named_modules():
            if isinstance(m, NF4Linear) or (isinstance(m, LoraLayer) and m.kind.quantized):
                w = dequantize_nf4(m.weight_nf4)  # (d_out, d_in); Conv1D stores the transpose
                target = base.get_submodule(path)
                target.weight.copy_(w.t() if isinstance(target, Conv1D) else w)
    return base


def _assert_same(k, model, expected):
    with torch.no_grad():
        assert torch.allclose(k.run(model.eval()), expected, atol=1e-5)
        assert not torch.allclose(k.run(k.make()), expected, atol=1e-3)  # the adapter matters


def _check_file(k, path):
    config = json.loads((path / "adapter_config.json").read_text())
    tensors = load_file(path / "adapter_model.safetensors")
    assert config["task_type"] == k.task_type
    assert {key.split(".")[2] for key in tensors if ".lora_" not in key and "bias" not in key} == k.saved


@pytest.mark.parametrize("kind, variant, name", CELLS)
def test_lorakit_file_loads_in_peft(kind, variant, name, tmp_path):
    k = _kind(kind)
    with _raises(CANNOT.get(("to_peft", kind, variant))):
        ours = k.make()
        if name != "default":
            _randomized(lorakit.inject(ours, lorakit.LoraConfig(r=4, alpha=8, **k.ours)), seed=1)
        config = lorakit.LoraConfig(r=4, alpha=8, **k.ours, **VARIANTS[variant][0])
        _randomized(lorakit.inject(ours, config, name=name), seed=2)
        with torch.no_grad():
            expected = k.run(ours)
        for n in lorakit.configs(ours):
            lorakit.save_adapter(ours, tmp_path / n, name=n)
        _check_file(k, tmp_path / name)
        base = _dequantized(k.make(), ours) if variant == "nf4" else k.make()
        theirs = peft.PeftModel.from_pretrained(base, tmp_path / "default")
        if name != "default":
            theirs.load_adapter(tmp_path / name, adapter_name=name)
            theirs.set_adapter(name)
        _assert_same(k, theirs, expected)


def _peft_config(k, variant):
    ours = copy.deepcopy(k.ours)  # PEFT extends modules_to_save in place
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=ours.pop("targets"), task_type=k.task_type,
                           fan_in_fan_out=k.make is tiny_gpt2, **ours, **VARIANTS[variant][1])


def _peft_model(k, base, variant, name):
    # PEFT's side: adapter `name` (beside a plain "default" one when named), randomized, active.
    if name == "default":
        return peft.get_peft_model(base, _peft_config(k, variant))
    theirs = _randomized(peft.get_peft_model(base, _peft_config(k, "lora")), seed=1)
    theirs.add_adapter(name, _peft_config(k, variant))
    theirs.set_adapter(name)
    return theirs


def _pissa_snapshot(theirs, name, tmp_path):
    # PEFT's recipe: save the PiSSA adapter before training, to convert the trained one against it later.
    theirs.save_pretrained(tmp_path / "snapshot", selected_adapters=[name])
    folder = tmp_path / "snapshot" / name if name != "default" else tmp_path / "snapshot"
    return str(folder.rename(tmp_path / "pissa_init"))  # PEFT loads it under the folder's name: not `name`


def _save_converted(k, theirs, name, out, initial):
    # The unconverted file only fits PEFT's residual model, and lorakit refuses it; the converted one is plain LoRA.
    theirs.save_pretrained(out / "unconverted", selected_adapters=[name])
    with pytest.raises(ValueError, match="PiSSA adapter saved without conversion"):
        lorakit.load_adapter(k.make(), out / "unconverted" / (name if name != "default" else ""))
    theirs.save_pretrained(out / "peft", selected_adapters=[a for a in theirs.peft_config if a != name])
    theirs.save_pretrained(out / "peft", selected_adapters=[name], path_initial_model_for_weight_conversion=initial)


@pytest.mark.parametrize("kind, variant, name", CELLS)
def test_peft_file_loads_in_lorakit(kind, variant, name, tmp_path):
    k = _kind(kind)
    with _raises(CANNOT.get(("from_peft", kind, variant))):
        ours = k.make()
        if variant == "nf4":  # a lorakit QLoRA model; its adapter "qlora" stays inactive
            lorakit.inject(ours, lorakit.LoraConfig(**k.ours, quantize="nf4"), name="qlora")
        base = _dequantized(k.make(), ours) if variant == "nf4" else k.make()
        theirs = _peft_model(k, base, variant, name)
        initial = _pissa_snapshot(theirs, name, tmp_path) if variant == "pissa" else None
        with torch.no_grad():
            expected = k.run(_randomized(theirs, seed=2).eval())
        if initial:
            _save_converted(k, theirs, name, tmp_path, initial)
        else:
            theirs.save_pretrained(tmp_path / "peft")
        lorakit.load_adapter(ours, tmp_path / "peft")
        if name != "default":
            lorakit.load_adapter(ours, tmp_path / "peft" / name, name=name)
        lorakit.set_adapter(ours, name)
        _assert_same(k, ours, expected)
