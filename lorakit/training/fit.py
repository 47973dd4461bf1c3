"""The training loop. `fit()` runs optimizer steps over a model's trainable parameters until `Loop.total_steps`, and
between steps logs, evaluates, checkpoints and stops (Ctrl-C, a non-finite loss) through `Hooks`; each phase is a
named function below. Where the run stands is a `RunState`: checkpoints save it and resume hands it back to fit().

fit() knows nothing of files or settings: `lorakit train` wires the hooks to its run directory, a benchmark to its
own evaluation, and either to none at all.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..data.tables import epoch_order, micro_batch
from ..errors import Interrupted, TrainingError
from ..runtime.distributed import World, any_rank, barrier, gradient_sync, is_sharded, sum_over_processes, wrap
from ..runtime.heap import reusing_freed_memory
from ..runtime.precision import autocast
from .evaluation import better, describe
from .stops import StopOnSignal


@dataclass
class RunState:
    """Where a run stands. `step`, `micro` and `seconds` are what a checkpoint saves and resume restores (with the
    weights, optimizer, scheduler and RNG); the rest is this process's view of the run."""

    step: int = 0  # optimizer steps done
    micro: int = 0  # micro-batches consumed: the position in the data order
    seconds: float = 0.0  # training time so far, summed over every resumed part of the run
    last_eval: dict | None = None  # the latest evaluation's metrics
    checkpoint: Path | None = None  # the latest checkpoint written (on the main process)
    best_step: int | None = None  # with Loop.select_by: the step of the best evaluation so far (main process)
    best_eval: dict | None = None  # ... its metrics
    stale_evals: int = 0  # ... and the evaluations since it, none better

    SAVED = ("step", "micro", "seconds", "best_step", "best_eval", "stale_evals")

    def saved(self) -> dict:
        """The fields a checkpoint stores."""
        return {k: getattr(self, k) for k in self.SAVED}

    @classmethod
    def restored(cls, saved: dict, **rest) -> RunState:
        """The state a checkpoint stored (`saved` may hold more keys, or lack those an older lorakit did not save),
        with `rest` set."""
        return cls(**{k: saved[k] for k in cls.SAVED if k in saved}, **rest)


def examples(batch: dict) -> int:
    """The targets of a classifier's batch, over which its loss is a mean: the examples."""
    return len(batch["labels"])


def target_tokens(batch: dict) -> int:
    """The targets of a causal LM's batch, over which its loss is a mean: the label tokens other than -100, the
    first of each row left out (Hugging Face causal LMs shift labels by one: token t is trained to predict t + 1)."""
    return int((batch["labels"][:, 1:] != -100).sum())


@dataclass(frozen=True)
class Loop:
    """How fit() trains; fixed for a run."""

    total_steps: int
    count: Callable[[dict], int] = examples  # a batch's targets: examples, or target_tokens for a causal LM
    grad_accum: int = 1  # micro-batches per optimizer step
    max_grad_norm: float = 1.0  # 0: no clipping
    precision: str = "fp32"
    seed: int | None = None  # dropout's RNG: seed + 1 + rank at step 0; None: left as it is
    log_every: int = 1
    eval_every: int | None = None  # None: evaluate after the last step only
    save_every: int | None = None  # None: checkpoint on Ctrl-C only
    select_by: str | None = None  # the eval metric that tells the best step (evaluation.better); None: not tracked
    keep_best: bool = False  # checkpoint each step whose evaluation is the best so far (needs select_by)
    early_stopping: int | None = None  # stop after this many evaluations in a row none better than the best
    # A batch's (mean loss over Loop.count's targets, metric totals {name: tensor([sum, count])}); None: the model's
    # own loss. Preference tasks compute theirs (preference/); a step's totals, added up, become means by metric_means.
    loss_of: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]] | None = None
    metric_means: Callable[[dict], dict] = lambda totals: {k: s / c for k, (s, c) in totals.items() if c}


def row_tokens(row: dict) -> int:
    """The tokens a row puts through the model: its input_ids (packed batches have no attention mask to count)."""
    return len(row.get("input_ids", ()))


