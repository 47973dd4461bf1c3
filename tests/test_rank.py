"""lorakit.rank: analyze, extract, resize and combine, checked against quantities built by hand (known singular
values, orthogonal subspaces, a known rank-5 change) and against PEFT as the oracle for files and for
add_weighted_adapter."""

import json

import numpy as np
import pytest
import torch
from tiny_models import tiny_bert
from typer.testing import CliRunner

import lorakit
from lorakit.cli.main import app
from lorakit.rank import analyze, combine, extract, resize
from lorakit.rank.adapters import read

peft = pytest.importorskip("peft")

IDS = torch.tensor([[1, 17, 42, 99, 7, 3, 0, 0], [1, 5, 64, 2, 0, 0, 0, 0]])
MASK = (IDS != 0).long()
QUERY0 = "bert.encoder.layer.0.attention.self.query"
runner = CliRunner()


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


def save_random_adapter(path, seed, r=4, **options):
    """A tiny-BERT adapter on query/value with random A and B (no head unless modules_to_save says so)."""
    model = tiny_bert()
    torch.manual_seed(seed)
    config = {**dict(r=r, alpha=8, targets=["query", "value"], init="random", modules_to_save=[]), **options}
    lorakit.inject(model, lorakit.LoraConfig(**config))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    lorakit.save_adapter(model, path)
    return path


def peft_outputs(adapter_dir):
    return logits(peft.PeftModel.from_pretrained(tiny_bert(), str(adapter_dir)).eval())


def same_in_peft_and_lorakit(adapter_dir) -> bool:
    """The adapter gives the same logits loaded by PEFT and by lorakit."""
    ours = tiny_bert()
    lorakit.load_adapter(ours, adapter_dir)
    return torch.allclose(peft_outputs(adapter_dir), logits(ours), atol=1e-5)


def lorakit_deltas(adapter_dir) -> dict:
    """{module: ΔW} as lorakit applies the adapter: merged weight minus base weight (an oracle independent of
    lorakit.rank)."""
    model = tiny_bert()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lorakit.load_adapter(model, adapter_dir)
    lorakit.unload(model, merge=True)
    return {n[: -len(".weight")]: p.detach() - before[n] for n, p in model.named_parameters()
            if n.endswith(".weight") and not torch.equal(p, before[n])}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    tiny_bert().save_pretrained(path)
    return path


# ---- analyze ----

def known_spectrum_adapter(path, sigma, seed=0, scale_alpha=8):
    """An adapter whose ΔW in QUERY0 is U diag(sigma) Vᵀ with orthonormal U, V drawn here (r = len(sigma))."""
    r = len(sigma)
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(32, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(32, r, generator=g, dtype=torch.float64))
    model = tiny_bert()
    lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=scale_alpha, targets=[QUERY0], modules_to_save=[]))
    layer = model.get_submodule(QUERY0)
    scale = scale_alpha / r
    with torch.no_grad():
        layer.lora_B["default"].copy_(u * torch.tensor(sigma, dtype=torch.float64) / scale)
        layer.lora_A["default"].copy_(v.T)
    lorakit.save_adapter(model, path)
    return path, u, v


def test_analyze_returns_known_singular_values_and_effective_ranks(tmp_path):
    sigma = [4.0, 2.0, 1.0, 1.0]  # squares 16, 4, 1, 1 of 22: 90% (19.8) needs 2, 99% (21.78) needs 4
    path, _, _ = known_spectrum_adapter(tmp_path / "a", sigma)
    m = analyze(path)["modules"][QUERY0]
    assert m["r"] == 4
    assert np.allclose(m["singular_values"], sigma, atol=1e-5)
    assert (m["effective_rank_90"], m["effective_rank_99"]) == (2, 4)
    assert m["norm"] == pytest.approx(22 ** 0.5, rel=1e-6)
    assert "relative_norm" not in m and "amplification" not in m and "similarity" not in m


