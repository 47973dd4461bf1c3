"""Adapter files: round trips, named adapters, bad files, atomic saves (PEFT interop: test_interop.py)."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import minilm_classifier, tiny_gpt2, tiny_llama

import lorakit
import lorakit.adapters.attach
import lorakit.adapters.files
from lorakit.nn.layers import LoraLayer

IDS = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102, 0], [101, 2023, 2003, 2307, 102, 0, 0, 0]])
MASK = (IDS != 0).long()


def _run(model):
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


def _randomize(model):
    # Trained-looking adapters: every trainable tensor gets random values, so outputs differ from the base.
    torch.manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.05)


def test_save_load_round_trip_and_named_adapters(tmp_path):
    model = lorakit.inject(minilm_classifier(), lorakit.LoraConfig(r=4, targets=["query", "value"],
                                                                   modules_to_save=["classifier"]), name="news")
    _randomize(model)
    news = _run(model)
    lorakit.save_adapter(model, tmp_path / "news", name="news")
    fresh = minilm_classifier()
    base = _run(fresh)
    lorakit.load_adapter(fresh, tmp_path / "news", name="news")
    lorakit.load_adapter(fresh, tmp_path / "news", name="news2")
    with pytest.raises(ValueError, match="'copy' must be a Python identifier that is not a dict method"):
        lorakit.load_adapter(fresh, tmp_path / "news", name="copy")
    assert lorakit.active_adapters(fresh) == ("news",)
    assert torch.allclose(_run(fresh), news, atol=1e-6)
    with lorakit.disable_adapters(fresh):
        assert torch.allclose(_run(fresh), base, atol=1e-6)
    state = lorakit.adapter_state_dict(model, "news")
    reloaded = load_file(tmp_path / "news" / "adapter_model.safetensors")
    assert state.keys() == reloaded.keys() and all(torch.equal(state[k], reloaded[k]) for k in state)
    assert "base_model.model.classifier.weight" in reloaded
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in reloaded
    # saving while merged writes the same adapter
    lorakit.merge(model)
    lorakit.save_adapter(model, tmp_path / "merged", name="news")
    merged = load_file(tmp_path / "merged" / "adapter_model.safetensors")
    assert all(torch.equal(merged[k], reloaded[k]) for k in reloaded)
    size = (tmp_path / "news" / "adapter_model.safetensors").stat().st_size
    assert size < 200_000  # ~36k LoRA + head parameters, not the 22M-parameter model


def test_trainable_load_resumes_training(tmp_path):
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, targets=["q_proj"]))
    lorakit.save_adapter(model, tmp_path)
    again = lorakit.load_adapter(tiny_llama(), tmp_path, trainable=True)
    assert {n for n, p in again.named_parameters() if p.requires_grad} == {
        f"model.layers.{i}.self_attn.q_proj.lora_{ab}.default" for i in range(2) for ab in "AB"}


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, {n: type(m) for n, m in model.named_modules()},
            dict(lorakit.configs(model)), lorakit.active_adapters(model))


def _unchanged(model, snap):
    state, types, configs, active = snap
    now = model.state_dict()
    return (now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
            and {n: type(m) for n, m in model.named_modules()} == types
            and lorakit.configs(model) == configs and lorakit.active_adapters(model) == active)


@pytest.fixture()
def saved_adapter(tmp_path):
    model = lorakit.inject(minilm_classifier(), lorakit.LoraConfig(r=4, targets=["query", "value"],
                                                                   modules_to_save=["classifier"]))
    _randomize(model)
    return lorakit.save_adapter(model, tmp_path / "adapter")


def _target(with_adapter=True):
    model = minilm_classifier()
    if with_adapter:
        lorakit.inject(model, lorakit.LoraConfig(r=2, targets=["key"]), name="other")
    return model


def test_bad_files_give_clear_errors_and_change_nothing(saved_adapter, tmp_path):
    weights = saved_adapter / "adapter_model.safetensors"
    config = saved_adapter / "adapter_config.json"
    model = _target()
    snap = _snapshot(model)

    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        lorakit.load_adapter(model, tmp_path / "nowhere")
    bad = tmp_path / "truncated"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(config.read_text())
    (bad / "adapter_model.safetensors").write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        lorakit.load_adapter(model, bad)
    (bad / "adapter_model.safetensors").write_bytes(b"PK\x03\x04 this is a zip/pickle, not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        lorakit.load_adapter(model, bad)
    (bad / "adapter_model.safetensors").unlink()
    (bad / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="does not load pickle files"):
        lorakit.load_adapter(model, bad)
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        lorakit.load_adapter(model, bad)
    assert _unchanged(model, snap)


def test_mismatched_adapters_name_module_and_shapes(saved_adapter, tmp_path):
    model = _target()
    snap = _snapshot(model)
    # a tensor of the wrong shape
    tensors = load_file(saved_adapter / "adapter_model.safetensors")
    key = "base_model.model.bert.encoder.layer.3.attention.self.value.lora_B.weight"
    tensors[key] = torch.zeros(100, 4)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "adapter_config.json").write_text((saved_adapter / "adapter_config.json").read_text())
    save_file(tensors, wrong / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"layer\.3\.attention\.self\.value\.lora_B\.weight has shape \(100, 4\), "
                                         r"this model expects \(384, 4\)"):
        lorakit.load_adapter(model, wrong)
    # a tensor missing
    del tensors[key]
    save_file(tensors, wrong / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors \['bert\.encoder\.layer\.3\.attention\.self\.value\.lora_B"):
        lorakit.load_adapter(model, wrong)
    # an adapter made for another architecture
    with pytest.raises(ValueError, match=r"does not fit this model: target modules \['query', 'value'\] match no module"):
        lorakit.load_adapter(tiny_gpt2(), saved_adapter)
    # the name is taken
    with pytest.raises(ValueError, match="adapter 'other' already exists"):
        lorakit.load_adapter(model, saved_adapter, name="other")
    assert _unchanged(model, snap)


class _FailingTargets(dict):
    """The adapter's live tensors, failing at the n-th lookup: a load interrupted half-way through copying."""

    def __init__(self, tensors, fail_at: int, seen: list):
        super().__init__(tensors)
        self.fail_at, self.seen = fail_at, seen

    def __getitem__(self, key):
        self.seen.append(key)
        if len(self.seen) == self.fail_at:
            raise RuntimeError("disk went away")
        return super().__getitem__(key)


