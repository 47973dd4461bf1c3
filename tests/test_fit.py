"""`lorakit.training.fit`: the loop alone, with no run directory: it takes micro-batches in the order given, continues from a
RunState, reports one record shape per step, and stops on a non-finite loss and on Ctrl-C."""

import copy
import os
import signal

import pytest
import torch

from lorakit import LoraConfig, inject
from lorakit.adapters.optim import optimizer
from lorakit.data import tables as data
from lorakit.errors import Interrupted, TrainingError
from lorakit.io.models import load_model
from lorakit.training.fit import Batches, Hooks, Loop, RunState, fit, seeded_batches
from lorakit.training.tasks import CLASSIFY

RECORD = {"step", "epoch", "loss", "lr", "tokens", "seconds"}


@pytest.fixture
def setup(bert_dir):
    """(model with an adapter, six tokenised rows, a collate that notes which rows it batched, the batches seen)."""
    torch.manual_seed(0)
    model, tokenizer = load_model(str(bert_dir), CLASSIFY, ["a", "b"])
    inject(model, LoraConfig(r=2, targets=["query", "value"], modules_to_save=["classifier"]))
    rows = data.classification_examples(tokenizer, [f"word {i} " * (i + 1) for i in range(6)], [0, 1] * 3, 16)
    seen, pad = [], data.label_collator(tokenizer)

    def collate(batch):
        seen.append([rows.index(r) for r in batch])
        return pad(batch)

    return model, rows, collate, seen


def parts(model):
    opt = optimizer(model, lr=1e-2)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def test_fit_takes_the_given_order_and_continues_from_a_run_state(setup):
    model, rows, collate, seen = setup
    order = lambda epoch: [[5, 4], [3, 2, 1], [0]] if epoch == 0 else [[0, 1, 2, 3, 4, 5], [2], [3]]  # noqa: E731
    records = []
    hooks = Hooks(on_step=records.append)
    state = fit(model, Batches(rows, collate, order, 3), *parts(model), Loop(total_steps=2, grad_accum=2), hooks=hooks)
    assert seen == [[5, 4], [3, 2, 1], [0], [0, 1, 2, 3, 4, 5]]
    assert (state.step, state.micro) == (2, 4) and state.seconds > 0 and state.last_eval is None
    assert [r["step"] for r in records] == [1, 2] and [r["epoch"] for r in records] == [0.667, 1.333]
    assert all(r.keys() == RECORD for r in records) and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)

    seen.clear()
    later = fit(model, Batches(rows, collate, order, 3), *parts(model), Loop(total_steps=3),
                RunState(step=2, micro=4, seconds=1.5))
    assert seen == [[2]] and (later.step, later.micro) == (3, 5) and later.seconds > 1.5


def test_fit_is_the_textbook_loop(bert_dir):
    # One micro-batch per step and no hooks: forward, backward, clip, AdamW, schedule, with dropout seeded seed + 1.
    # benchmarks/quality.py relies on this to keep its results.
    torch.manual_seed(0)
    model, tokenizer = load_model(str(bert_dir), CLASSIFY, ["a", "b"])
    inject(model, LoraConfig(r=2, dropout=0.3, targets=["query", "value"], modules_to_save=["classifier"]))
    rows = data.classification_examples(tokenizer, [f"word {i} " * (i + 1) for i in range(6)], [0, 1] * 3, 16)
    collate, order = data.label_collator(tokenizer), [[4, 1], [0, 5, 2], [3]]
    twin = copy.deepcopy(model)
    fit(model, Batches(rows, collate, lambda epoch: order, 3), *parts(model), Loop(total_steps=4, seed=7))

    params = [p for p in twin.parameters() if p.requires_grad]
    opt, sched = parts(twin)
    torch.manual_seed(7 + 1)
    twin.train()
    for step in range(4):
        twin(**collate([rows[i] for i in order[step % 3]])).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name


def test_lorakit_order_splits_each_global_batch_between_processes(setup):
    from lorakit.runtime.distributed import World

    _, rows, collate, _ = setup
    one = seeded_batches(rows, collate, 4, seed=0)
    halves = [seeded_batches(rows, collate, 2, seed=0, world=World(rank, 2)) for rank in range(2)]
    assert one.per_epoch == halves[0].per_epoch == 2
    for epoch in range(2):
        assert [a + b for a, b in zip(*(h.order(epoch) for h in halves))] == one.order(epoch)


