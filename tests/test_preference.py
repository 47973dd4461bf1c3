"""Preference tuning (lorakit/preference): the first step's loss, rewards and adapter gradients equal TRL's trainers
(DPOTrainer: sigmoid DPO, IPO, cDPO via its `aot` loss on one pair; KTOTrainer; ORPOTrainer from trl.experimental) on
a tiny Llama with the same data and the same initial adapter, in fp32; data checks; and training runs through
`lorakit train --task dpo|ipo|orpo|kto`."""

import json
import math
import warnings
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.errors import DataError
from lorakit.training.preference.data import PAIRED, collate_unpaired, read_rows, tokenize_rows
from lorakit.training.preference.objectives import OBJECTIVES, Settings, batch_loss, metric_means

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

TOL = 1e-5
PAIRS = [{"prompt": "hello there how are", "chosen": " you fine thanks", "rejected": " sports news"},
         {"prompt": "what is the topic", "chosen": " world news", "rejected": " fine thanks what"},
         {"prompt": "be brief", "chosen": " answer", "rejected": " question there is the topic"}]
UNPAIRED_ROWS = [{"prompt": "hello there how are", "completion": " you fine thanks", "label": True},
                 {"prompt": "what is the topic", "completion": " fine thanks what", "label": False},
                 {"prompt": "be brief", "completion": " answer", "label": True},
                 {"prompt": "how are you", "completion": " sports world news", "label": False}]


@pytest.fixture(scope="module")
def adapter_dir(chat_llama_dir, tmp_path_factory):
    """A PEFT adapter on q_proj/v_proj with random A and B (B not zero: the policy differs from the base)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(chat_llama_dir, dtype=torch.float32),
                                peft_lora_config())
    path = tmp_path_factory.mktemp("random-adapter")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tuned_adapter_dir(chat_llama_dir, adapter_dir, tmp_path_factory):
    """The random adapter after a few steps of supervised tuning on UNPAIRED_ROWS' completions after every prompt:
    the policy then likes the mismatched pairs better than the base does, so that KTO's KL estimate is positive (a
    random adapter's is negative and clamped to 0) and its reference point takes part."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_llama_dir)
    rows = tokenize_rows(UNPAIRED_ROWS, tokenizer, 64, None, "rows", paired=False).rows
    batch = collate_unpaired(rows, tokenizer.pad_token_id, 64)
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(chat_llama_dir, dtype=torch.float32),
                                           adapter_dir, is_trainable=True)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(10):
        for prefix in ("", "KL_"):
            labels = batch[prefix + "input_ids"].masked_fill(batch[prefix + "completion_mask"] == 0, -100)
            model(input_ids=batch[prefix + "input_ids"], attention_mask=batch[prefix + "attention_mask"],
                  labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    path = tmp_path_factory.mktemp("tuned-adapter")
    model.save_pretrained(path)
    return path


def peft_lora_config():
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                           init_lora_weights=False, task_type="CAUSAL_LM")


