"""Tokens per second of `lorakit serve`'s OpenAI API (/v1/chat/completions, streamed) beside its own /v1/generate,
on the same server, model, adapters and prompts.

model     a random Llama (full: 4 layers, hidden 256, ~3.5 M parameters; tiny: 2 layers, hidden 32) with a byte-level
          BPE tokenizer and a ChatML template, trained here on the shipped news headlines; two random LoRA adapters
          (r=8, all linear layers) saved with the template, as a chat run saves them. The output rows of the two
          tokens that end an answer (EOS, <|im_end|>) are zero, so every answer runs to max_tokens: both endpoints
          then generate the same number of tokens per request.
load      one `python -m lorakit serve` process; for 1, 4 and 16 concurrent clients (threads, keep-alive HTTP on
          loopback), each sending a fixed count of requests, the adapters alternating by client; greedy. Chat
          requests stream (stream: true) and are read to `data: [DONE]`; /v1/generate answers whole. Rounds alternate
          the two endpoints. Measured: generated tokens / wall seconds over all rounds, and for the streams the
          median time to the first text.

    python -m benchmarks.openai_serving               # full size, writes benchmarks/results/openai_serving.json
    python -m benchmarks.openai_serving --size tiny   # seconds (what the tests run)
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from .common import machine, md_table, set_threads
from .serving import ROOT, headlines, request, run_clients, start_server, wait_ready

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SIZES = {  # the model, tokens per answer, concurrent clients, requests per client, rounds per endpoint
    "full": dict(layers=4, hidden=256, heads=4, vocab=1000, max_tokens=64, clients=(1, 4, 16), requests=4, rounds=3),
    "tiny": dict(layers=2, hidden=32, heads=2, vocab=300, max_tokens=4, clients=(1, 2), requests=1, rounds=1),
}
ENDPOINTS = ("chat_stream", "generate")


def build(size: str, out: Path) -> tuple[Path, dict[str, Path]]:
    """(the base model's directory, {adapter name: directory}) for `size` (see the module docstring)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    import lorakit

    cfg = SIZES[size]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(headlines() + ["user assistant system"], trainers.BpeTrainer(
        vocab_size=cfg["vocab"], special_tokens=["</s>", "<s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", bos_token="<s>", pad_token="</s>",
                                        extra_special_tokens=["<|im_start|>", "<|im_end|>"], chat_template=CHATML)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        num_hidden_layers=cfg["layers"], hidden_size=cfg["hidden"], intermediate_size=cfg["hidden"] * 8 // 3,
        num_attention_heads=cfg["heads"], num_key_value_heads=cfg["heads"], vocab_size=len(tokenizer),
        max_position_embeddings=512, initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    with torch.no_grad():  # answers never end early: the same token count from both endpoints
        model.lm_head.weight[[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]] = 0
    model.save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")
    adapters = {}
    for i, name in enumerate(("a", "b")):
        torch.manual_seed(10 + i)
        net = LlamaForCausalLM.from_pretrained(out / "base")
        lorakit.inject(net, lorakit.LoraConfig(r=8, alpha=16, targets="all-linear", init="random"))
        lorakit.save_adapter(net, out / name, base_model_name_or_path=str(out / "base"))
        (out / name / "chat_template.jinja").write_text(CHATML)
        adapters[name] = out / name
    return out / "base", adapters


def one_request(conn: http.client.HTTPConnection, endpoint: str, adapter: str, prompt: str, max_tokens: int):
    """(generated tokens, seconds to the first text or None) of one request."""
    if endpoint == "generate":
        request(conn, "POST", "/v1/generate", {"adapter": adapter, "prompt": prompt, "max_new_tokens": max_tokens})
        return max_tokens, None
    body = {"model": adapter, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start, first, usage = time.perf_counter(), None, None
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"/v1/chat/completions: {response.status} {response.read()[:300]}")
    while (line := response.readline()) != b"data: [DONE]\n":
        if not line.startswith(b"data: "):
            continue
        chunk = json.loads(line[6:])
        if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            first = time.perf_counter() - start
        usage = chunk.get("usage") or usage
    response.read()
    if usage["completion_tokens"] != max_tokens:  # the two endpoints would not be doing the same work
        raise RuntimeError(f"an answer of {usage['completion_tokens']} tokens, not max_tokens {max_tokens}")
    return usage["completion_tokens"], first


def load(port: int, endpoint: str, clients: int, requests: int, max_tokens: int) -> dict:
    """`clients` threads sending `requests` requests each (adapter a for even clients, b for odd ones)."""
    texts, tokens, firsts, errors = headlines(), [], [], []

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        for r in range(requests):
            try:
                n, first = one_request(conn, endpoint, "ab"[i % 2], texts[(i * requests + r) % len(texts)], max_tokens)
                tokens.append(n)
                firsts.extend([first] if first is not None else [])
            except Exception as e:  # noqa: BLE001 (counted and reported)
                errors.append(str(e)[:200])

    seconds = run_clients(client, clients)
    return {"seconds": seconds, "tokens": sum(tokens), "firsts": firsts, "errors": errors}


def measure(size: str) -> dict:
    """{clients: {endpoint: tokens/s, errors, first-text median}} on one server, rounds alternating the endpoints."""
    cfg = SIZES[size]
    with tempfile.TemporaryDirectory() as tmp:
        base, adapters = build(size, Path(tmp))
        log = Path(tmp, "serve.log")
        proc, port = start_server(str(base), Path(tmp), True, log, task="causal-lm",
                                  adapters={name: str(path) for name, path in adapters.items()})
        try:
            wait_ready(proc, port, log)
            load(port, "chat_stream", 2, 1, cfg["max_tokens"])  # warm-up, untimed
            out = {}
            for clients in cfg["clients"]:
                runs = {e: [] for e in ENDPOINTS}
                for r in range(cfg["rounds"]):
                    for endpoint in ENDPOINTS if r % 2 == 0 else ENDPOINTS[::-1]:
                        runs[endpoint].append(load(port, endpoint, clients, cfg["requests"], cfg["max_tokens"]))
                out[clients] = {e: _summary(rs) for e, rs in runs.items()}
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return out


def _summary(runs: list[dict]) -> dict:
    firsts = [f for r in runs for f in r["firsts"]]
    tokens, seconds = sum(r["tokens"] for r in runs), sum(r["seconds"] for r in runs)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "errors": sum(len(r["errors"]) for r in runs), "first_text_ms": statistics.median(firsts) * 1e3
            if firsts else None}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.openai_serving", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="full")
    parser.add_argument("--threads", type=int, help="torch threads in the server (default: one per core)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "openai_serving.json")
    args = parser.parse_args(argv)
    threads = set_threads()
    if args.threads:
        torch.set_num_threads(threads := args.threads)
    given = sys.argv[1:] if argv is None else argv
    cfg = SIZES[args.size]
    results = {"command": " ".join(["python -m benchmarks.openai_serving", *given]),
               "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "size": args.size, "machine": machine(), "torch_threads": threads,
               "max_tokens": cfg["max_tokens"], "requests_per_client": cfg["requests"], "rounds": cfg["rounds"],
               "by_clients": measure(args.size)}
    print(json.dumps(results["by_clients"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    return results


def section(path: Path) -> str:
    """The BENCHMARKS.md section for the results in `path`, or a line saying how to produce them."""
    if not path.exists():
        return "Not run yet: `python -m benchmarks.openai_serving`.\n"
    data = json.loads(path.read_text())
    rows = []
    for clients, by in data["by_clients"].items():
        chat, gen = by["chat_stream"], by["generate"]
        rows.append([clients, f"{chat['tokens_per_s']:.0f}", f"{gen['tokens_per_s']:.0f}",
                     f"{chat['tokens_per_s'] / gen['tokens_per_s']:.2f}", f"{chat['first_text_ms']:.0f}",
                     chat["errors"] + gen["errors"]])
    head = (f"Written to `{path.name}` by `{data['command']}` ({data['date']}, {data['torch_threads']} torch "
            f"thread(s) in the server). {data['max_tokens']} tokens per answer, {data['requests_per_client']} "
            f"requests per client per round, {data['rounds']} rounds per endpoint, alternating; two adapters. See "
            f"`benchmarks/openai_serving.py` for the method.\n")
    table = md_table(["concurrent clients", "chat stream tokens/s", "/v1/generate tokens/s", "chat / generate",
                      "first text ms (median)", "errors"], rows)
    return head + "\n" + table + "\n"


if __name__ == "__main__":
    main()
