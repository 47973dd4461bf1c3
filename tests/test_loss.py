"""The loss of an optimizer step is the mean over all its target tokens, however they are split: micro-batches of
different lengths accumulated give the gradients of one batch holding them all, and so do 2 processes (torchrun,
gloo). Gradients are read as the change of one plain SGD step at learning rate 1 without clipping."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from lorakit import LoraConfig, inject
from lorakit.training.fit import Batches, Hooks, Loop, fit, target_tokens

TESTS = Path(__file__).resolve().parent
LENGTHS = (3, 11, 5, 14)  # tokens per example: 2, 10, 4 and 13 targets


def setup():
    """A 2-layer GPT-2 without dropout (random weights, LoRA with random A and B on every attention projection) and
    four examples of different lengths whose every token is a target."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    inject(model, LoraConfig(r=4, targets=["c_attn", "c_proj"], dropout=0.0, init="random"))
    g = torch.Generator().manual_seed(1)
    rows = [{"input_ids": torch.randint(1, 64, (n,), generator=g).tolist()} for n in LENGTHS]
    return model, [{**r, "labels": r["input_ids"]} for r in rows]


def collate(rows: list[dict]) -> dict:
    """Right-padded: pad id 0 under a zero attention mask, label -100."""
    width = max(len(r["input_ids"]) for r in rows)
    pad = [width - len(r["input_ids"]) for r in rows]
    return {"input_ids": torch.tensor([r["input_ids"] + [0] * p for r, p in zip(rows, pad)]),
            "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * p for r, p in zip(rows, pad)]),
            "labels": torch.tensor([r["labels"] + [-100] * p for r, p in zip(rows, pad)])}


def one_step(model, rows, order: list[list[int]], grad_accum: int, world=None) -> tuple[dict, float]:
    """(minus the gradient of each trainable tensor, the step's loss) after one step over micro-batches `order`."""
    from lorakit.runtime.distributed import World

    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    records = []
    loop = Loop(total_steps=1, grad_accum=grad_accum, max_grad_norm=0, count=target_tokens)
    fit(model, Batches(rows, collate, lambda epoch: order, len(order)), opt, sched, loop, world=world or World(),
        hooks=Hooks(on_step=records.append))
    step = {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}
    return step, records[0]["loss"]


def assert_same_step(a: dict, b: dict):
    assert a.keys() == b.keys() and any(t.abs().sum() > 0 for t in a.values())
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-4, msg=name)


def test_accumulated_micro_batches_of_different_lengths_give_the_gradients_of_one_batch():
    model, rows = setup()
    whole, whole_loss = one_step(model, rows, [[0, 1, 2, 3]], grad_accum=1)
    model, rows = setup()
    split, split_loss = one_step(model, rows, [[0], [1, 2, 3]], grad_accum=2)  # 2 targets, then 27
    assert_same_step(split, whole)
    assert abs(split_loss - whole_loss) < 1e-5

    # The loss reported is the mean cross-entropy over the 29 targets, computed here from the untrained model.
    model, rows = setup()
    batch = collate(rows)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), batch["labels"][:, 1:].reshape(-1))
    assert abs(whole_loss - expected.item()) < 1e-5


TWO_PROCESSES = """
import sys
sys.path.insert(0, sys.argv[1])
from safetensors.torch import save_file
from lorakit.runtime.distributed import barrier, init_distributed, shutdown
from test_loss import one_step, setup
world = init_distributed()
model, rows = setup()
order = [[0], [1]] if world.rank == 0 else [[2], [3]]  # 2 and 10 targets on rank 0, 4 and 13 on rank 1
step, loss = one_step(model, rows, order, grad_accum=2, world=world)
if world.main:
    save_file({**step, "loss": __import__("torch").tensor(loss)}, sys.argv[2])
barrier(world)  # as train() does: no process leaves the group while another still works (gloo aborts at exit)
shutdown(world)
"""


def test_two_processes_give_the_gradients_of_one(tmp_path):
    out = tmp_path / "step.safetensors"
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2"]
    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESSES)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(torchrun + [str(script), str(TESTS), str(out)], env=env, timeout=300, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-4000:]  # what went wrong in the processes, not only that it did
    ddp = load_file(out)
    model, rows = setup()
    one, loss = one_step(model, rows, [[0, 1, 2, 3]], grad_accum=1)
    assert abs(ddp.pop("loss").item() - loss) < 1e-5
    assert_same_step(ddp, one)