def trl_trainer(kind: str, model_dir, adapter_dir, rows, ref_copy: bool = False, **args):
    """TRL's trainer for `kind` (its own tokenisation of `rows`) on a PEFT model holding the random adapter: as a new
    adapter (TRL then takes the base, adapters off, as reference) or, with `ref_copy`, as a pretrained adapter (TRL
    then keeps a frozen copy of it named "ref" as reference)."""
    from datasets import Dataset
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    common = dict(output_dir=str(Path(adapter_dir) / f"trl-{kind}"), report_to=[], use_cpu=True, bf16=False,
                  per_device_train_batch_size=len(rows), max_length=64, **args)
    data = Dataset.from_list(rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "kto":
            trainer = trl.KTOTrainer(model=base, args=trl.KTOConfig(**common), train_dataset=data,
                                     processing_class=tokenizer, peft_config=peft_lora_config())
        elif kind == "orpo":
            from trl.experimental.orpo import ORPOConfig, ORPOTrainer

            trainer = ORPOTrainer(model=base, args=ORPOConfig(**common), train_dataset=data,
                                  processing_class=tokenizer, peft_config=peft_lora_config())
        elif ref_copy:
            model = peft.PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
            trainer = trl.DPOTrainer(model=model, args=trl.DPOConfig(**common), train_dataset=data,
                                     processing_class=tokenizer)
        else:
            trainer = trl.DPOTrainer(model=base, args=trl.DPOConfig(**common), train_dataset=data,
                                     processing_class=tokenizer, peft_config=peft_lora_config())
    if not ref_copy:
        set_peft_model_state_dict(trainer.model, load_file(Path(adapter_dir) / "adapter_model.safetensors"))
    trainer.model.train()
    return trainer


def lorakit_model(model_dir, adapter_dir, ref_copy: bool = False):
    """The tiny Llama with the same adapter loaded by lorakit, trainable (and a frozen copy named "ref")."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lorakit.load_adapter(model, adapter_dir, trainable=True)
    if ref_copy:
        lorakit.load_adapter(model, adapter_dir, name="ref")
    return model.train()


def adapter_grads(model) -> dict:
    """{PEFT-style parameter path: gradient} of the trained ("default") adapter."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            name = name.removeprefix("base_model.model.").removesuffix(".weight")
            out[name] = p.grad.detach().clone()
    return out


def assert_same_grads(ours: dict, theirs: dict):
    assert sorted(ours) == sorted(theirs) and len(ours) == 8
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=TOL, rtol=0, msg=name)
    assert any(g.abs().max() > 1e-3 for g in ours.values())  # the comparison is not between zeros


def last(metrics: dict) -> dict:
    return {k: v[-1] for k, v in metrics.items()}


def run_lorakit(kind, model_dir, adapter_dir, rows, ref_copy=False, **settings):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    objective = OBJECTIVES[kind]
    tokenized = tokenize_rows(rows, tokenizer, 64, None, "rows", paired=objective.paired)
    batch = objective.collate(tokenizer.pad_token_id, 64)(tokenized.rows)
    model = lorakit_model(model_dir, adapter_dir, ref_copy)
    loss, totals = batch_loss(objective, Settings(precision="fp32", max_length=64, **settings), model, batch)
    loss.backward()
    return loss.item(), metric_means({k: v.tolist() for k, v in totals.items()}), adapter_grads(model), batch


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_and_ipo_first_step_equal_trl(chat_llama_dir, adapter_dir, loss_type):
    trainer = trl_trainer("dpo", chat_llama_dir, adapter_dir, PAIRS, beta=0.2, loss_type=[loss_type])
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    theirs = trainer.compute_loss(trainer.model, batch)
    theirs.backward()
    kind = "dpo" if loss_type == "sigmoid" else "ipo"
    loss, metrics, grads, ours_batch = run_lorakit(kind, chat_llama_dir, adapter_dir, PAIRS, beta=0.2)
    assert torch.equal(ours_batch["input_ids"], batch["input_ids"])  # TRL's tokenisation, EOS included
    assert torch.equal(ours_batch["completion_mask"], batch["completion_mask"])
    assert loss == pytest.approx(theirs.item(), abs=TOL) and abs(loss - math.log(2)) > 1e-3
    reference = last(trainer._metrics["train"])
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"):
        assert metrics[key] == pytest.approx(reference[key], abs=TOL), key
    assert_same_grads(grads, adapter_grads(trainer.model))


def test_ref_adapter_equals_trl_with_a_pretrained_adapter(chat_llama_dir, adapter_dir):
    """A pretrained adapter: TRL keeps a frozen copy named "ref" as reference, as --ref-adapter does."""
    trainer = trl_trainer("dpo", chat_llama_dir, adapter_dir, PAIRS, ref_copy=True)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    theirs = trainer.compute_loss(trainer.model, batch)
    theirs.backward()
    loss, metrics, grads, _ = run_lorakit("dpo", chat_llama_dir, adapter_dir, PAIRS, ref_copy=True)
    assert loss == pytest.approx(theirs.item(), abs=TOL) and loss == pytest.approx(math.log(2), abs=1e-7)
    assert metrics["rewards/margins"] == 0.0
    assert_same_grads(grads, adapter_grads(trainer.model))