def test_similarity_with_itself_is_one_on_the_diagonal_and_zero_for_orthogonal_subspaces(tmp_path):
    a, _, _ = known_spectrum_adapter(tmp_path / "a", [3.0, 2.0, 1.0, 0.5])
    grid = np.array(analyze(a, compare=a)["modules"][QUERY0]["similarity"]["grid"])
    assert grid.shape == (4, 4) and np.allclose(np.diag(grid), 1.0, atol=1e-6)
    # two adapters whose A rows span orthogonal coordinate subspaces
    for name, rows in (("x", range(0, 4)), ("y", range(8, 12))):
        model = tiny_bert()
        lorakit.inject(model, lorakit.LoraConfig(r=4, targets=[QUERY0], init="random", modules_to_save=[]))
        with torch.no_grad():
            model.get_submodule(QUERY0).lora_A["default"].copy_(torch.eye(32)[list(rows)] * torch.arange(1, 5)[:, None])
        lorakit.save_adapter(model, tmp_path / name)
    for source in ("A", "delta"):
        result = analyze(tmp_path / "x", compare=tmp_path / "y", similarity_of=source)["modules"][QUERY0]["similarity"]
        assert np.allclose(result["grid"], 0.0, atol=1e-12) and source.replace("delta", "ΔW") in result["of"]


def test_analyze_with_base_gives_relative_norm_and_amplification(tmp_path, base_dir):
    path = save_random_adapter(tmp_path / "a", seed=1)
    result = analyze(path, base=str(base_dir))["modules"]
    w = tiny_bert().get_submodule(QUERY0).weight.detach().double().numpy()
    delta = lorakit_deltas(path)[QUERY0].double().numpy()
    u, s, vt = np.linalg.svd(delta)
    expected = np.linalg.norm(delta) / np.linalg.norm(u[:, :4].T @ w @ vt[:4].T)
    m = result[QUERY0]
    assert m["relative_norm"] == pytest.approx(np.linalg.norm(delta) / np.linalg.norm(w), rel=1e-5)
    assert m["amplification"]["factor"] == pytest.approx(expected, rel=1e-5)
    assert m["amplification"]["random"] > 0 and m["amplification"]["r"] == 4


def test_analyze_dora_uses_the_effective_change(tmp_path, base_dir):
    path = save_random_adapter(tmp_path / "d", seed=2, use_dora=True)
    with pytest.raises(ValueError, match="DoRA.*--base"):
        analyze(path)  # the file names no base model (tiny_bert has none)
    m = analyze(path, base=str(base_dir))["modules"][QUERY0]
    effective = lorakit_deltas(path)[QUERY0].double()
    expected = torch.linalg.svdvals(effective)
    assert np.allclose(m["singular_values"], expected[: len(m["singular_values"])].numpy(), rtol=1e-4, atol=1e-6)
    assert len(m["singular_values"]) > 4  # the magnitude rescales W: the effective change is not rank r


def test_analyze_nf4_adapter_measures_against_the_dequantized_base(tmp_path, base_dir):
    from lorakit.nn.nf4 import dequantize_nf4, quantize_nf4

    path = save_random_adapter(tmp_path / "q", seed=4, quantize="nf4")
    m = analyze(path, base=str(base_dir))["modules"][QUERY0]
    w = dequantize_nf4(quantize_nf4(tiny_bert().get_submodule(QUERY0).weight.detach())).double()
    assert not torch.equal(w, tiny_bert().get_submodule(QUERY0).weight.detach().double())
    model = tiny_bert()
    lorakit.load_adapter(model, path)  # quantizes the base as the adapter says: merging would add its rounding
    delta = model.get_submodule(QUERY0).delta("default").double()
    assert m["relative_norm"] == pytest.approx((delta.norm() / w.norm()).item(), rel=1e-5)


# ---- resize ----

def test_resize_is_exact_at_full_rank_and_keeps_the_top_directions_below(tmp_path):
    path = save_random_adapter(tmp_path / "a", seed=3, r=6)
    resize(path, tmp_path / "same", r=8)
    resize(path, tmp_path / "low", r=2)
    original, same, low = (lorakit_deltas(tmp_path / p) for p in ("a", "same", "low"))
    for module, delta in original.items():
        assert torch.allclose(same[module], delta, atol=1e-5)
        u, s, vt = np.linalg.svd(delta.double().numpy())
        top2 = (u[:, :2] * s[:2]) @ vt[:2]
        assert np.allclose(low[module].double().numpy(), top2, atol=1e-5)
    assert read(tmp_path / "low").config.r == 2
    assert torch.allclose(peft_outputs(tmp_path / "same"), peft_outputs(path), atol=1e-5)


