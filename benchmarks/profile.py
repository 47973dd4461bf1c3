"""Where a training step's time goes.

`python -m benchmarks.profile gpt2 lorakit peft [--size full] [--steps 2] [--device cuda]` runs torch.profiler over
a few steps of each named variant (after one warm-up step) and prints the operators with the most self CPU time (on
CUDA: self CUDA time, the kernels), so that two variants can be compared op by op. `python -m benchmarks.profile --layers` times one adapted layer alone (forward +
backward, interleaved): lorakit, PEFT, the frozen base layer (LoRA's floor) and a trainable layer (full
fine-tuning), at the shapes of the training workloads, which bounds what the LoRA layer can change in a whole step.
`python -m benchmarks.profile gpt2 --saved` adds up the tensors autograd keeps for backward, per variant.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from . import train
from .common import ALPHA, MAKERS, RANK, base_model, batch, interleave, set_threads, summary

# (label, tokens per batch, d_in, d_out, LoRA dropout, adapted layers per model) of the training workloads' targets
LAYERS = [("MiniLM query/value", 32 * 128, 384, 384, 0.1, 12), ("MiniLM query/value", 32 * 128, 384, 384, 0.0, 12),
          ("GPT-2 c_attn", 4 * 256, 768, 2304, 0.05, 12), ("Llama q_proj/v_proj", 4 * 256, 768, 768, 0.05, 24)]


def _model(train_key: str, variant: str, size: str, device: str):
    spec = train.ROWS[train_key]
    model = MAKERS[variant](base_model(spec["model"], size), spec["model"], spec["dropout"]).to(device).train()
    return spec, model, batch(spec["model"], size, model, device)


def profile_variant(train_key: str, variant: str, size: str, steps: int, rows: int = 25, device: str = "cpu") -> str:
    """The profiler's table (top `rows` ops by self CPU time, on CUDA by self CUDA time) for `steps` training steps
    of `variant`."""
    spec, model, inputs = _model(train_key, variant, size, device)
    step = train.step_fn(model, train.optimizer(model), inputs, spec["precision"], device)
    step()  # warm-up: AdamW state, allocator, oneDNN kernels
    cuda = device.startswith("cuda")
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda, record_shapes=True) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    seconds = (time.perf_counter() - t) / steps
    table = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=rows, max_name_column_width=40,
        max_shapes_column_width=60)
    return f"== {train_key} / {variant}: {seconds:.3f} s per step under the profiler ==\n{table}"


def saved_mib(train_key: str, variant: str, size: str, device: str = "cpu") -> float:
    """MiB of tensors autograd keeps for backward after one forward of training row `train_key` (each storage counted
    once, parameters excluded): the activation memory a training step holds at its peak, apart from the loss."""
    from lorakit.runtime.precision import autocast

    spec, model, inputs = _model(train_key, variant, size, device)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(spec["precision"], device):
        model(**inputs).loss
    return sum(storages.values()) / 2**20


def layer_variants(d_in: int, d_out: int, dropout: float) -> dict[str, nn.Module]:
    """One Linear(d_in, d_out) four ways, same weights: frozen, lorakit LoRA, PEFT LoRA, trainable."""
    import peft

    from lorakit.nn.layers import LoraLayer

    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out)
    frozen = nn.Sequential(nn.Linear(d_in, d_out)).requires_grad_(False)
    frozen.load_state_dict(nn.Sequential(base).state_dict())
    lk = LoraLayer(nn.Linear(d_in, d_out).requires_grad_(False))
    lk.load_state_dict(base.state_dict(), strict=False)  # the LoRA layer holds the base's weight and bias
    lk.add_adapter("default", RANK, ALPHA / RANK, dropout, "kaiming")
    lk.set_active(("default",))
    pf = peft.get_peft_model(nn.Sequential(nn.Linear(d_in, d_out)), peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=["0"]))
    full = nn.Linear(d_in, d_out)
    return {"frozen": frozen, "lorakit": lk, "peft": pf, "full": full}


def layer_times(tokens: int, d_in: int, d_out: int, dropout: float, rounds: int = 30) -> dict[str, float]:
    """Median milliseconds of forward + backward of one layer per variant (x requires grad, as inside a model)."""
    x = torch.randn(tokens, d_in, requires_grad=True)
    g = torch.randn(tokens, d_out)
    models = layer_variants(d_in, d_out, dropout)

    def step(model):
        def run():
            model(x).backward(g)
            x.grad = None
            for p in model.parameters():
                p.grad = None
        return run

    times = interleave({k: step(m.train()) for k, m in models.items()}, 5, rounds)
    return {k: summary(v)["median"] * 1e3 for k, v in times.items()}


def print_layer_table() -> None:
    """Print layer_times for each LAYERS shape, with the LoRA overhead over the frozen layer, per layer and per model."""
    print("| layer | tokens | d_in→d_out | dropout | frozen | lorakit | PEFT | full | lorakit − frozen | PEFT − frozen | "
          "per model step (×layers): lorakit / PEFT overhead |")
    print("|" + " --- |" * 11)
    for label, tokens, d_in, d_out, dropout, count in LAYERS:
        ms = layer_times(tokens, d_in, d_out, dropout)
        lk, pf = ms["lorakit"] - ms["frozen"], ms["peft"] - ms["frozen"]
        print(f"| {label} | {tokens} | {d_in}→{d_out} | {dropout} | {ms['frozen']:.2f} | {ms['lorakit']:.2f} | "
              f"{ms['peft']:.2f} | {ms['full']:.2f} | {lk:.2f} | {pf:.2f} | {lk * count:.0f} / {pf * count:.0f} ms |",
              flush=True)


def main() -> None:
    """Command line: a training row of benchmarks.train and the variants to profile, or --layers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("train_key", nargs="?", choices=list(train.ROWS))
    parser.add_argument("variants", nargs="*", help=f"any of {list(MAKERS)}")  # argparse rejects [] with choices
    parser.add_argument("--layers", action="store_true", help="time single adapted layers instead")
    parser.add_argument("--saved", action="store_true", help="MiB that autograd keeps for backward, per variant")
    parser.add_argument("--size", default="full", choices=["full", "quick", "tiny", "gpu"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the step and --saved)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    set_threads()
    if args.layers:
        print_layer_table()
    elif args.saved and args.train_key:
        for variant in args.variants or list(MAKERS):
            print(f"{args.train_key} / {variant}: {saved_mib(args.train_key, variant, args.size, args.device):.1f} MiB saved for backward",
                  flush=True)
        return
    elif not args.train_key or not args.variants:
        parser.error("name a training row and at least one variant, or pass --layers")
    unknown = sorted(set(args.variants) - set(MAKERS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(MAKERS)}")
    for variant in args.variants:
        print(profile_variant(args.train_key, variant, args.size, args.steps, args.rows, args.device), flush=True)


if __name__ == "__main__":
    main()