def test_cdpo_equals_trl_aot_on_one_pair(chat_llama_dir, adapter_dir):
    """trl 1.16's sigmoid loss has no label smoothing; its `aot` loss sorts log-ratios over the batch and, for one
    pair, is exactly conservative DPO."""
    rows = PAIRS[:1]
    trainer = trl_trainer("dpo", chat_llama_dir, adapter_dir, rows, loss_type=["aot"], label_smoothing=0.2)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    theirs = trainer.compute_loss(trainer.model, batch)
    theirs.backward()
    loss, _, grads, _ = run_lorakit("dpo", chat_llama_dir, adapter_dir, rows, label_smoothing=0.2)
    assert loss == pytest.approx(theirs.item(), abs=TOL)
    assert_same_grads(grads, adapter_grads(trainer.model))


def test_kto_first_step_equals_trl(chat_llama_dir, tuned_adapter_dir):
    adapter_dir = tuned_adapter_dir
    trainer = trl_trainer("kto", chat_llama_dir, adapter_dir, UNPAIRED_ROWS, beta=0.3, desirable_weight=1.5,
                          undesirable_weight=0.7)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(UNPAIRED_ROWS))])
    theirs = trainer.compute_loss(trainer.model, batch)
    theirs.backward()
    loss, metrics, grads, ours_batch = run_lorakit("kto", chat_llama_dir, adapter_dir, UNPAIRED_ROWS, beta=0.3,
                                                   desirable_weight=1.5, undesirable_weight=0.7)
    assert torch.equal(ours_batch["KL_input_ids"], batch["KL_input_ids"])  # the same mismatched pairs
    assert loss == pytest.approx(theirs.item(), abs=TOL)
    reference = last(trainer._metrics["train"])
    assert reference["kl"] > 0  # the KL term takes part
    for key in ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert metrics[key] == pytest.approx(reference[key], abs=TOL), key
    assert_same_grads(grads, adapter_grads(trainer.model))


def test_orpo_odds_ratio_term_equals_trl(chat_llama_dir, adapter_dir):
    """ORPO (trl.experimental.orpo in trl 1.16) on TRL's own batch: log-probabilities, rewards, log odds and the
    odds-ratio term's gradients equal; the NLL differs by design (TRL's counts the prompt tokens, lorakit's the
    chosen completion's only, as the paper's L_SFT), so it is checked against a plain cross-entropy."""
    trainer = trl_trainer("orpo", chat_llama_dir, adapter_dir, PAIRS, beta=0.25)
    raw = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    chosen_logps, rejected_logps, _, _, _ = trainer.concatenated_forward(trainer.model, raw)
    terms, chosen_rewards, rejected_rewards, _, log_odds = trainer.odds_ratio_loss(chosen_logps, rejected_logps)
    (-terms.mean()).backward()
    # TRL's batch in lorakit's layout: chosen rows then rejected rows, the completion where labels are not -100.
    cat = trainer.concatenated_inputs(raw, padding_value=trainer.padding_value)
    batch = {"input_ids": cat["concatenated_input_ids"], "attention_mask": cat["concatenated_attention_mask"],
             "completion_mask": (cat["concatenated_labels"] != -100).long()}
    model = lorakit_model(chat_llama_dir, adapter_dir)
    loss, totals = batch_loss(OBJECTIVES["orpo"], Settings(beta=0.25, orpo_alpha=0.0), model, batch)
    loss.backward()
    metrics = metric_means({k: v.tolist() for k, v in totals.items()})
    assert loss.item() == pytest.approx(-terms.mean().item(), abs=TOL)
    assert metrics["rewards/chosen"] == pytest.approx(chosen_rewards.mean().item(), abs=TOL)
    assert metrics["rewards/rejected"] == pytest.approx(rejected_rewards.mean().item(), abs=TOL)
    assert metrics["log_odds"] == pytest.approx(log_odds.item(), abs=TOL)
    assert_same_grads(adapter_grads(model), adapter_grads(trainer.model))
    # The NLL term: per pair, the cross-entropy over its chosen completion's tokens, averaged over the pairs;
    # computed here with torch alone.
    with torch.no_grad():
        n = len(PAIRS)
        logits = model(input_ids=batch["input_ids"][:n], attention_mask=batch["attention_mask"][:n]).logits
        labels = batch["input_ids"][:n].masked_fill(batch["completion_mask"][:n] == 0, -100)[:, 1:]
        per_token = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="none")
        nll = (per_token.sum(1) / (labels != -100).sum(1)).mean()
        weighted, _ = batch_loss(OBJECTIVES["orpo"], Settings(beta=0.25, orpo_alpha=2.0), model, batch)
    assert weighted.item() == pytest.approx(loss.item() + 2.0 * nll.item(), abs=TOL)