def test_resize_by_energy_writes_rank_pattern(tmp_path):
    path, _, _ = known_spectrum_adapter(tmp_path / "a", [4.0, 2.0, 1.0, 1.0])
    report = resize(path, tmp_path / "e", energy=0.9)
    assert report[QUERY0] == {"r_old": 4, "r": 2, "energy_kept": pytest.approx(20 / 22)}
    config = json.loads((tmp_path / "e" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 2
    assert same_in_peft_and_lorakit(tmp_path / "e")


# ---- extract ----

def tuned_copy(base_model, seed=0, noise=1e-4, everything=False):
    """The base plus a known change: a rank-5 ΔW in each query, rank 2 in each value, small noise on those, a
    changed head; with `everything`, every other tensor nudged too (a full fine-tune)."""
    g = torch.Generator().manual_seed(seed)
    tuned = tiny_bert()
    deltas = {}
    with torch.no_grad():
        for path, module in tuned.named_modules():
            if path.endswith(("query", "value")):
                rank = 5 if path.endswith("query") else 2
                low = torch.randn(32, rank, generator=g) @ torch.randn(rank, 32, generator=g) * 0.1
                deltas[path] = low
                module.weight.add_(low + noise * torch.randn(32, 32, generator=g))
        tuned.classifier.weight.add_(0.5)
        if everything:
            for name, p in tuned.named_parameters():
                if not name.endswith(("query.weight", "value.weight")):
                    p.add_(0.01 * torch.randn(p.shape, generator=g))
    return tuned, deltas


def test_extract_recovers_a_known_rank_5_change_and_loads_in_peft(tmp_path, base_dir):
    tuned, deltas = tuned_copy(tiny_bert())
    tuned.save_pretrained(tmp_path / "tuned", max_shard_size="20KB")  # several shards
    assert len(list((tmp_path / "tuned").glob("*.safetensors"))) > 1
    report = extract(str(base_dir), str(tmp_path / "tuned"), tmp_path / "out", r=5, targets=["query", "value"])
    assert report["modules_to_save"] == ["classifier"] and report["bias"] == "none"
    got = lorakit_deltas(tmp_path / "out")
    for path, delta in deltas.items():
        assert torch.allclose(got[path], delta, atol=2e-3), path  # noise: 1e-4 per entry
        assert report["modules"][path]["relative_error"] < 0.01
    theirs = peft_outputs(tmp_path / "out")
    ours = tiny_bert()
    lorakit.load_adapter(ours, tmp_path / "out")
    assert torch.allclose(theirs, logits(ours), atol=1e-5)
    assert torch.allclose(theirs, logits(tuned), atol=1e-2)


def test_extract_refuses_targets_that_are_not_linear(tmp_path, base_dir):
    tuned, _ = tuned_copy(tiny_bert(), everything=True)
    tuned.save_pretrained(tmp_path / "tuned")
    with pytest.raises(ValueError, match=r"word_embeddings.*are \[.embedding.\]: leave them out of --targets"):
        extract(str(base_dir), str(tmp_path / "tuned"), tmp_path / "out", r=2, targets=["query", "word_embeddings"])
    assert not (tmp_path / "out").exists()


def test_extract_by_energy_gives_per_module_ranks(tmp_path, base_dir):
    tuned, _ = tuned_copy(tiny_bert(), noise=0.0)
    tuned.save_pretrained(tmp_path / "tuned")
    report = extract(str(base_dir), str(tmp_path / "tuned"), tmp_path / "out", energy=1.0, targets=["query", "value"])
    assert {p: m["r"] for p, m in report["modules"].items()} == {
        f"bert.encoder.layer.{i}.attention.self.{n}": (5 if n == "query" else 2) for i in (0, 1)
        for n in ("query", "value")}
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert set(config["rank_pattern"].values()) == {5} or set(config["rank_pattern"].values()) == {2}
    assert same_in_peft_and_lorakit(tmp_path / "out")


def test_extract_of_a_full_fine_tune_at_full_rank_reproduces_it_in_peft(tmp_path, base_dir):
    tuned, _ = tuned_copy(tiny_bert(), everything=True)
    tuned.save_pretrained(tmp_path / "tuned")
    report = extract(str(base_dir), str(tmp_path / "tuned"), tmp_path / "out", r=32)
    assert report["bias"] == "all" and "bert.embeddings.LayerNorm" in report["modules_to_save"]
    assert torch.allclose(peft_outputs(tmp_path / "out"), logits(tuned), atol=1e-4)
    heads = extract(str(base_dir), str(tmp_path / "tuned"), tmp_path / "heads", r=32, heads_only=True)
    assert heads["modules_to_save"] == ["classifier"] and heads["bias"] == "none"
    assert "bert.embeddings.LayerNorm" in heads["dropped"]


# ---- combine: PEFT's add_weighted_adapter as the oracle ----

def peft_combined(dirs, weights, method, density=None, masks=None, monkeypatch=None):
    model = peft.PeftModel.from_pretrained(tiny_bert(), str(dirs[0]), adapter_name="a0")
    for i, d in enumerate(dirs[1:], 1):
        model.load_adapter(str(d), adapter_name=f"a{i}")
    if masks is not None:  # the same dare masks as ours: looked up by the tensor they prune
        from peft.utils import merge_utils

        def same_mask(tensor, density, rescale):
            mask = masks[(tuple(tensor.shape), tensor.numpy().tobytes())]
            return tensor * mask / density if rescale else tensor * mask
        monkeypatch.setattr(merge_utils, "random_pruning", same_mask)
    model.add_weighted_adapter([f"a{i}" for i in range(len(dirs))], weights, "mix", combination_type=method,
                               density=density)
    model.set_adapter("mix")
    return model.eval()


@pytest.mark.parametrize("method", ["linear", "cat", "svd", "ties", "dare_linear", "dare_ties"])
def test_combine_equals_peft_add_weighted_adapter(tmp_path, method, monkeypatch):
    dirs = [save_random_adapter(tmp_path / f"a{i}", seed=10 + i) for i in range(2)]
    weights, density = [0.7, -0.4], (0.5 if method in ("ties", "dare_linear", "dare_ties") else None)
    masks = {}

    def recording(tensor, p, generator):
        mask = torch.bernoulli(torch.full_like(tensor, p), generator=generator)
        masks[(tuple(tensor.shape), tensor.numpy().tobytes())] = mask
        return mask
    combine(dirs, weights, tmp_path / "mix", method=method, density=density, seed=3, draw=recording)
    theirs = peft_combined(dirs, weights, method, density, masks if method.startswith("dare") else None, monkeypatch)
    assert torch.allclose(peft_outputs(tmp_path / "mix"), logits(theirs), atol=1e-5)
    ours = lorakit_deltas(tmp_path / "mix")
    for path, delta in ours.items():
        layer = theirs.base_model.model.get_submodule(path)
        assert torch.allclose(delta, layer.get_delta_weight("mix"), atol=1e-5), path


def test_combine_dare_is_reproducible_by_seed(tmp_path):
    dirs = [save_random_adapter(tmp_path / f"a{i}", seed=20 + i) for i in range(2)]
    for name, seed in (("x", 1), ("y", 1), ("z", 2)):
        combine(dirs, [0.5, 0.5], tmp_path / name, method="dare_linear", density=0.5, seed=seed)
    x, y, z = (lorakit_deltas(tmp_path / n)[QUERY0] for n in "xyz")
    assert torch.equal(x, y) and not torch.allclose(x, z)


def test_combine_heads_are_averaged_or_refused(tmp_path):
    heads = [save_random_adapter(tmp_path / f"h{i}", seed=30 + i, modules_to_save=["classifier"]) for i in range(2)]
    combine(heads, [0.75, 0.25], tmp_path / "mix", method="cat")
    files = [read(p).other["classifier.weight"] for p in (*heads, tmp_path / "mix")]
    assert torch.allclose(files[2], 0.75 * files[0] + 0.25 * files[1], atol=1e-6)
    (heads[1] / "labels.json").write_text(json.dumps(["x", "y", "z"]))
    (heads[0] / "labels.json").write_text(json.dumps(["x", "y", "w"]))
    with pytest.raises(ValueError, match="labels"):
        combine(heads, [0.5, 0.5], tmp_path / "no", method="cat")
    plain = save_random_adapter(tmp_path / "plain", seed=33)
    with pytest.raises(ValueError, match="no head"):
        combine([heads[0], plain], [0.5, 0.5], tmp_path / "no", method="cat")
    assert not (tmp_path / "no").exists()


# ---- bad input stops before any work ----

def other_base_adapter(path):
    import transformers

    config = transformers.BertConfig(vocab_size=128, hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    model = transformers.BertForSequenceClassification(config)
    lorakit.inject(model, lorakit.LoraConfig(r=4, targets=["query", "value"], init="random", modules_to_save=[]))
    lorakit.save_adapter(model, path)
    return path


@pytest.mark.parametrize("call, message", [
    (lambda d, t: resize(d["a"], t, r=0), "--r must be an integer >= 1"),
    (lambda d, t: resize(d["a"], t, energy=0.0), r"--energy must be in \(0, 1\]"),
    (lambda d, t: resize(d["a"], t, energy=1.5), r"--energy must be in \(0, 1\]"),
    (lambda d, t: resize(d["a"], t), "exactly one of --r"),
    (lambda d, t: combine([d["a"], d["other"]], [1, 1], t), "different base models"),
    (lambda d, t: combine([d["a"], d["a"]], [1], t), "one weight per adapter"),
    (lambda d, t: combine([d["a"], d["a"]], [1, 1], t, method="ties"), "needs --density"),
    (lambda d, t: combine([d["a"], d["a"]], [1, 1], t, method="mean"), "--method must be one of"),
    (lambda d, t: combine([d["a"], d["r8"]], [1, 1], t, method="linear"), "ranks must agree"),
    (lambda d, t: analyze(d["a"], compare=d["other"]), "different base models"),
    (lambda d, t: analyze(d["a"], similarity_of="B"), "--similarity-of"),
    (lambda d, t: extract(str(d["base"]), str(d["wide"]), t, r=4), "not a fine-tune of this base"),
    (lambda d, t: extract(str(d["base"]), str(d["base"]), t, r=-1), "--r must be an integer >= 1"),
    (lambda d, t: extract(str(d["base"]), str(d["base"]), t, r=4), "does not differ"),
])
def test_bad_input_is_refused_before_any_output(tmp_path, base_dir, call, message):
    import transformers

    wide = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=64, num_labels=3))
    wide.save_pretrained(tmp_path / "wide")
    dirs = {"a": save_random_adapter(tmp_path / "a", seed=40), "r8": save_random_adapter(tmp_path / "r8", 41, r=8),
            "other": other_base_adapter(tmp_path / "other"), "base": base_dir, "wide": tmp_path / "wide"}
    with pytest.raises(ValueError, match=message):
        call(dirs, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- the command line ----

def test_cli_analyze_json_table_and_plot(tmp_path, base_dir):
    path = save_random_adapter(tmp_path / "a", seed=50)
    result = runner.invoke(app, ["analyze", str(path), "--json", "--base", str(base_dir), "--compare", str(path),
                                 "--plot", str(tmp_path / "a.png")])
    assert result.exit_code == 0, result.output
    modules = json.loads(result.output)["modules"]
    assert set(modules[QUERY0]) == {"r", "singular_values", "effective_rank_90", "effective_rank_99", "norm",
                                    "relative_norm", "amplification", "similarity"}
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    table = runner.invoke(app, ["analyze", str(path)])
    assert table.exit_code == 0 and QUERY0 in table.output and "eff90" in table.output
    bad = runner.invoke(app, ["resize", str(path), "--r", "0", "--output", str(tmp_path / "x")])
    assert bad.exit_code == 1 and "Error: --r must be an integer >= 1" in bad.output


def test_cli_combine_and_resize_write_adapters_lorakit_loads(tmp_path):
    dirs = [save_random_adapter(tmp_path / f"a{i}", seed=60 + i) for i in range(2)]
    result = runner.invoke(app, ["combine", *map(str, dirs), "--weights", "0.7,0.3", "--method", "svd", "--r", "3",
                                 "--output", str(tmp_path / "mix")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["resize", str(tmp_path / "mix"), "--energy", "0.9", "--output", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    model = tiny_bert()
    lorakit.load_adapter(model, tmp_path / "s")
    assert max(layer.lora_A["default"].shape[0] for layer in lorakit.adapters.parts.lora_layers(model).values()) <= 3


# ---- the benchmark at its tiny size ----

@pytest.mark.slow  # about a minute of CPU: MiniLM trained five times for one step, four extractions
def test_rank_benchmark_runs_at_tiny_size(tmp_path):
    from benchmarks import rank as bench

    if not bench.DATA.exists():
        pytest.skip(f"{bench.DATA} is absent: the benchmark needs the shared AG News files")
    out = bench.main(["--size", "tiny", "--out", str(tmp_path / "rank.json")])
    saved = json.loads((tmp_path / "rank.json").read_text())
    assert saved["full"]["accuracy"] == out["full"]["accuracy"]
    assert sorted((row["r"], row["seed"]) for row in saved["lora"]) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert set(saved["similarity"]) == {"ranks", "seeds"} and set(saved["amplification"]) == {"1", "2"}
    assert [(row.get("r"), row.get("energy"), row["kept"]) for row in saved["extraction"]] == [
        (2, None, "all changed"), (2, None, "head only"), (None, 0.9, "all changed"), (None, 0.9, "head only")]
    for png in ("rank-accuracy.png", "rank-similarity-r1-r2.png", "rank-similarity-seeds.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / ".rank-work-tiny").exists()
    assert "Accuracy against r" in bench.section(tmp_path / "rank.json")