def _fail_copying_at(monkeypatch, n: int) -> list:
    seen, real = [], lorakit.adapters.files.adapter_tensors
    monkeypatch.setattr(lorakit.adapters.attach, "adapter_tensors", lambda root, name: _FailingTargets(real(root, name), n, seen))
    return seen


def test_failure_while_applying_rolls_back(saved_adapter, monkeypatch):
    model = _target()
    snap = _snapshot(model)
    _fail_copying_at(monkeypatch, 5)
    with pytest.raises(RuntimeError, match="disk went away"):
        lorakit.load_adapter(model, saved_adapter)
    assert _unchanged(model, snap)
    assert sorted(n for n, m in model.named_modules() if isinstance(m, LoraLayer))[0].endswith("key")


def test_unknown_config_keys_are_kept_and_warned(saved_adapter, tmp_path):
    data = json.loads((saved_adapter / "adapter_config.json").read_text())
    data["some_future_option"] = {"depth": 3}
    data["another_future_flag"] = None
    (saved_adapter / "adapter_config.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=r"kept as they are: \['some_future_option'\]"):
        model = lorakit.load_adapter(minilm_classifier(), saved_adapter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lorakit.save_adapter(model, tmp_path / "again")
    again = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert again["some_future_option"] == {"depth": 3} and "another_future_flag" in again
    data["layer_replication"] = [[0, 4]]
    (saved_adapter / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="layer_replication=.*does not support"):
        lorakit.read_adapter_config(saved_adapter)


def test_save_is_atomic(tmp_path, monkeypatch):
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, targets=["q_proj"]))
    out = lorakit.save_adapter(model, tmp_path / "a")
    before = (out / "adapter_model.safetensors").read_bytes()
    _randomize(model)
    def broken(*args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(lorakit.adapters.files, "save_file", broken)
    with pytest.raises(OSError):
        lorakit.save_adapter(model, out)
    assert (out / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_failed_load_restores_overwritten_biases(tmp_path, monkeypatch):
    model = _target()
    adapter = lorakit.inject(minilm_classifier(), lorakit.LoraConfig(r=2, targets=["query"], bias="all"))
    _randomize(adapter)
    lorakit.save_adapter(adapter, tmp_path / "bert")
    snap = _snapshot(model)
    keys = list(load_file(tmp_path / "bert" / "adapter_model.safetensors"))
    seen = _fail_copying_at(monkeypatch, len(keys))  # at the very last tensor: most biases were overwritten by then
    with pytest.raises(RuntimeError, match="disk went away"):
        lorakit.load_adapter(model, tmp_path / "bert")
    assert sum(k.endswith(".bias") for k in seen[:-1]) > 3 and _unchanged(model, snap)