# ---- lorakit train --task dpo|ipo|orpo|kto ----

def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_cfg(model, data, out, **kw):
    from lorakit.training.settings import TrainConfig

    base = dict(model=str(model), task="dpo", data=str(data), output=str(out), batch_size=4, max_length=48, lr=1e-2,
                dropout=0.0, max_steps=2, log_every=1, save_every=100, warmup=0, targets="all-linear",
                precision="fp32", overwrite=True)
    return TrainConfig(**{**base, **kw})


def adapter_tensors(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(Path(out) / "adapter_model.safetensors")


def assert_same_adapter(a: Path, b: Path, atol: float = 1e-6):
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], atol=atol, rtol=0, msg=k)


def test_kto_metrics_over_unequal_micro_batches_are_those_of_all_rows_with_one_reduction(chat_llama_dir, tmp_path,
                                                                                        monkeypatch):
    """3 desirable rows and 1 undesirable in 2 micro-batches of 2: one holds 2 desirable rows, the other 1, however
    they are drawn. The logged logps/chosen is the mean over the 3 desirable rows (a mean per micro-batch weighted by
    its examples is not), computed here from the base model's logits (a fresh adapter adds nothing). fit adds the
    metrics' totals over the micro-batches and reduces them once, beside the loss; KTO's KL estimate is reduced per
    micro-batch (its loss needs it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.training import fit
    from lorakit.training.preference import objectives
    from lorakit.training.rundir import read_log
    from lorakit.training.train import train

    rows = [{**UNPAIRED_ROWS[0], "completion": " you fine thanks world"}, UNPAIRED_ROWS[1],
            UNPAIRED_ROWS[2], {**UNPAIRED_ROWS[3], "label": True}]
    data = write_jsonl(tmp_path / "kto.jsonl", rows)
    calls = {"fit": 0, "objectives": 0}
    for module, name in ((fit, "fit"), (objectives, "objectives")):
        def counted(value, world, name=name, original=module.sum_over_processes):
            calls[name] += 1
            return original(value, world)
        monkeypatch.setattr(module, "sum_over_processes", counted)
    train(train_cfg(chat_llama_dir, data, tmp_path / "run", task="kto", max_steps=1, batch_size=2, grad_accum=2),
          echo=lambda *_: None, progress=False)
    assert calls == {"fit": 2, "objectives": 2}  # fit: the step's targets, then its loss and metrics; the 2 KL
    step = next(r for r in read_log(tmp_path / "run" / "log.jsonl") if r.get("step") == 1 and "loss" in r)

    tokenizer = AutoTokenizer.from_pretrained(chat_llama_dir)
    base = AutoModelForCausalLM.from_pretrained(chat_llama_dir, dtype=torch.float32).eval()
    logps = []
    for row in tokenize_rows(rows, tokenizer, 48, None, "rows", paired=False).rows:
        if row["label"]:
            ids = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
            with torch.no_grad():
                per_token = base(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
            logps.append(per_token[-len(row["completion_ids"]):].sum().item())
    assert len(logps) == 3
    assert step["logps/chosen"] == pytest.approx(sum(logps) / 3, rel=1e-5)


def test_dpo_run_logs_rewards_and_accumulation_counts_pairs(chat_llama_dir, tmp_path):
    """One step over 4 pairs equals 2 micro-batches of 2 (each pair weighs the same), the first step's loss is
    ln 2 (a fresh adapter: policy = reference), rewards are logged per step and at eval, training.png is drawn."""
    from lorakit.training.rundir import read_log
    from lorakit.training.train import train

    data = write_jsonl(tmp_path / "pairs.jsonl",
                       PAIRS + [{"prompt": "sports", "chosen": " news", "rejected": " hello"}])
    whole = train(train_cfg(chat_llama_dir, data, tmp_path / "whole", eval_data=str(data), max_steps=1),
                  echo=lambda *_: None, progress=False)
    parts = train(train_cfg(chat_llama_dir, data, tmp_path / "parts", eval_data=str(data), max_steps=1,
                            batch_size=2, grad_accum=2), echo=lambda *_: None, progress=False)
    assert_same_adapter(tmp_path / "whole", tmp_path / "parts")
    log = read_log(tmp_path / "whole" / "log.jsonl")
    step = next(r for r in log if r.get("step") == 1 and "loss" in r)
    assert step["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"} <= set(step)
    assert whole["eval_before"]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert whole["eval_before"]["rewards/accuracies"] == 0.0 and whole["eval"]["rewards/margins"] > 0
    assert parts["train_loss"] == pytest.approx(whole["train_loss"], abs=1e-6)
    assert (tmp_path / "whole" / "training.png").stat().st_size > 0


@pytest.mark.parametrize("task", ["dpo", "kto"])
def test_tokens_per_second_counts_prompt_and_completion_tokens_of_every_sequence(chat_llama_dir, tmp_path, task):
    """A step's tokens are those put through the policy: prompt + completion of chosen and of rejected (KTO: of each
    row), counted here with the tokenizer alone (plain text: prompt + completion + EOS). They were 0 before."""
    from transformers import AutoTokenizer

    from lorakit.training.rundir import read_log
    from lorakit.training.train import train

    tokenizer = AutoTokenizer.from_pretrained(chat_llama_dir)
    rows = UNPAIRED_ROWS if task == "kto" else PAIRS
    sides = ("completion",) if task == "kto" else ("chosen", "rejected")
    expected = sum(len(tokenizer(r["prompt"] + r[side] + tokenizer.eos_token)["input_ids"]) for r in rows for side in sides)
    records = []
    train(train_cfg(chat_llama_dir, write_jsonl(tmp_path / "rows.jsonl", rows), tmp_path / "run", task=task,
                    batch_size=len(rows), max_steps=2), on_step=records.append, echo=lambda *_: None, progress=False)
    assert [r["tokens"] for r in records] == [expected, expected]
    logged = [r for r in read_log(tmp_path / "run" / "log.jsonl") if "tokens_per_s" in r]
    assert len(logged) == 2 and all(r["tokens_per_s"] > 0 for r in logged)


@pytest.mark.parametrize("task", ["ipo", "orpo", "kto"])
def test_every_task_trains_with_nf4_and_dora(chat_llama_dir, tmp_path, task):
    from lorakit.training.train import train

    rows = UNPAIRED_ROWS if task == "kto" else PAIRS
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    metrics = train(train_cfg(chat_llama_dir, data, tmp_path / "run", task=task, quantize="nf4", use_dora=True,
                              eval_data=str(data), max_steps=3), echo=lambda *_: None, progress=False)
    assert "nf4" in metrics["weights"] and math.isfinite(metrics["train_loss"])
    assert metrics["eval"]["loss"] < metrics["eval_before"]["loss"]  # it learns the training rows
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert config["use_dora"] is True


def test_ref_adapter_with_and_without_precomputed_reference(chat_llama_dir, adapter_dir, tmp_path):
    """--ref-adapter: the run starts from the adapter (first loss ln 2: policy = the frozen copy); precomputing the
    reference's log-probabilities trains the same adapter."""
    from lorakit.training.rundir import read_log
    from lorakit.training.train import train

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    for name, precompute in (("live", False), ("pre", True)):
        train(train_cfg(chat_llama_dir, data, tmp_path / name, ref_adapter=str(adapter_dir), precompute_ref=precompute,
                        batch_size=3, max_steps=2), echo=lambda *_: None, progress=False)
    assert_same_adapter(tmp_path / "live", tmp_path / "pre")
    first = next(r for r in read_log(tmp_path / "live" / "log.jsonl") if r.get("step") == 1)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7)
    started = adapter_tensors(adapter_dir)
    assert any(not torch.equal(v, adapter_tensors(tmp_path / "live")[k]) for k, v in started.items())