@dataclass
class Batches:
    """The training examples and their order: `order(epoch)` lists this process's micro-batches (row indices) of
    an epoch, `per_epoch` of them; `tokens(row)`: what a row puts through the model. With `previous`, each list
    starts with the global batch's row before this process's first (cyclically), passed as collate(rows,
    previous=row): KTO pairs each prompt with the completion before it in the global batch, as one process would.
    (A stream's batches, training/streams.py, have the same `get` and no epochs: `per_epoch` None, and the step
    records then have no "epoch".)"""

    rows: list[dict]
    collate: Callable[..., dict]
    order: Callable[[int], list[list[int]]]
    per_epoch: int
    tokens: Callable[[dict], int] = row_tokens
    previous: bool = False
    _epoch: tuple = field(default=(None, None), init=False, repr=False)  # (epoch, its order), computed once

    def get(self, micro: int, device: torch.device) -> tuple[dict, int]:
        """Micro-batch number `micro` of the run (counted over epochs), collated, on `device`; and its tokens."""
        epoch, pos = divmod(micro, self.per_epoch)
        if self._epoch[0] != epoch:
            self._epoch = (epoch, self.order(epoch))
        rows = [self.rows[i] for i in self._epoch[1][pos]]
        rows, extra = (rows[1:], {"previous": rows[0]}) if self.previous else (rows, {})
        batch = self.collate(rows, **extra)
        return {k: v.to(device) for k, v in batch.items()}, sum(self.tokens(r) for r in rows)


def seeded_batches(rows: list[dict], collate, batch_size: int, seed: int, world: World = World(),
                   draw: Callable[[int], list[int]] | None = None, tokens: Callable[[dict], int] = row_tokens,
                   previous: bool = False) -> Batches:
    """lorakit train's order: per epoch a seeded permutation (or `draw(epoch)`'s len(rows) indices: a weighted mix
    of sources) padded to whole global batches, each process taking its slice of every global batch (so 2 processes
    × batch B see the batches of 1 process × batch 2B). `tokens` and `previous`: as Batches says."""
    global_batch = batch_size * world.size
    per_epoch = math.ceil(len(rows) / global_batch)

    def order(epoch: int) -> list[list[int]]:
        perm = epoch_order(len(rows), global_batch, seed, epoch, draw(epoch) if draw else None)
        slices = [micro_batch(perm, pos, batch_size, world.rank, world.size) for pos in range(per_epoch)]
        if not previous:
            return slices
        before = [perm[pos * global_batch + (world.rank * batch_size - 1) % global_batch] for pos in range(per_epoch)]
        return [[b, *s] for b, s in zip(before, slices)]

    return Batches(rows, collate, order, per_epoch, tokens, previous)


@dataclass
class Hooks:
    """What fit() does besides training; by default nothing. Every process gets the same hooks: evaluate, log and
    checkpoint run on the main process only (the others wait), on_step on every process. For a model sharded with
    FSDP (sharding.shard), evaluate and checkpoint run on every process: its forward and gathers are collective."""

    evaluate: Callable[[], dict] | None = None  # metrics of the model now
    log: Callable[[dict], None] | None = None  # a log record: a logged step, or {"step", "eval"}
    checkpoint: Callable[[RunState], Path] | None = None  # save one; returns where
    on_step: Callable[[dict], None] | None = None  # the step record, after every optimizer step
    echo: Callable[[str], None] = print
    progress: bool = False  # a progress bar