def test_fit_evaluates_logs_and_checkpoints_when_due(setup):
    model, rows, collate, _ = setup
    logged, saved = [], []
    hooks = Hooks(evaluate=lambda: {"accuracy": 0.5}, log=logged.append, echo=lambda message: None,
                  checkpoint=lambda state: saved.append(state.saved()) or f"step-{state.step}")
    loop = Loop(total_steps=5, log_every=2, eval_every=3, save_every=2)
    state = fit(model, seeded_batches(rows, collate, 2, seed=0), *parts(model), loop, hooks=hooks)
    assert [(r["step"], "eval" in r) for r in logged] == [(2, False), (3, True), (4, False), (5, False), (5, True)]
    assert {"step", "epoch", "loss", "lr", "tokens_per_s"} == logged[0].keys()
    assert [s["step"] for s in saved] == [2, 4] and saved[1]["micro"] == 4  # none after the last step
    assert state.checkpoint == "step-4" and state.last_eval == {"accuracy": 0.5}


def test_fit_stops_on_a_non_finite_loss_before_stepping(setup):
    model, rows, collate, _ = setup
    head = model.classifier.modules_to_save["default"]

    def poison(record):
        head.weight.data.fill_(float("nan"))

    with pytest.raises(TrainingError, match="loss is nan at step 2: training stopped; no checkpoint was saved yet"):
        fit(model, seeded_batches(rows, collate, 2, seed=0), *parts(model), Loop(total_steps=3),
            hooks=Hooks(on_step=poison))


def test_ctrl_c_stops_after_the_step_with_a_checkpoint(setup):
    model, rows, collate, _ = setup
    saved = []

    def ctrl_c(record):
        if record["step"] == 1:
            os.kill(os.getpid(), signal.SIGINT)

    hooks = Hooks(on_step=ctrl_c, checkpoint=lambda state: saved.append(state.step) or "here")
    with pytest.raises(Interrupted, match="interrupted at step 1 of 3: checkpoint saved to here"):
        fit(model, seeded_batches(rows, collate, 2, seed=0), *parts(model), Loop(total_steps=3), hooks=hooks)
    assert saved == [1]


def test_fit_keeps_the_best_evaluation_checkpoints_it_and_stops_early(setup):
    model, rows, collate, _ = setup
    losses = iter([3.0, 2.0, 2.5, 1.5, 1.5, 1.6, 1.7, 1.0])  # best at steps 2 and 4; 5-7 none better
    saved = []
    hooks = Hooks(evaluate=lambda: {"loss": next(losses)}, echo=lambda message: None,
                  checkpoint=lambda state: saved.append(state.saved()) or f"step-{state.step}")
    loop = Loop(total_steps=20, eval_every=1, save_every=100, select_by="loss", keep_best=True, early_stopping=3)
    state = fit(model, seeded_batches(rows, collate, 2, seed=0), *parts(model), loop, hooks=hooks)
    assert state.step == 7 and (state.best_step, state.best_eval, state.stale_evals) == (4, {"loss": 1.5}, 3)
    # A checkpoint at each new best (the first evaluation's included), holding the best so far for resume.
    assert [(s["step"], s["best_step"], s["stale_evals"]) for s in saved] == [(1, 1, 0), (2, 2, 0), (4, 4, 0)]
    assert RunState.restored(saved[-1]).best_eval == {"loss": 1.5}


def test_fit_selects_by_accuracy_upwards(setup):
    model, rows, collate, _ = setup
    scores = iter([0.5, 0.75, 0.75, 0.5])
    hooks = Hooks(evaluate=lambda: {"accuracy": next(scores)}, echo=lambda message: None)
    state = fit(model, seeded_batches(rows, collate, 2, seed=0), *parts(model),
                Loop(total_steps=4, eval_every=1, select_by="accuracy"), hooks=hooks)
    assert (state.step, state.best_step, state.stale_evals) == (4, 2, 2)  # a tie is no improvement