def test_resume_ends_with_the_adapter_of_an_uninterrupted_run(chat_llama_dir, tmp_path):
    import shutil

    from lorakit.training.train import train

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 2)
    train(train_cfg(chat_llama_dir, data, tmp_path / "full", max_steps=4, batch_size=2, save_every=2,
                    save_total_limit=5, dropout=0.1), echo=lambda *_: None, progress=False)
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    for later in ("step-3", "step-4"):
        shutil.rmtree(tmp_path / "cut" / "checkpoints" / later, ignore_errors=True)
    train(train_cfg(chat_llama_dir, data, tmp_path / "cut", max_steps=4, batch_size=2, save_every=2,
                    save_total_limit=5, dropout=0.1, overwrite=False, resume=True), echo=lambda *_: None,
          progress=False)
    assert_same_adapter(tmp_path / "full", tmp_path / "cut", atol=0)


def refused(cfg, error, match):
    from lorakit.training.train import train

    with pytest.raises(error, match=match):
        train(cfg, echo=lambda *_: None, progress=False)


def test_bad_rows_and_settings_are_refused_before_training(chat_llama_dir, bert_dir, tmp_path):
    from lorakit.errors import ConfigError

    good = write_jsonl(tmp_path / "good.jsonl", PAIRS)
    missing = write_jsonl(tmp_path / "missing.jsonl", [PAIRS[0], {"prompt": "hello", "chosen": " there"}])
    refused(train_cfg(chat_llama_dir, missing, tmp_path / "o"), DataError, r"row 2: missing or empty field 'rejected'")
    same = write_jsonl(tmp_path / "same.jsonl", [PAIRS[0], {"prompt": "a", "chosen": " b", "rejected": " b"}])
    refused(train_cfg(chat_llama_dir, same, tmp_path / "o"), DataError, r"row 2: chosen and rejected are the same")
    long = write_jsonl(tmp_path / "long.jsonl", [PAIRS[0], {**PAIRS[1], "prompt": "hello there " * 40}])
    refused(train_cfg(chat_llama_dir, long, tmp_path / "o"), DataError, r"row 2: the prompt alone has \d+ tokens")
    label = write_jsonl(tmp_path / "label.jsonl", [{"prompt": "a", "completion": " b", "label": "maybe"}])
    refused(train_cfg(chat_llama_dir, label, tmp_path / "o", task="kto"), DataError, r"row 1: label must be")
    refused(train_cfg(chat_llama_dir, good, tmp_path / "o", packing=True), ConfigError, "--packing does not apply")
    refused(train_cfg(chat_llama_dir, good, tmp_path / "o", task="kto", precompute_ref=True), ConfigError,
            r"not for unpaired rows \(kto\)")
    refused(train_cfg(chat_llama_dir, good, tmp_path / "o", task="orpo", ref_adapter=str(good)), ConfigError,
            "no reference model")
    assert not (tmp_path / "o").exists()  # nothing was written