@dataclass
class _Run:
    # What the phases of one fit() call share; `window` holds the step records since the last log line.
    model: torch.nn.Module
    net: torch.nn.Module  # the model as trained: in DistributedDataParallel under torchrun
    batches: Batches
    opt: torch.optim.Optimizer
    sched: object
    loop: Loop
    world: World
    hooks: Hooks
    state: RunState
    seconds_before: float = 0.0  # the state's training time when this call began
    started: float = field(default_factory=time.perf_counter)
    window: list[dict] = field(default_factory=list)
    window_start: float = field(default_factory=time.perf_counter)
    bar: object = None

    def elapsed(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started


def fit(model: torch.nn.Module, batches: Batches, opt: torch.optim.Optimizer, sched, loop: Loop,
        state: RunState | None = None, *, world: World = World(), hooks: Hooks | None = None) -> RunState:
    """Train `model` from `state` (a fresh run if None) to `loop.total_steps` optimizer steps; returns the final
    RunState. Raises TrainingError on a non-finite loss, Interrupted after Ctrl-C (on every process alike)."""
    state, hooks = state or RunState(), hooks or Hooks()
    seed_dropout(loop.seed, world, state)
    run = _Run(model, wrap(model, world), batches, opt, sched, loop, world, hooks, state, state.seconds)
    with StopOnSignal() as stop, _progress_bar(loop.total_steps, state.step, hooks.progress and world.main) as bar:
        run.bar = bar
        while state.step < loop.total_steps:
            record = _optimizer_step(run)
            _log(run, record)
            best = early_stop = False
            if hooks.evaluate and (state.step == loop.total_steps or _every(state.step, loop.eval_every)):
                _evaluate(run)
                best, early_stop = _select(run)
            due = _every(state.step, loop.save_every) or (best and loop.keep_best)
            if hooks.checkpoint and state.step < loop.total_steps and not early_stop and due:
                _checkpoint(run)
            _show(bar, record)
            if hooks.on_step:
                hooks.on_step(record)
            if early_stop:
                _stop_early(run)
                break
            if any_rank(stop.requested, world) and state.step < loop.total_steps:
                _interrupt(run)
    state.seconds = run.elapsed()
    return state


def seed_dropout(seed: int | None, world: World, state: RunState) -> None:
    """Seed the RNG that dropout draws from, differently on each process. A resumed run's main process has its RNG
    from the checkpoint already; checkpoints hold rank 0's RNG only, so the others get a seed for their step."""
    if seed is None:
        return
    if state.step == 0:
        torch.manual_seed(seed + 1 + world.rank)
    elif not world.main:
        torch.manual_seed(seed + 1 + world.rank + 1000 * state.step)


def _every(step: int, every: int | None) -> bool:
    return bool(every) and step % every == 0


# ---- one optimizer step ----

def _optimizer_step(run: _Run) -> dict:
    """grad_accum micro-batches, then clip, step and zero the gradients; returns the step record."""
    start = time.perf_counter()
    run.net.train()
    value, tokens, metrics = _accumulate(run)
    _stop_if_not_finite(value, run.state)
    if run.loop.max_grad_norm > 0:
        params = [p for p in run.model.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(params, run.loop.max_grad_norm)
    run.opt.step()
    run.sched.step()
    run.opt.zero_grad(set_to_none=True)
    run.state.step += 1
    epoch = {"epoch": round(run.state.micro / run.batches.per_epoch, 3)} if run.batches.per_epoch else {}
    return {"step": run.state.step, **epoch, "loss": value, "lr": run.sched.get_last_lr()[0],
            "tokens": tokens * run.world.size, "seconds": time.perf_counter() - start, **metrics}


def _accumulate(run: _Run) -> tuple[float, int, dict]:
    """Forward and backward passes of one step's micro-batches: (the step's loss, tokens seen by this process, the
    step's metrics from Loop.loss_of, each weighted like the loss, over this process's micro-batches).

    The step's loss is the mean over every target of the step (Loop.count: tokens or examples), across its
    micro-batches and processes, however their sizes differ. The model's loss of micro-batch i is a mean over its
    n_i targets; weighted by n_i / N, N the step's targets on all processes, the weighted losses add up to that mean,
    and so do their gradients. DDP (and FSDP's reduce-scatter) averages gradients over the W processes, hence the
    factor W: loss_i = mean_i · n_i · W / N.
    """
    loop, world = run.loop, run.world
    fetched = [run.batches.get(run.state.micro + a, world.device) for a in range(loop.grad_accum)]
    counts = [loop.count(batch) for batch, _ in fetched]
    total = max(sum_over_processes(torch.tensor(float(sum(counts)), device=world.device), world).item(), 1.0)
    loss_sum = torch.zeros((), device=world.device)
    totals = {}
    for a, ((batch, _), n) in enumerate(zip(fetched, counts)):
        # DDP averages gradients over processes on the last micro-batch only (FSDP: one reduce-scatter per step).
        sync = a == loop.grad_accum - 1 or world.size == 1
        with gradient_sync(run.net, sync):
            with autocast(loop.precision, world.device):
                loss, metrics = loop.loss_of(run.net, batch) if loop.loss_of else _model_loss(run.net, batch, n)
            with reusing_freed_memory(world.device):  # backward's temporaries reuse heap blocks (runtime/heap.py)
                (loss * (n * world.size / total)).backward()
        loss_sum += loss.detach().float() * n if n else 0.0  # no targets: a NaN mean
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0) + v.detach().float()
        run.state.micro += 1
    names = sorted(totals)  # the same on every process; the loss and the totals in one all-reduce per step
    summed = sum_over_processes(torch.cat([loss_sum.view(1), *(totals[k] for k in names)]), world).tolist()
    metrics = loop.metric_means({k: (summed[1 + 2 * i], summed[2 + 2 * i]) for i, k in enumerate(names)})
    return summed[0] / total, sum(tokens for _, tokens in fetched), metrics


def _model_loss(net: torch.nn.Module, batch: dict, n: int) -> tuple[torch.Tensor, dict]:
    """The model's own loss of a batch with n targets. With none its mean is NaN: a zero that still reaches every
    trained weight takes its place, so that backward runs as DDP expects (a chunked loss, chunked_loss.py, has no
    logits: it is 0 there, with zero gradients)."""
    out = net(**batch)
    if n:
        return out.loss, {}
    return (out.logits.sum() * 0.0 if out.logits is not None else out.loss * 0.0), {}


def _stop_if_not_finite(loss: float, state: RunState) -> None:
    # Before the optimizer step: the weights stay those of the last finite step.
    if not math.isfinite(loss):
        where = f"the last good checkpoint is {state.checkpoint}" if state.checkpoint else "no checkpoint was saved yet"
        raise TrainingError(f"loss is {loss} at step {state.step + 1}: training stopped; {where} (try a lower --lr, "
                            f"or --precision fp32)")


# ---- between steps ----

def _log(run: _Run, record: dict) -> None:
    """Every log_every steps (and at the last): one log record averaging the steps since the previous one."""
    run.window.append(record)
    if record["step"] == run.loop.total_steps or _every(record["step"], run.loop.log_every):
        _write_log(run)


def _write_log(run: _Run) -> None:
    now, window = time.perf_counter(), run.window
    if run.hooks.log and run.world.main:
        run.hooks.log({"step": window[-1]["step"], **{k: window[-1][k] for k in ("epoch",) if k in window[-1]},
                       "loss": sum(r["loss"] for r in window) / len(window), "lr": window[-1]["lr"],
                       "tokens_per_s": round(sum(r["tokens"] for r in window) / (now - run.window_start), 1),
                       **_mean_metrics(window)})
    run.window, run.window_start = [], now


def _mean_metrics(window: list[dict]) -> dict:
    """Loop.loss_of's metrics averaged over the steps of a log window that have them."""
    names = {k for r in window for k in r} - {"step", "epoch", "loss", "lr", "tokens", "seconds"}
    return {k: sum(r[k] for r in window if k in r) / sum(k in r for r in window) for k in sorted(names)}


def _evaluate(run: _Run) -> None:
    """The evaluate hook on the main process (on every process when sharded), logged and shown; the other processes
    wait for it."""
    if run.world.main or is_sharded(run.net):
        run.state.last_eval = run.hooks.evaluate()
    if is_sharded(run.net):
        run.model.reshard()  # a forward without backward leaves the root unit's weights gathered
    if run.world.main:
        if run.hooks.log:
            run.hooks.log({"step": run.state.step, "eval": run.state.last_eval})
        message = f"step {run.state.step}: eval {describe(run.state.last_eval)}"
        run.bar.write(message) if run.bar else run.hooks.echo(message)
    barrier(run.world)


def _select(run: _Run) -> tuple[bool, bool]:
    """After an evaluation, with Loop.select_by: (it is the best so far, training should stop early), the same on
    every process. Only evaluations after step 0 compete: the step-0 model has no checkpoint to come back to."""
    loop, state = run.loop, run.state
    if loop.select_by is None:
        return False, False
    best = False
    if run.world.main:
        value = state.last_eval[loop.select_by]
        best = state.best_eval is None or better(loop.select_by, value, state.best_eval[loop.select_by])
        if best:
            state.best_step, state.best_eval, state.stale_evals = state.step, state.last_eval, 0
        else:
            state.stale_evals += 1
    stop = bool(loop.early_stopping) and state.stale_evals >= loop.early_stopping
    return any_rank(best, run.world), any_rank(stop, run.world)


def _stop_early(run: _Run) -> None:
    """Early stopping: the last steps' log record, and a line saying why."""
    if run.window:
        _write_log(run)
    state = run.state
    message = (f"early stopping at step {state.step}: {state.stale_evals} evaluations without a better "
               f"{run.loop.select_by} than step {state.best_step}'s")
    if run.world.main:
        run.bar.write(message) if run.bar else run.hooks.echo(message)


def _checkpoint(run: _Run) -> None:
    """The checkpoint hook with the state as of now: on the main process (on every process when sharded: they gather
    the shards, the main one writes); the others wait for it."""
    run.state.seconds = run.elapsed()
    if run.world.main or is_sharded(run.net):  # sharded: every process gathers its shards, the main one writes
        run.state.checkpoint = run.hooks.checkpoint(run.state)
    barrier(run.world)


def _interrupt(run: _Run) -> None:
    """Ctrl-C or SIGTERM: checkpoint (if the run saves any) and stop."""
    saved = ""
    if run.hooks.checkpoint:
        _checkpoint(run)
        saved = f": checkpoint saved to {run.state.checkpoint}" if run.state.checkpoint else ""
    raise Interrupted(f"interrupted at step {run.state.step} of {run.loop.total_steps}{saved}")


def _show(bar, record: dict) -> None:
    if bar:
        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens'] / record['seconds']:.0f}", refresh=False)
        bar.update(1)


@contextlib.contextmanager
def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()