def test_a_ref_adapter_for_another_base_is_refused(chat_llama_dir, llama_dir, adapter_dir, tmp_path):
    from lorakit.errors import ConfigError

    good = write_jsonl(tmp_path / "good.jsonl", PAIRS)
    refused(train_cfg(llama_dir, good, tmp_path / "o", ref_adapter=str(adapter_dir)), ConfigError,
            "was trained on")


def test_a_prompt_cut_to_max_prompt_length_keeps_its_end_and_is_counted(chat_llama_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_llama_dir)
    rows = read_rows([{**PAIRS[0], "prompt": "be brief " * 10 + "hello there"}, PAIRS[1]], PAIRED, "rows")
    whole = tokenize_rows(rows, tokenizer, 200, None, "rows")
    keep = len(whole.rows[1]["prompt_ids"])  # the second prompt fits; the first is longer
    cut = tokenize_rows(rows, tokenizer, 200, keep, "rows")
    assert cut.prompts_cut == 1 and whole.prompts_cut == 0 and cut.rows[1] == whole.rows[1]
    assert cut.rows[0]["prompt_ids"] == whole.rows[0]["prompt_ids"][-keep:]
    short = tokenize_rows(rows, tokenizer, len(whole.rows[0]["prompt_ids"]) + 2, None, "rows")
    assert short.completions_cut >= 2 and len(short.rows[0]["chosen_ids"]) == 2
    assert "1 prompts cut" in cut.summary()


def test_conversational_pairs_use_the_chat_template(chat_llama_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_llama_dir)
    row = {"prompt": [{"role": "user", "content": "how are you"}],
           "chosen": [{"role": "assistant", "content": "fine thanks"}],
           "rejected": [{"role": "assistant", "content": "sports news"}]}
    tokenized = tokenize_rows(read_rows([row], PAIRED, "rows"), tokenizer, 64, None, "rows")
    assert tokenized.chat
    r = tokenized.rows[0]
    assert tokenizer.decode(r["prompt_ids"]).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(r["chosen_ids"]) == "fine thanks<|im_end|>\n"


def test_preference_benchmark_runs_at_tiny_size(tmp_path):
    """benchmarks/preference.py end to end at a tiny size (numbers are measured there, not asserted here)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "benchmarks.preference", "--tiny"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| lorakit |" in out.stdout and "| TRL DPOTrainer + PEFT |" in out.stdout


def test_the_shipped_demo_pairs_are_valid_preference_data():
    from lorakit.training.preference.data import read_rows

    demo = Path(lorakit.__file__).parent / "demo"
    train_rows = read_rows(str(demo / "news_preferences_train.jsonl"), PAIRED, "train")
    eval_rows = read_rows(str(demo / "news_preferences_eval.jsonl"), PAIRED, "eval")
    assert len(train_rows) == 320 and len(eval_rows) == 80
    assert {r["chosen"] for r in train_rows} == {" World", " Sports", " Business", " Science"}


def test_orpo_accumulation_gives_the_loss_of_one_batch(chat_llama_dir, tmp_path):
    """ORPO's NLL is counted per pair like the rest of its loss, so 2 micro-batches of 2 pairs whose chosen
    completions differ in length give the loss of one batch of 4 (a token mean per micro-batch would not). The loss
    is compared, not the adapter: B's gradient is near zero in places, where AdamW's first step turns summation-order
    noise into steps of up to lr."""
    from lorakit.training.train import train

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS + [
        {"prompt": "sports", "chosen": " news world sports news world sports news world", "rejected": " hello"}])
    whole, parts = (train(train_cfg(chat_llama_dir, data, tmp_path / name, task="orpo", max_steps=1, **extra),
                          echo=lambda *_: None, progress=False)
                    for name, extra in (("whole", {}), ("parts", {"batch_size": 2, "grad_accum": 2})))
    assert parts["train_loss"] == pytest.approx(whole["train_loss"], abs=1e-6)
